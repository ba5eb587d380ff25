/*
 * The raw request tap (requests.c): what libfuse drops from a request, noted
 * before it dispatches it, for the features that need it.
 */
#ifndef UNIONFS_REQUESTS_H
#define UNIONFS_REQUESTS_H

#include <stdint.h>

struct fuse_buf;

/* A feature that reads a request's arguments: called with each request in
   memory before libfuse dispatches it (set before the mount; one at a time). */
extern void (*requests_peek)(const struct fuse_buf *buf);

#endif
