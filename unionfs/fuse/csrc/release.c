/*
 * RELEASE answered in C: the reply goes back at once, the daemon's clean-up
 * follows in batches.
 *
 * Every close(2) of a file costs a RELEASE request, as many as there are
 * opens, and through pyfuse3 each costs a full trip through the Python session
 * loop, though nobody waits for it: the kernel sends RELEASE in the background
 * and ignores the answer. So this wraps the release entry: it answers the
 * request right away and queues the file handle; the Python side takes the
 * queue (take_released) when it next opens a file, now and then, and at
 * unmount, and closes what the handles held. A handle the kernel has released
 * is never used in a request again, so until then only the daemon's real fd
 * lives on a little longer.
 */
#include "hook.h"

#include <stdint.h>
#include <stdlib.h>

static void (*inner_release)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static uint64_t *queue;
static size_t queued, capacity;
static int wanted = 1; /* configure_release(False) before the mount serves them in Python */

static void hook_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (opens_release(fi->fh)) { /* opened in C and never needed by the daemon */
        fuse_reply_err(req, 0);
        requests_answered = 1;
        return;
    }
    if (!wanted) {
        inner_release(req, ino, fi);
        return;
    }
    if (queued == capacity) {
        size_t n = capacity ? capacity * 2 : 256;
        uint64_t *q = realloc(queue, n * sizeof(*q));
        if (q == NULL) {
            inner_release(req, ino, fi); /* no memory: the ordinary way */
            return;
        }
        queue = q;
        capacity = n;
    }
    queue[queued++] = fi->fh;
    fuse_reply_err(req, 0);
    requests_answered = 1;
}

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->release == NULL)
        return -1;
    inner_release = ops->release;
    ops->release = hook_release;
    return 0;
}

static PyObject *take_released(PyObject *self, PyObject *unused)
{
    PyObject *out = PyList_New((Py_ssize_t)queued);
    size_t i;
    (void)self;
    (void)unused;
    if (out == NULL)
        return NULL;
    for (i = 0; i < queued; i++) {
        PyObject *fh = PyLong_FromUnsignedLongLong(queue[i]);
        if (fh == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, fh);
    }
    queued = 0;
    return out;
}

static PyObject *configure_release(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    (void)self;
    if (on < 0)
        return NULL;
    wanted = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"take_released", take_released, METH_NOARGS,
     "The file handles the kernel released since the last call (answered already)."},
    {"configure_release", configure_release, METH_O,
     "configure_release(False): leave RELEASE to pyfuse3 (call before mounting)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature release_feature = {"release", wrap, NULL, NULL, methods};
