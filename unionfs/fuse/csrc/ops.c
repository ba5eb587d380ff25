/*
 * File operations pyfuse3 does not serve, and the flags of setxattr it withholds.
 *
 * fallocate, lseek (SEEK_DATA/SEEK_HOLE) and copy_file_range act on the real
 * file behind a FUSE file handle, as the kernel overlay passes them to its
 * real file. pyfuse3 has no handlers for them (the kernel would then fall
 * back: no fallocate at all, every file one data extent, copies read and
 * written through the daemon). The Python side keeps here, per file handle,
 * the real fd it reads and writes (set_fd); the requests are served right
 * here from that fd, without Python. The ones that may take long (fallocate,
 * copy_file_range) run on a dup of the fd in a thread of their own, so the
 * event loop goes on and a release of the handle meanwhile does no harm;
 * fuse_session_destroy waits for them, so no reply outlives the session.
 *
 * READ is served here too, from the same fd, when the data is in the page cache
 * (preadv2 with RWF_NOWAIT) or the read ends at the end of the file: the same
 * read the Python side would make (Files.read), without a trip through Python.
 * Anything else (a read that needs the disk, an error) goes to Python as
 * before, which reads what needs the disk in a worker thread. It is off while
 * requests are logged (-d) or traced, so those see every read.
 *
 * O_TMPFILE (libfuse 3.17 and later) goes to pyfuse3's create handler under a
 * name no real entry has (see hook_tmpfile).
 *
 * setxattr: pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself, with a getxattr
 * of its own, and never passes them on, while the kernel overlay copies up
 * first and lets the upper filesystem fail. The wrapper hands pyfuse3 the
 * request without flags and the value with the flags in front of it (one
 * byte); the Python side, told that this feature is on, takes them off again.
 */
#include "hook.h" /* first: Python.h defines _GNU_SOURCE */
#include "u64map.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

static struct u64map fds; /* file handle -> real fd + 1 */
static void (*inner_read)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static int reads_here; /* configure_reads(True) */
static unsigned long long reads_served; /* READs answered here */
static char *read_buf; /* the session loop is one thread: one buffer serves every read */
static size_t read_buf_size;
static void (*inner_setxattr)(fuse_req_t, fuse_ino_t, const char *, const char *, size_t, int);
static int wrapped;

/* Threads still working on a request; fuse_session_destroy waits for them. */
static pthread_mutex_t busy_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t busy_done = PTHREAD_COND_INITIALIZER;
static int busy;

/* The handle's low half: a FUSE file handle may carry more above it (a backing id). */
static int fd_of(const struct fuse_file_info *fi)
{
    return (int)u64map_get(&fds, fi->fh & 0xffffffffULL, 0) - 1;
}

static void hook_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                          size_t size, int flags)
{
    char *tagged;
    if (flags & ~(XATTR_CREATE | XATTR_REPLACE)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    tagged = malloc(size + 1);
    if (tagged == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    tagged[0] = (char)flags;
    memcpy(tagged + 1, value, size);
    /* pyfuse3 copies the value into a bytes object before it returns. */
    inner_setxattr(req, ino, name, tagged, size + 1, 0);
    free(tagged);
}

/* -- work in threads of their own ------------------------------------------------ */

struct job {
    fuse_req_t req;
    int fd, fd_out;
    int mode;
    off_t off, off_out;
    size_t len;
};

static void job_end(struct job *job)
{
    if (job->fd >= 0)
        close(job->fd);
    if (job->fd_out >= 0)
        close(job->fd_out);
    free(job);
    pthread_mutex_lock(&busy_lock);
    if (--busy == 0)
        pthread_cond_broadcast(&busy_done);
    pthread_mutex_unlock(&busy_lock);
}

static void *fallocate_job(void *arg)
{
    struct job *job = arg;
    int err = fallocate(job->fd, job->mode, job->off, (off_t)job->len) == 0 ? 0 : errno;
    fuse_reply_err(job->req, err);
    job_end(job);
    return NULL;
}

static void *copy_job(void *arg)
{
    struct job *job = arg;
    loff_t in = job->off, out = job->off_out;
    size_t done = 0;
    int err = 0;
    while (done < job->len) {
        ssize_t n = copy_file_range(job->fd, &in, job->fd_out, &out, job->len - done, 0);
        if (n < 0) {
            err = errno;
            break;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (done > 0 || err == 0)
        fuse_reply_write(job->req, done);
    else
        fuse_reply_err(job->req, err); /* EXDEV: the kernel copies through the daemon */
    job_end(job);
    return NULL;
}

/* Run fn(job) in a detached thread; on failure answer the error. */
static void start(struct job *job, void *(*fn)(void *))
{
    pthread_t thread;
    pthread_attr_t attr;
    int err;
    pthread_mutex_lock(&busy_lock);
    busy++;
    pthread_mutex_unlock(&busy_lock);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    err = pthread_create(&thread, &attr, fn, job);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        fuse_reply_err(job->req, err);
        job_end(job);
    }
}

static struct job *new_job(fuse_req_t req, int fd, int fd_out)
{
    struct job *job = calloc(1, sizeof(*job));
    if (job == NULL)
        return NULL;
    job->req = req;
    job->fd = fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 3);
    job->fd_out = fd_out < 0 ? -1 : fcntl(fd_out, F_DUPFD_CLOEXEC, 3);
    if ((fd >= 0 && job->fd < 0) || (fd_out >= 0 && job->fd_out < 0)) {
        if (job->fd >= 0)
            close(job->fd);
        if (job->fd_out >= 0)
            close(job->fd_out);
        free(job);
        return NULL;
    }
    return job;
}

static void hook_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    int fd = fd_of(fi);
    struct job *job;
    (void)ino;
    if (fd < 0) {
        fuse_reply_err(req, EBADF);
        return;
    }
    job = new_job(req, fd, -1);
    if (job == NULL) {
        fuse_reply_err(req, errno ? errno : ENOMEM);
        return;
    }
    job->mode = mode;
    job->off = offset;
    job->len = (size_t)length;
    start(job, fallocate_job);
}

static void hook_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                                 struct fuse_file_info *fi_in, fuse_ino_t ino_out, off_t off_out,
                                 struct fuse_file_info *fi_out, size_t len, int flags)
{
    int in = fd_of(fi_in), out = fd_of(fi_out);
    struct job *job;
    (void)ino_in;
    (void)ino_out;
    if (in < 0 || out < 0) {
        fuse_reply_err(req, EBADF);
        return;
    }
    if (flags != 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    job = new_job(req, in, out);
    if (job == NULL) {
        fuse_reply_err(req, errno ? errno : ENOMEM);
        return;
    }
    job->off = off_in;
    job->off_out = off_out;
    /* The reply's count is 32 bits (fuse_write_out.size): older kernels pass longer
       requests on, and a count taken modulo 2^32 would read as a short copy or EOF. A
       shorter copy is always allowed. */
    job->len = len > 0xFFFFF000UL ? 0xFFFFF000UL : len;
    start(job, copy_job);
}

static void hook_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    int fd = fd_of(fi);
    off_t res;
    (void)ino;
    if (fd < 0) {
        fuse_reply_err(req, EBADF);
        return;
    }
    /* The real fd is only ever read and written at explicit offsets: its own
       position is free to move. Finding extents is quick: no thread. */
    res = lseek(fd, off, whence);
    if (res < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_lseek(req, res);
    requests_answered = 1;
}

/* -- READ ---------------------------------------------------------------------------- */

static int read_buffer(size_t size)
{
    char *buf;
    if (size <= read_buf_size)
        return 0;
    buf = realloc(read_buf, size);
    if (buf == NULL)
        return -1;
    read_buf = buf;
    read_buf_size = size;
    return 0;
}

static void hook_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    int fd = reads_here ? fd_of(fi) : -1;
    if (fd >= 0 && read_buffer(size) == 0) {
        struct iovec iov = {read_buf, size};
        ssize_t n = preadv2(fd, &iov, 1, off, RWF_NOWAIT);
        struct stat st;
        /* All of it from the page cache, or all there is: as Files.read answers. */
        if (n == (ssize_t)size || (n >= 0 && fstat(fd, &st) == 0 && off + n >= st.st_size)) {
            fuse_reply_buf(req, read_buf, (size_t)n);
            requests_answered = 1;
            reads_served++;
            return;
        }
    }
    inner_read(req, ino, size, off, fi); /* the disk, an error, or reads not served here */
}

__attribute__((visibility("default"))) void fuse_session_destroy(struct fuse_session *se)
{
    static void (*real)(struct fuse_session *);
    if (real == NULL) {
        void *fn = dlvsym(RTLD_NEXT, "fuse_session_destroy", "FUSE_3.0");
        real = (void (*)(struct fuse_session *))(fn != NULL ? fn
                                                           : dlsym(RTLD_NEXT, "fuse_session_destroy"));
    }
    pthread_mutex_lock(&busy_lock);
    while (busy > 0)
        pthread_cond_wait(&busy_done, &busy_lock);
    pthread_mutex_unlock(&busy_lock);
    hook_session_gone(se);
    real(se);
}

#if FUSE_MAKE_VERSION(FUSE_MAJOR_VERSION, FUSE_MINOR_VERSION) >= FUSE_MAKE_VERSION(3, 17)
/* O_TMPFILE (FUSE_TMPFILE, served by libfuse 3.17): handed to pyfuse3's create
   handler under a name no real entry has (a slash), which the Python side knows
   (operations.TMPFILE_NAME); libfuse expects the same reply as for create. */
#define HOOK_HAS_TMPFILE 1
static void (*inner_create)(fuse_req_t, fuse_ino_t, const char *, mode_t,
                            struct fuse_file_info *);

static void hook_tmpfile(fuse_req_t req, fuse_ino_t parent, mode_t mode,
                         struct fuse_file_info *fi)
{
    inner_create(req, parent, "/", mode, fi);
}
#endif

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->setxattr == NULL)
        return -1;
#ifdef HOOK_HAS_TMPFILE
    if (ops->create != NULL) {
        inner_create = ops->create;
        ops->tmpfile = hook_tmpfile;
    }
#endif
    inner_setxattr = ops->setxattr;
    ops->setxattr = hook_setxattr;
    if (ops->read != NULL) {
        inner_read = ops->read;
        ops->read = hook_read;
    }
    ops->fallocate = hook_fallocate;
    ops->copy_file_range = hook_copy_file_range;
    ops->lseek = hook_lseek;
    wrapped = 1;
    return 0;
}

int ops_fd_of(uint64_t fh)
{
    return (int)u64map_get(&fds, fh & 0xffffffffULL, 0) - 1;
}

int ops_set_fd(uint64_t fh, int fd)
{
    fh &= 0xffffffffULL; /* keyed by the low half, as fd_of looks it up */
    if (fd < 0) {
        u64map_del(&fds, fh);
        return 0;
    }
    return u64map_put(&fds, fh, (uint64_t)fd + 1);
}

static PyObject *set_fd(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    int fd;
    (void)self;
    if (!PyArg_ParseTuple(args, "Ki", &fh, &fd))
        return NULL;
    if (ops_set_fd(fh, fd) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *configure_reads(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    (void)self;
    if (on < 0)
        return NULL;
    reads_here = on && inner_read != NULL;
    Py_RETURN_NONE;
}

static PyObject *reads_served_here(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong(reads_served);
}

static PyObject *ops_active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped);
}

/* The kernel's FUSE module takes the caller's umask off a new entry's mode before
   sending it unless asked not to; the kernel overlay leaves it on under a directory
   with a default ACL (the ACL gives the mode then). So the daemon takes it off itself
   (it gets the umask with each CREATE, MKDIR and MKNOD), where it applies. */
static void after_init(struct fuse_conn_info *conn)
{
    if (conn->capable & FUSE_CAP_DONT_MASK)
        conn->want |= FUSE_CAP_DONT_MASK;
}

static PyMethodDef methods[] = {
    {"set_fd", set_fd, METH_VARARGS,
     "set_fd(fh, fd): the real fd of file handle fh (fd < 0: the handle is gone)."},
    {"configure_reads", configure_reads, METH_O,
     "configure_reads(on): serve READ of page-cached data here (off: every READ to Python)."},
    {"reads_served", reads_served_here, METH_NOARGS, "How many READs were answered here."},
    {"ops_active", ops_active, METH_NOARGS,
     "Whether setxattr values carry their flags in front, and fallocate, lseek and "
     "copy_file_range are served from the fds given by set_fd."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature ops_feature = {"ops", wrap, NULL, after_init, methods};
