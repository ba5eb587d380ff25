/*
 * OPEN answered in C, for reading a lower-layer file the daemon has opened before.
 *
 * Starting a program opens its binary and its libraries every time, and a
 * build or a tar reads the same files again and again; each OPEN costs a full
 * trip through the Python session loop, and its RELEASE the daemon's
 * bookkeeping, which is most of what a read-mostly workload costs it. Yet for a
 * file in a lower layer, opened for reading, the daemon's answer is always the
 * same: open that file read-only (without touching its atime when it may),
 * keep the page cache, and file the handle. So once the Python side has
 * answered such an open by those rules, it arms the inode here (arm: the
 * layer's root fd and the path below it), and the next read-only opens of it
 * are answered here the same way. Their handles stay here: READ is served from
 * their fd (ops.c), and their RELEASE closes it here (release.c). Only when the
 * Python side needs one (a READ that needs the disk, an fsync) does it take it
 * over (claim), and it takes them all (claim_all) before a request that may
 * change the layers: a copy-up must move every open file of its inode to the
 * upper copy.
 *
 * What makes this safe is when the Python side arms and disarms: it arms only
 * while no request that may change the layers is in progress, and before it
 * starts one it disarms every inode (disarm_all). So an inode is armed only
 * while its data is where it was when it was armed. An inode whose node is
 * dropped is disarmed (its number could come to mean another file). Anything
 * not armed, not read-only, or that fails here (an error, or a symlink where
 * the path was: openat2 refuses to follow one) goes to pyfuse3 as before, which
 * answers with the daemon's own errors.
 *
 * GETATTR of an armed inode is answered here too when the owners are shown as
 * stored (no id mapping): the daemon's answer is the lower file's own stat with
 * the node id as st_ino (ino.c rewrites it as for the daemon's replies). The
 * kernel asks again after every read from the daemon (the atime may have moved),
 * so a tar or a program's start would otherwise send one to Python per file.
 *
 * Directories are armed for GETATTR only (arm_dir), in whichever layer their
 * topmost part is, each time the daemon gives their attributes (a lookup, a
 * listing, a GETATTR), under the same rule: never while a request that may
 * change the layers is in progress, all disarmed when one starts. The answer is
 * the real directory's stat, with nlink 1 where the daemon shows 1 (a merged
 * directory). The kernel asks after every listing of a directory (its atime may
 * have moved), so a walk of a tree read before sends one per directory.
 *
 * Handles made here have the top bit of their low half set; the daemon's never
 * do (unionfs.overlay.files), so the two never meet.
 */
#include "hook.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "u64map.h"

#define C_HANDLE 0x80000000ULL
/* What the daemon leaves out of the flags it opens a real file with (files.py). */
#define DROPPED (O_CREAT | O_EXCL | O_NOCTTY | O_APPEND | O_DIRECT)
/* The flags open(2) knows. The kernel's FUSE module passes on bits of its own too
   (0x20 for an exec); open(2) ignores those, openat2 refuses them (EINVAL). */
#define OPEN_FLAGS                                                                           \
    (O_ACCMODE | O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_APPEND | O_NONBLOCK | O_DSYNC |  \
     O_SYNC | FASYNC | O_DIRECT | O_LARGEFILE | O_DIRECTORY | O_NOFOLLOW | O_NOATIME |      \
     O_CLOEXEC)

struct armed {
    int dirfd;      /* the layer's root (O_PATH), owned by the Python side */
    int dir;        /* a directory: GETATTR only */
    int nlink_one;  /* a directory shown with nlink 1 */
    char path[];    /* below it */
};

struct handle {
    uint64_t ino;
    int fd, flags;
};

static void (*inner_open)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_getattr)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static int wrapped, on;
static int attrs_here;      /* configure_opens(on, attr_timeout): GETATTR too */
static double attr_timeout; /* what the daemon gives with its attributes */
static struct u64map armed;   /* ino -> struct armed * */
static struct u64map handles; /* fh -> struct handle *: answered here, not claimed */
static uint64_t next_fh;
static unsigned long long opens_served, attrs_served;

static int open_armed(const struct armed *a, int flags)
{
    struct open_how how;
    int fd;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)((flags & OPEN_FLAGS & ~DROPPED) | O_NOFOLLOW | O_CLOEXEC);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    /* O_NOATIME needs ownership or CAP_FOWNER: without, just open (layers.py). */
    how.flags |= O_NOATIME;
    fd = (int)syscall(SYS_openat2, a->dirfd, a->path, &how, sizeof(how));
    if (fd >= 0 || errno != EPERM)
        return fd;
    how.flags &= ~(uint64_t)O_NOATIME;
    return (int)syscall(SYS_openat2, a->dirfd, a->path, &how, sizeof(how));
}

static void hook_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    const struct armed *a;
    struct open_how how;
    struct stat st;
    int fd, res;
    if (!on || !attrs_here ||
        (a = (const struct armed *)(uintptr_t)u64map_get(&armed, ino, 0)) == NULL)
        goto python;
    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_NOFOLLOW | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    fd = (int)syscall(SYS_openat2, a->dirfd, a->path, &how, sizeof(how));
    if (fd < 0)
        goto python;
    res = fstat(fd, &st);
    close(fd);
    if (res < 0 || (a->dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)))
        goto python;
    if (a->nlink_one)
        st.st_nlink = 1;
    st.st_ino = ino;
    fuse_reply_attr(req, &st, attr_timeout);
    requests_answered = 1;
    attrs_served++;
    return;
python:
    inner_getattr(req, ino, fi);
}

static uint64_t new_handle(void)
{
    uint64_t fh;
    do
        fh = C_HANDLE | (next_fh++ & (C_HANDLE - 1));
    while (ops_fd_of(fh) >= 0); /* only after 2**31 opens, one of them still open */
    return fh;
}

static void hook_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    const struct armed *a;
    struct handle *h;
    uint64_t fh;
    if (!on || (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & (O_TRUNC | O_CREAT)))
        goto python;
    a = (const struct armed *)(uintptr_t)u64map_get(&armed, ino, 0);
    if (a == NULL || a->dir || (h = malloc(sizeof(*h))) == NULL)
        goto python;
    h->fd = open_armed(a, fi->flags);
    if (h->fd < 0) {
        free(h);
        goto python; /* the daemon says what went wrong, its own way */
    }
    h->ino = ino;
    h->flags = fi->flags;
    fh = new_handle();
    if (ops_set_fd(fh, h->fd) < 0 || u64map_put(&handles, fh, (uint64_t)(uintptr_t)h) < 0) {
        ops_set_fd(fh, -1);
        close(h->fd);
        free(h);
        goto python;
    }
    fi->fh = fh;
    fi->keep_cache = 1; /* a lower file: its data never changes under the cache */
    fi->direct_io = 0;
    fi->nonseekable = 0;
    if (fuse_reply_open(req, fi) != 0) {
        /* The kernel has no handle (the caller was interrupted): no RELEASE will come. */
        opens_release(fh);
        requests_answered = 1;
        return;
    }
    requests_answered = 1;
    opens_served++;
    return;
python:
    inner_open(req, ino, fi);
}

int opens_release(uint64_t fh)
{
    struct handle *h;
    if (!(fh & C_HANDLE))
        return 0;
    h = (struct handle *)(uintptr_t)u64map_get(&handles, fh, 0);
    if (h == NULL)
        return 0; /* claimed: the Python side closes it */
    u64map_del(&handles, fh);
    ops_set_fd(fh, -1);
    close(h->fd);
    free(h);
    return 1;
}

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->open == NULL || ops->getattr == NULL)
        return -1;
    inner_open = ops->open;
    ops->open = hook_open;
    inner_getattr = ops->getattr;
    ops->getattr = hook_getattr;
    wrapped = 1;
    return 0;
}

static void drop(uint64_t ino)
{
    struct armed *a = (struct armed *)(uintptr_t)u64map_get(&armed, ino, 0);
    if (a != NULL) {
        u64map_del(&armed, ino);
        free(a);
    }
}

static PyObject *arm_as(unsigned long long ino, int dirfd, const char *path, Py_ssize_t len,
                        int dir, int nlink_one)
{
    struct armed *a;
    if (!on || len == 0 || (size_t)len != strlen(path)) /* the root, or a NUL in the name */
        Py_RETURN_FALSE;
    if (dir && !attrs_here)
        Py_RETURN_FALSE; /* a directory is armed for its GETATTR only */
    drop(ino);
    a = malloc(sizeof(*a) + (size_t)len + 1);
    if (a == NULL)
        return PyErr_NoMemory();
    a->dirfd = dirfd;
    a->dir = dir;
    a->nlink_one = nlink_one;
    memcpy(a->path, path, (size_t)len + 1);
    if (u64map_put(&armed, ino, (uint64_t)(uintptr_t)a) < 0) {
        free(a);
        return PyErr_NoMemory();
    }
    Py_RETURN_TRUE;
}

static PyObject *arm(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int dirfd;
    const char *path;
    Py_ssize_t len;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kiy#", &ino, &dirfd, &path, &len))
        return NULL;
    return arm_as(ino, dirfd, path, len, 0, 0);
}

static PyObject *arm_dir(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int dirfd, nlink_one;
    const char *path;
    Py_ssize_t len;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kiy#p", &ino, &dirfd, &path, &len, &nlink_one))
        return NULL;
    return arm_as(ino, dirfd, path, len, 1, nlink_one);
}

static PyObject *disarm(PyObject *self, PyObject *arg)
{
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    (void)self;
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    drop(ino);
    Py_RETURN_NONE;
}

static void drop_all(void)
{
    size_t i;
    for (i = 0; i < armed.cap; i++)
        if (armed.keys[i] != 0)
            free((void *)(uintptr_t)armed.values[i]);
    free(armed.keys);
    free(armed.values);
    memset(&armed, 0, sizeof(armed));
}

static PyObject *disarm_all(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (armed.used > 0)
        drop_all();
    Py_RETURN_NONE;
}

static PyObject *armed_count(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSize_t(armed.used);
}

static PyObject *handle_tuple(uint64_t fh, const struct handle *h)
{
    return Py_BuildValue("(KKii)", (unsigned long long)fh, (unsigned long long)h->ino, h->fd,
                         h->flags);
}

static PyObject *claim(PyObject *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    struct handle *h;
    PyObject *out;
    (void)self;
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    h = (struct handle *)(uintptr_t)u64map_get(&handles, fh, 0);
    if (h == NULL)
        Py_RETURN_NONE;
    out = handle_tuple(fh, h);
    if (out != NULL) {
        u64map_del(&handles, fh);
        free(h);
    }
    return out;
}

static PyObject *claim_all(PyObject *self, PyObject *unused)
{
    PyObject *out;
    size_t i;
    (void)self;
    (void)unused;
    out = PyList_New(0);
    if (out == NULL || handles.used == 0)
        return out;
    for (i = 0; i < handles.cap; i++) {
        PyObject *t;
        if (handles.keys[i] == 0)
            continue;
        t = handle_tuple(handles.keys[i], (const struct handle *)(uintptr_t)handles.values[i]);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    for (i = 0; i < handles.cap; i++)
        if (handles.keys[i] != 0)
            free((void *)(uintptr_t)handles.values[i]);
    free(handles.keys);
    free(handles.values);
    memset(&handles, 0, sizeof(handles));
    return out;
}

static PyObject *unclaimed(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSize_t(handles.used);
}

static PyObject *configure_opens(PyObject *self, PyObject *args)
{
    int want, attrs;
    double timeout;
    (void)self;
    if (!PyArg_ParseTuple(args, "ppd", &want, &attrs, &timeout))
        return NULL;
    attrs_here = attrs;
    attr_timeout = timeout;
    on = want && wrapped;
    if (!on)
        drop_all();
    return PyBool_FromLong(on);
}

static PyObject *opens_served_here(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KK)", opens_served, attrs_served);
}

static PyMethodDef methods[] = {
    {"arm", arm, METH_VARARGS,
     "arm(ino, dirfd, path): answer read-only opens of ino here, by opening path below "
     "dirfd; False when opens are not answered here."},
    {"arm_dir", arm_dir, METH_VARARGS,
     "arm_dir(ino, dirfd, path, nlink_one): answer GETATTR of the directory ino here, from "
     "path below dirfd (with nlink 1 if nlink_one); False when not answered here."},
    {"disarm", disarm, METH_O, "disarm(ino): opens of ino go to Python again."},
    {"disarm_all", disarm_all, METH_NOARGS, "Every open goes to Python until armed again."},
    {"armed_count", armed_count, METH_NOARGS, "How many inodes are armed."},
    {"claim", claim, METH_O,
     "claim(fh): (fh, ino, fd, flags) of a handle answered here, which the caller now "
     "owns (its RELEASE then goes to it), or None."},
    {"claim_all", claim_all, METH_NOARGS, "claim() of every handle answered here."},
    {"unclaimed", unclaimed, METH_NOARGS, "How many handles answered here are not claimed."},
    {"configure_opens", configure_opens, METH_VARARGS,
     "configure_opens(on, attrs, attr_timeout): answer opens of armed inodes here (off: "
     "disarm all), and with attrs their GETATTR, valid for attr_timeout; returns whether "
     "opens are."},
    {"opens_served", opens_served_here, METH_NOARGS,
     "How many OPENs and GETATTRs were answered here: (opens, getattrs)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature opens_feature = {"opens", wrap, NULL, NULL, methods};
