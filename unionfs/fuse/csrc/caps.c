/*
 * "No security.capability here", answered in C for the inodes known to have none.
 *
 * The kernel asks for security.capability far more often than anyone sets it:
 * at every exec (the file's capabilities), before the first write to a file
 * and at every chown or truncate (whether privileges must go). Nearly always
 * the answer is ENODATA, which the daemon already remembers per inode
 * (Node.no_caps); this keeps the same knowledge here, as a set of inode
 * numbers the Python side fills and empties (caps_known), and answers those
 * requests without a trip through Python. Whatever is not in the set goes to
 * pyfuse3 as before.
 *
 * The set is only ever a subset of the truth: the Python side adds an inode when
 * the real file said ENODATA, and removes it before anything could give it a
 * capability (a setxattr through the mount) and when the number could come to
 * mean another file (its node dropped or reused).
 */
#include "hook.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAPS_NAME "security.capability"
#define EMPTY 0             /* inode 0 is never used */
#define GONE UINT64_MAX     /* a removed slot */

static void (*inner_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);
static uint64_t *slots; /* open addressing, linear probing; size a power of two */
static size_t size, used;  /* used counts live and GONE slots */

static size_t slot_of(uint64_t ino)
{
    uint64_t h = ino * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 17) & (size - 1);
}

static int contains(uint64_t ino)
{
    size_t i;
    if (size == 0)
        return 0;
    for (i = slot_of(ino);; i = (i + 1) & (size - 1)) {
        if (slots[i] == ino)
            return 1;
        if (slots[i] == EMPTY)
            return 0;
    }
}

static int grow(void)
{
    uint64_t *old = slots;
    size_t i, old_size = size;
    size_t n = size ? size * 2 : 1024;
    uint64_t *fresh = calloc(n, sizeof(*fresh));
    if (fresh == NULL)
        return -1;
    slots = fresh;
    size = n;
    used = 0;
    for (i = 0; i < old_size; i++) {
        if (old[i] != EMPTY && old[i] != GONE) {
            size_t j = slot_of(old[i]);
            while (slots[j] != EMPTY)
                j = (j + 1) & (size - 1);
            slots[j] = old[i];
            used++;
        }
    }
    free(old);
    return 0;
}

static void add(uint64_t ino)
{
    size_t i;
    if (contains(ino))
        return;
    if ((used + 1) * 2 > size && grow() < 0)
        return; /* no memory: the question goes to Python, as without this */
    for (i = slot_of(ino); slots[i] != EMPTY && slots[i] != GONE; i = (i + 1) & (size - 1))
        ;
    if (slots[i] == EMPTY)
        used++;
    slots[i] = ino;
}

static void discard(uint64_t ino)
{
    size_t i;
    if (size == 0)
        return;
    for (i = slot_of(ino); slots[i] != EMPTY; i = (i + 1) & (size - 1)) {
        if (slots[i] == ino) {
            slots[i] = GONE;
            return;
        }
    }
}

static void hook_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size_)
{
    if (strcmp(name, CAPS_NAME) == 0 && contains(ino)) {
        fuse_reply_err(req, ENODATA);
        requests_answered = 1;
        return;
    }
    inner_getxattr(req, ino, name, size_);
}

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->getxattr == NULL)
        return -1;
    inner_getxattr = ops->getxattr;
    ops->getxattr = hook_getxattr;
    return 0;
}

static PyObject *caps_known(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int absent;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kp", &ino, &absent))
        return NULL;
    if (ino == EMPTY || ino == GONE)
        Py_RETURN_NONE;
    if (absent)
        add(ino);
    else
        discard(ino);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"caps_known", caps_known, METH_VARARGS,
     "caps_known(ino, absent): whether the inode surely has no security.capability "
     "(False: ask the daemon again)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature caps_feature = {"caps", wrap, NULL, NULL, methods};
