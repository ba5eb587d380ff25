/*
 * Report an st_ino that is not the FUSE node id.
 *
 * FUSE names an inode by its node id and shows whatever attr.ino says as its
 * st_ino; the two may differ (the kernel copies attr.ino into i_ino on every
 * attribute reply). pyfuse3 fills both from EntryAttributes.st_ino, so alone
 * it cannot show two inodes with one st_ino, which is what the kernel overlay
 * shows for hard links inside a lower layer (one lower inode, two overlay
 * inodes that copy-up will split). The Python side keeps here, per node id, the
 * st_ino to show when it is not the node id (set_ino), and this file defines
 * the libfuse reply functions pyfuse3 calls (fuse_reply_entry, fuse_reply_create,
 * fuse_reply_attr, fuse_add_direntry_plus): loaded with RTLD_GLOBAL before
 * pyfuse3, they are what its calls bind to, as fuse_session_new is (session.c).
 * Each rewrites the reported st_ino from the table and calls libfuse's own.
 *
 * A node id with no entry is reported as itself, so an empty table changes
 * nothing; replies() counts the rewrites, which tells the tests that the
 * interposition took.
 */
#include "hook.h" /* first: Python.h defines _GNU_SOURCE, which dlvsym and RTLD_NEXT need */
#include "u64map.h"

#include <dlfcn.h>
#include <string.h>

static struct u64map shown; /* node id -> st_ino to report */
static unsigned long rewritten;

static void *next_fn(const char *name)
{
    void *fn = dlvsym(RTLD_NEXT, name, "FUSE_3.0");
    return fn != NULL ? fn : dlsym(RTLD_NEXT, name);
}

/* A readdirplus entry without a node (operations.NODELESS_TAG): node id 0 tells
   the kernel to take only the name, type and number. */
#define NODELESS_TAG (0xFFFEULL << 48)
#define NODELESS_MASK (0xFFFFULL << 48)

static void fix_entry(struct fuse_entry_param *e)
{
    uint64_t ino;
    if ((e->ino & NODELESS_MASK) == NODELESS_TAG) {
        e->attr.st_ino = e->ino & ~NODELESS_MASK;
        e->ino = 0;
        rewritten++;
        return;
    }
    ino = u64map_get(&shown, e->ino, e->ino);
    if (ino != e->ino) {
        e->attr.st_ino = ino;
        rewritten++;
    }
}

#define EXPORT __attribute__((visibility("default")))

EXPORT int fuse_reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
    static int (*real)(fuse_req_t, const struct fuse_entry_param *);
    struct fuse_entry_param copy = *e;
    if (real == NULL)
        real = (int (*)(fuse_req_t, const struct fuse_entry_param *))next_fn("fuse_reply_entry");
    fix_entry(&copy);
    return real(req, &copy);
}

EXPORT int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e,
                             const struct fuse_file_info *fi)
{
    static int (*real)(fuse_req_t, const struct fuse_entry_param *, const struct fuse_file_info *);
    struct fuse_entry_param copy = *e;
    struct fuse_file_info fi_copy;
    if (real == NULL)
        real = (int (*)(fuse_req_t, const struct fuse_entry_param *,
                        const struct fuse_file_info *))next_fn("fuse_reply_create");
    fix_entry(&copy);
    return real(req, &copy, passthrough_reply_info(fi, &fi_copy)); /* passthrough.c */
}

EXPORT int fuse_reply_attr(fuse_req_t req, const struct stat *attr, double attr_timeout)
{
    static int (*real)(fuse_req_t, const struct stat *, double);
    struct stat copy = *attr;
    uint64_t ino;
    if (real == NULL)
        real = (int (*)(fuse_req_t, const struct stat *, double))next_fn("fuse_reply_attr");
    /* pyfuse3 puts the node id in st_ino of an attribute reply too. */
    ino = u64map_get(&shown, attr->st_ino, attr->st_ino);
    if (ino != (uint64_t)attr->st_ino) {
        copy.st_ino = ino;
        rewritten++;
    }
    return real(req, &copy, attr_timeout);
}

EXPORT size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                                     const struct fuse_entry_param *e, off_t off)
{
    static size_t (*real)(fuse_req_t, char *, size_t, const char *,
                          const struct fuse_entry_param *, off_t);
    struct fuse_entry_param copy = *e;
    if (real == NULL)
        real = (size_t (*)(fuse_req_t, char *, size_t, const char *,
                           const struct fuse_entry_param *, off_t))next_fn("fuse_add_direntry_plus");
    fix_entry(&copy);
    return real(req, buf, bufsize, name, &copy, off);
}

static PyObject *set_ino(PyObject *self, PyObject *args)
{
    unsigned long long node, ino;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK", &node, &ino))
        return NULL;
    if (ino == node) {
        u64map_del(&shown, node);
    } else if (u64map_put(&shown, node, ino) < 0) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *replies(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(rewritten);
}

static PyMethodDef methods[] = {
    {"set_ino", set_ino, METH_VARARGS,
     "set_ino(node, ino): report st_ino ino for node id node (ino == node: as itself)."},
    {"ino_replies", replies, METH_NOARGS, "How many replies had their st_ino rewritten."},
    {NULL, NULL, 0, NULL},
};

/* Nothing to wrap: the reply functions above take effect by being loaded first. */
const struct hook_feature ino_feature = {"ino", NULL, NULL, NULL, methods};
