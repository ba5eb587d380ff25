/*
 * FUSE passthrough: reads, writes and mmap of an open file served by the
 * kernel straight from a backing file, with no round trip to the daemon.
 *
 * The kernel (6.9+, CONFIG_FUSE_PASSTHROUGH) and libfuse 3.17 negotiate it in
 * INIT (FUSE_CAP_PASSTHROUGH, with the stacking depth allowed for backing
 * files). The daemon then registers an open fd of the real file with the
 * FUSE device (FUSE_DEV_IOC_BACKING_OPEN, which needs CAP_SYS_ADMIN) and gets
 * a backing id, and an OPEN or CREATE reply that carries that id opens the
 * FUSE file in passthrough mode. pyfuse3 neither negotiates this nor lets a
 * reply carry an id, so:
 *
 *   - after pyfuse3's init, this asks for the capability (configure first);
 *   - backing_open/backing_close do the ioctls on the session's device fd;
 *   - fuse_reply_open is defined here, fuse_reply_create in ino.c (bound in
 *     place of libfuse's like fuse_session_new, see session.c): a reply whose file
 *     handle carries a backing id in its upper 32 bits (the Python side puts
 *     it there, see unionfs/fuse/passthrough.py) goes to libfuse with that
 *     id in fuse_file_info.backing_id, which libfuse turns into
 *     FOPEN_PASSTHROUGH. The handle stays the same for every later request.
 *
 * Which opens may be passed through is decided in Python; the kernel also
 * demands that an inode's open files are either all passed through, with one
 * and the same backing id, or none (else the open fails with EIO).
 *
 * Compiled against libfuse headers older than 3.17 this feature is a stub
 * that reports passthrough as unavailable.
 */
#include "hook.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

static int wanted;      /* configure_passthrough(True, depth) before the mount */
static int capable;     /* the kernel offered it in INIT */
static int active;      /* and it was asked for */
static unsigned stack_depth;

#ifdef FUSE_CAP_PASSTHROUGH

/* From the kernel's UAPI 7.40 (linux/fuse.h); Debian 12's headers are 7.38. */
struct backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define BACKING_OPEN _IOW(229, 1, struct backing_map)
#define BACKING_CLOSE _IOW(229, 2, uint32_t)

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *,
                               const struct fuse_file_info *);

/* Decided before pyfuse3's init handler, which asks the module what is on. The
   kernel would refuse passthrough under its write-back cache: the Python side never
   asks for both (unionfs.fuse.mount). */
static void before_init(struct fuse_conn_info *conn)
{
    capable = (conn->capable & FUSE_CAP_PASSTHROUGH) != 0;
    active = wanted && capable;
}

static void after_init(struct fuse_conn_info *conn)
{
    if (!active)
        return;
    conn->want |= FUSE_CAP_PASSTHROUGH;
    conn->max_backing_stack_depth = stack_depth;
}

/* The reply's file info with the backing id from the handle's upper half, or fi. */
const struct fuse_file_info *passthrough_reply_info(const struct fuse_file_info *fi,
                                                    struct fuse_file_info *copy)
{
    uint32_t id = (uint32_t)(fi->fh >> 32);
    if (id == 0 || !active)
        return fi;
    memcpy(copy, fi, sizeof(*copy));
    copy->backing_id = (int32_t)id;
    return copy;
}

int unionfs_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
    __asm__("fuse_reply_open") __attribute__((visibility("default")));

int unionfs_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static reply_open_fn next;
    struct fuse_file_info copy;
    if (next == NULL)
        next = (reply_open_fn)dlvsym(RTLD_NEXT, "fuse_reply_open", "FUSE_3.0");
    return next(req, passthrough_reply_info(fi, &copy));
}

static int device_fd(void)
{
    struct fuse_session *se = hook_session();
    if (se == NULL || !active) {
        PyErr_SetString(PyExc_RuntimeError, "FUSE passthrough is not active");
        return -1;
    }
    return fuse_session_fd(se);
}

/* The ioctl on the session's device: a backing id, or -1 with errno. */
static int open_backing(int dev, int fd)
{
    struct backing_map map;
    int id;
    memset(&map, 0, sizeof(map));
    map.fd = (int32_t)fd;
    id = ioctl(dev, BACKING_OPEN, &map);
    if (id == 0) {
        errno = EIO;
        return -1;
    }
    return id;
}

int passthrough_backing(int fd)
{
    struct fuse_session *se = hook_session();
    if (se == NULL || !active)
        return 0;
    return open_backing(fuse_session_fd(se), fd);
}

void passthrough_unback(uint32_t id)
{
    struct fuse_session *se = hook_session();
    if (se != NULL && active && id != 0)
        ioctl(fuse_session_fd(se), BACKING_CLOSE, &id); /* gone with the session otherwise */
}

static PyObject *backing_open(PyObject *self, PyObject *arg)
{
    int dev, id;
    long fd = PyLong_AsLong(arg);
    (void)self;
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if ((dev = device_fd()) < 0)
        return NULL;
    if ((id = open_backing(dev, (int)fd)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(id);
}

static PyObject *backing_close(PyObject *self, PyObject *arg)
{
    uint32_t id;
    int dev;
    long value = PyLong_AsLong(arg);
    (void)self;
    if (value == -1 && PyErr_Occurred())
        return NULL;
    if ((dev = device_fd()) < 0)
        return NULL;
    id = (uint32_t)value;
    if (ioctl(dev, BACKING_CLOSE, &id) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

#define BUILT_WITH_PASSTHROUGH 1

#else /* libfuse < 3.17 */

#define before_init NULL
#define after_init NULL

const struct fuse_file_info *passthrough_reply_info(const struct fuse_file_info *fi,
                                                    struct fuse_file_info *copy)
{
    (void)copy;
    return fi;
}

int passthrough_backing(int fd)
{
    (void)fd;
    return 0;
}

void passthrough_unback(uint32_t id)
{
    (void)id;
}

static PyObject *backing_open(PyObject *self, PyObject *arg)
{
    (void)self;
    (void)arg;
    PyErr_SetString(PyExc_RuntimeError, "built against libfuse < 3.17: no passthrough");
    return NULL;
}

static PyObject *backing_close(PyObject *self, PyObject *arg)
{
    return backing_open(self, arg);
}

#define BUILT_WITH_PASSTHROUGH 0

#endif

static PyObject *configure_passthrough(PyObject *self, PyObject *args)
{
    int on;
    unsigned depth;
    (void)self;
    if (!PyArg_ParseTuple(args, "pI", &on, &depth))
        return NULL;
    wanted = on;
    stack_depth = depth;
    Py_RETURN_NONE;
}

static PyObject *passthrough_state(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:O,s:O,s:O}", "built", BUILT_WITH_PASSTHROUGH ? Py_True : Py_False,
                         "capable", capable ? Py_True : Py_False, "active",
                         active ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"configure_passthrough", configure_passthrough, METH_VARARGS,
     "configure_passthrough(on, max_backing_stack_depth): ask for passthrough in INIT "
     "(call before mounting)."},
    {"passthrough_state", passthrough_state, METH_NOARGS,
     "{'built': compiled with libfuse >= 3.17, 'capable': the kernel offers it, 'active': "
     "negotiated} (valid once the kernel's INIT arrived)."},
    {"backing_open", backing_open, METH_O, "backing_open(fd) -> backing id (needs CAP_SYS_ADMIN)."},
    {"backing_close", backing_close, METH_O, "backing_close(backing id)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature passthrough_feature = {"passthrough", NULL, before_init, after_init,
                                                 methods};
