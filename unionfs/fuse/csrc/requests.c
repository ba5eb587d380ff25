/*
 * The raw request tap: pyfuse3 hands every request from the kernel to
 * fuse_session_process_buf, which this file defines (bound in place of
 * libfuse's like fuse_session_new, see session.c). It counts requests by
 * opcode, lets a feature read what libfuse would drop (requests_peek:
 * killpriv.c's kill flags), and passes the request on unchanged.
 *
 * The counts cost one increment per request; the daemon logs them at unmount
 * and make bench divides its CPU time by them.
 *
 * A request a feature answers at once in C leaves nothing for pyfuse3 to await
 * (requests_answered says so). The next one, if the kernel has it queued, is
 * then read and processed right here, up to INLINE_MAX in a row, instead of
 * after a trip through pyfuse3's loop and trio's scheduler for each: the opens
 * and releases of a program's start, the cached reads of a tar, come in runs.
 * The first request that goes to pyfuse3 ends the run (pyfuse3 awaits its
 * handler once this function returns, one at a time). The run reads into the
 * buffer pyfuse3 read the first request into, which is done with once a request
 * is answered, and which libfuse sized for any request.
 *
 * When the queue is empty, the run lingers: it waits up to linger_ns (in ppoll,
 * the GIL released) for the next request before it gives the turn back. A
 * program that is starting, or reading a tree, sends its next request a few
 * dozen microseconds after each answer; waiting for it here costs the daemon no
 * CPU, where the trip back through pyfuse3's loop, trio's scheduler and epoll
 * costs it more than answering the request does. It lingers only while no
 * Python handler is in progress (python_busy, kept by the request boundary in
 * unionfs/fuse/operations.py): a handler that waits for a worker thread then
 * never waits for a linger to end. What else trio has to do (a signal's
 * handling, a timer) waits at most INLINE_MAX waits or WAIT_CAP_NS of waiting in
 * all: once runs have waited for that many requests, or that long, no run waits
 * any more and the Python side's request loop parks in trio before it reads the
 * next one (run_waited). A signal ends a wait at once. The Python side's loop
 * waits the same way after a request answered in Python (linger_for), under the
 * same counts.
 *
 * It also defines fuse_session_receive_buf, to turn EAGAIN into EINTR: the
 * Python side's request loop (unionfs/fuse/loop.py) makes the device
 * non-blocking and may let two tasks read for one request; the one that finds
 * nothing then waits again, as pyfuse3 does after EINTR, instead of failing.
 */
#include "hook.h"
#include "requests.h"

#include <dlfcn.h>
#include <linux/fuse.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <time.h>

typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);

#define N_OPCODES 64 /* FUSE opcodes are below this (CUSE_INIT aside) */

void (*requests_peek)(const struct fuse_buf *buf);
static process_buf_fn next_process_buf;
static receive_buf_fn next_receive_buf;
static unsigned long long counts[N_OPCODES];
int requests_answered;
static int inline_on; /* configure_inline(True): runs of requests answered here */
#define INLINE_MAX 64     /* requests in a row before pyfuse3's loop gets its turn */
static long linger_ns;    /* configure_inline(True, us): the wait for a next request */
static int python_busy;   /* Python handlers in progress (busy_counter) */
/* Opcodes libfuse answers by itself, with no Python handler to await (wrap): the
   IOCTL that every open(2) of Python and Perl makes (TCGETS, to see a terminal)
   gets its ENOSYS there, so a run of C answers goes on past it. */
static unsigned char answered_by_libfuse[N_OPCODES];
static unsigned long long lingered; /* requests a run waited for and got */
static unsigned long long in_runs;  /* requests a run read (after a request answered in C) */
static unsigned long long after_python; /* requests linger_for waited for and got */
static int waited_since;  /* requests runs waited for since trio's last turn (run_waited) */
static long long waited_ns; /* and how long they waited, in all */
#define WAIT_CAP_NS 20000000LL /* waiting since trio's last turn, at most (then it gets one) */

void unionfs_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
    __asm__("fuse_session_process_buf") __attribute__((visibility("default")));

/* Whether reading the device returns at once when it has nothing (unionfs/fuse/loop.py
   makes it so): a run must never wait for a request. */
static int nonblocking(struct fuse_session *se)
{
    static int known = -1;
    if (known < 0) {
        int flags = fcntl(fuse_session_fd(se), F_GETFL);
        known = flags >= 0 && (flags & O_NONBLOCK);
    }
    return known;
}

static void process(struct fuse_session *se, const struct fuse_buf *buf)
{
    uint32_t opcode = 0; /* unknown (spliced into a pipe) */
    if (!(buf->flags & FUSE_BUF_IS_FD) && buf->size >= sizeof(struct fuse_in_header)) {
        opcode = ((const struct fuse_in_header *)buf->mem)->opcode;
        if (opcode >= N_OPCODES)
            opcode = 0;
        counts[opcode]++;
    }
    if (requests_peek != NULL)
        requests_peek(buf);
    requests_answered = 0;
    next_process_buf(se, buf);
    if (answered_by_libfuse[opcode])
        requests_answered = 1;
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait up to linger_ns for fd to have a request; whether it has one. Not while a
   Python handler is in progress, nor when lingering is off, nor once the waits
   since trio's last turn add up to WAIT_CAP_NS. */
static int wait_request(int fd)
{
    struct pollfd pfd;
    struct timespec wait;
    long long start;
    int ready;
    if (linger_ns <= 0 || python_busy > 0 || waited_ns >= WAIT_CAP_NS)
        return 0;
    pfd.fd = fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    wait.tv_sec = linger_ns / 1000000000L;
    wait.tv_nsec = linger_ns % 1000000000L;
    start = now_ns();
    if (PyGILState_Check()) { /* pyfuse3 processes requests holding the GIL */
        Py_BEGIN_ALLOW_THREADS
        ready = ppoll(&pfd, 1, &wait, NULL);
        Py_END_ALLOW_THREADS
    } else {
        ready = ppoll(&pfd, 1, &wait, NULL);
    }
    waited_ns += now_ns() - start;
    return ready > 0;
}

static int linger(struct fuse_session *se)
{
    return wait_request(fuse_session_fd(se));
}

void unionfs_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    if (next_process_buf == NULL) {
        void *fn = dlvsym(RTLD_NEXT, "fuse_session_process_buf", "FUSE_3.0");
        next_process_buf =
            (process_buf_fn)(fn != NULL ? fn : dlsym(RTLD_NEXT, "fuse_session_process_buf"));
    }
    if (next_receive_buf == NULL) {
        void *fn = dlvsym(RTLD_NEXT, "fuse_session_receive_buf", "FUSE_3.0");
        next_receive_buf =
            (receive_buf_fn)(fn != NULL ? fn : dlsym(RTLD_NEXT, "fuse_session_receive_buf"));
    }
    process(se, buf);
    if (inline_on && nonblocking(se)) {
        int n;
        const struct fuse_buf *last = buf;
        struct fuse_buf more;
        for (n = 0; n < INLINE_MAX && requests_answered && !(last->flags & FUSE_BUF_IS_FD); n++) {
            int res;
            more = *buf;
            more.flags = 0;
            res = next_receive_buf(se, &more);
            if (res == -EAGAIN && linger(se)) {
                more = *buf;
                more.flags = 0;
                res = next_receive_buf(se, &more);
                if (res > 0) {
                    lingered++;
                    waited_since++;
                }
            }
            if (res <= 0)
                return; /* none came (EAGAIN), or what pyfuse3's next read will see too */
            in_runs++;
            process(se, &more);
            last = &more;
        }
    }
}

int unionfs_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
    __asm__("fuse_session_receive_buf") __attribute__((visibility("default")));

int unionfs_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    int res;
    if (next_receive_buf == NULL) {
        void *fn = dlvsym(RTLD_NEXT, "fuse_session_receive_buf", "FUSE_3.0");
        next_receive_buf =
            (receive_buf_fn)(fn != NULL ? fn : dlsym(RTLD_NEXT, "fuse_session_receive_buf"));
    }
    res = next_receive_buf(se, buf);
    return res == -EAGAIN ? -EINTR : res;
}

static PyObject *request_counts(PyObject *self, PyObject *unused)
{
    PyObject *out = PyDict_New();
    int op;
    (void)self;
    (void)unused;
    if (out == NULL)
        return NULL;
    for (op = 0; op < N_OPCODES; op++) {
        PyObject *key, *value;
        if (counts[op] == 0)
            continue;
        key = PyLong_FromLong(op);
        value = PyLong_FromUnsignedLongLong(counts[op]);
        if (key == NULL || value == NULL || PyDict_SetItem(out, key, value) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    }
    return out;
}

static PyObject *configure_inline(PyObject *self, PyObject *args)
{
    int on;
    long linger_us = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "p|l", &on, &linger_us))
        return NULL;
    if (linger_us < 0 || linger_us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "linger_us: 0 to 1000000");
        return NULL;
    }
    inline_on = on;
    linger_ns = on ? linger_us * 1000L : 0;
    Py_RETURN_NONE;
}

static PyObject *busy_counter(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyMemoryView_FromMemory((char *)&python_busy, sizeof(python_busy), PyBUF_WRITE);
}

static PyObject *run_waited(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (waited_since < INLINE_MAX && waited_ns < WAIT_CAP_NS)
        Py_RETURN_FALSE;
    waited_since = 0;
    waited_ns = 0;
    Py_RETURN_TRUE;
}

static PyObject *run_counts(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KKK)", in_runs, lingered, after_python);
}

/* linger_for(fd): the same wait after a request Python answered, before the Python
   side's request loop parks in trio (unionfs/fuse/loop.py): whether a request came
   within linger_ns. It counts towards run_waited, so trio still gets its turn. After
   a request answered in C it does not wait: that run has waited already. */
static PyObject *linger_for(PyObject *self, PyObject *arg)
{
    int fd = (int)PyLong_AsLong(arg);
    (void)self;
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (requests_answered || !wait_request(fd))
        Py_RETURN_FALSE;
    after_python++;
    waited_since++;
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"linger_for", linger_for, METH_O,
     "linger_for(fd): wait up to the linger for a request on fd (not while a Python "
     "handler is in progress, nor after a request answered in C); whether one came."},
    {"configure_inline", configure_inline, METH_VARARGS,
     "configure_inline(on, linger_us=0): after a request answered in C, process the next "
     "queued ones right away while they are too, waiting up to linger_us for each while no "
     "Python handler is in progress."},
    {"busy_counter", busy_counter, METH_NOARGS,
     "The count of Python handlers in progress, as a writable memoryview of a C int: the "
     "request boundary adds 1 when a handler starts and takes it away when it ends."},
    {"run_waited", run_waited, METH_NOARGS,
     "Whether runs waited for INLINE_MAX requests, or WAIT_CAP_NS in all, since this last "
     "said so (then trio gets its turn)."},
    {"run_counts", run_counts, METH_NOARGS,
     "(read in runs, waited for, after Python): how many requests runs of C answers read, "
     "how many of those they waited (lingered) for, and how many linger_for waited for."},
    {"request_counts", request_counts, METH_NOARGS,
     "{opcode: requests received} (requests spliced into a pipe are not counted; "
     "none are once KILLPRIV_V2 is on)."},
    {NULL, NULL, 0, NULL},
};

/* Which requests libfuse answers itself: those whose handler pyfuse3 leaves out. */
static int wrap(struct fuse_lowlevel_ops *ops)
{
    answered_by_libfuse[FUSE_IOCTL] = ops->ioctl == NULL;
    answered_by_libfuse[FUSE_POLL] = ops->poll == NULL;
    answered_by_libfuse[FUSE_BMAP] = ops->bmap == NULL;
    return 0;
}

const struct hook_feature requests_feature = {"requests", wrap, NULL, NULL, methods};
