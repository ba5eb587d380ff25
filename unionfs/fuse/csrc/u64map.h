/*
 * A small map from 64-bit keys (never 0) to 64-bit values: open addressing with
 * linear probing, grown by doubling, deletion by shifting back (no tombstones).
 * Used from one thread at a time (the thread that runs the FUSE session, which
 * is also the Python thread that fills the tables); not locked.
 */
#ifndef UNIONFS_U64MAP_H
#define UNIONFS_U64MAP_H

#include <stdint.h>
#include <stdlib.h>

struct u64map {
    uint64_t *keys; /* 0: empty slot */
    uint64_t *values;
    size_t cap;     /* a power of two, or 0 */
    size_t used;
};

static inline size_t u64map_slot(const struct u64map *m, uint64_t key)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t)key & (m->cap - 1);
}

/* The value of key, or dflt when it has none. */
static inline uint64_t u64map_get(const struct u64map *m, uint64_t key, uint64_t dflt)
{
    size_t i;
    if (m->used == 0 || key == 0)
        return dflt;
    for (i = u64map_slot(m, key); m->keys[i] != 0; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == key)
            return m->values[i];
    return dflt;
}

static inline int u64map_grow(struct u64map *m)
{
    struct u64map bigger = {NULL, NULL, m->cap ? m->cap * 2 : 64, 0};
    size_t i;
    bigger.keys = calloc(bigger.cap, sizeof(uint64_t));
    bigger.values = calloc(bigger.cap, sizeof(uint64_t));
    if (bigger.keys == NULL || bigger.values == NULL) {
        free(bigger.keys);
        free(bigger.values);
        return -1;
    }
    for (i = 0; i < m->cap; i++) {
        size_t j;
        if (m->keys[i] == 0)
            continue;
        for (j = u64map_slot(&bigger, m->keys[i]); bigger.keys[j] != 0; j = (j + 1) & (bigger.cap - 1))
            ;
        bigger.keys[j] = m->keys[i];
        bigger.values[j] = m->values[i];
        bigger.used++;
    }
    free(m->keys);
    free(m->values);
    *m = bigger;
    return 0;
}

/* Set key to value; returns -1 when out of memory. */
static inline int u64map_put(struct u64map *m, uint64_t key, uint64_t value)
{
    size_t i;
    if (key == 0)
        return 0;
    if ((m->used + 1) * 4 > m->cap * 3 && u64map_grow(m) < 0)
        return -1;
    for (i = u64map_slot(m, key); m->keys[i] != 0; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == key) {
            m->values[i] = value;
            return 0;
        }
    m->keys[i] = key;
    m->values[i] = value;
    m->used++;
    return 0;
}

static inline void u64map_del(struct u64map *m, uint64_t key)
{
    size_t i, j;
    if (m->used == 0 || key == 0)
        return;
    for (i = u64map_slot(m, key); m->keys[i] != key; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == 0)
            return;
    /* Shift back the entries of the probe run that follows, so lookups still find them. */
    for (j = (i + 1) & (m->cap - 1); m->keys[j] != 0; j = (j + 1) & (m->cap - 1)) {
        size_t home = u64map_slot(m, m->keys[j]);
        /* Move j to i when its home is not in the cyclic range (i, j]. */
        if ((i < j) ? (home <= i || home > j) : (home <= i && home > j)) {
            m->keys[i] = m->keys[j];
            m->values[i] = m->values[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->values[i] = 0;
    m->used--;
}

#endif
