/*
 * FUSE_HANDLE_KILLPRIV_V2: the daemon drops setuid/setgid itself, so the
 * kernel need not ask for security.capability before every write.
 *
 * Without it, the kernel checks before each write(2) whether privileges must
 * go (file_remove_privs), and on FUSE that check costs a GETXATTR round trip:
 * a 4k random write is two requests instead of one. With it, the kernel marks
 * the superblock SB_NOSEC and leaves the kill to the daemon, telling it in
 * the request when the caller lacks CAP_FSETID: FUSE_WRITE_KILL_SUIDGID in a
 * WRITE, FUSE_OPEN_KILL_SUIDGID in an O_TRUNC OPEN or CREATE, and
 * FATTR_KILL_SUIDGID in a SETATTR that changes the size (or the owner).
 * security.capability goes by itself: the daemon writes as root, and the
 * backing filesystem removes it on any write or truncate, whoever writes.
 *
 * libfuse passes none of these flags on (up to 3.17 at least), so this file
 * reads them from each raw request through the request tap (requests.c)
 * before libfuse dispatches it. pyfuse3 then runs the handler up to its
 * first real suspension point in the same task, before it reads the next
 * request: the handler must ask for the flag right at its start
 * (request_kill). For that, requests must arrive in memory, not in a
 * splice pipe, so FUSE_CAP_SPLICE_READ is turned off (pyfuse3 copies every
 * write into a bytes object anyway, so splicing only cost a second syscall).
 *
 * libfuse 3.14 cannot negotiate KILLPRIV_V2 (it does not know the flag):
 * compiled against older headers this feature stays off and the kernel keeps
 * probing, as before.
 */
#include "hook.h"
#include "requests.h"

#include <linux/fuse.h>
#include <stdint.h>

static int wanted;                  /* configure_killpriv(True) before the mount */
static int active;                  /* negotiated in INIT */
static int last_kill;               /* the request being dispatched asks for the kill */
static uint32_t last_gid, last_pid; /* and who sent it */

static void peek(const struct fuse_buf *buf) __attribute__((unused)); /* with 3.17 only */

#ifdef FUSE_CAP_HANDLE_KILLPRIV_V2

/* Decided before pyfuse3's init handler, which asks the module what is on. */
static void before_init(struct fuse_conn_info *conn)
{
    active = wanted && (conn->capable & FUSE_CAP_HANDLE_KILLPRIV_V2);
    if (active)
        requests_peek = peek;
}

static void after_init(struct fuse_conn_info *conn)
{
    if (!active)
        return;
    conn->want |= FUSE_CAP_HANDLE_KILLPRIV_V2;
    conn->want &= ~FUSE_CAP_SPLICE_READ;
}

#else

#define before_init NULL
#define after_init NULL

#endif

/* Whether a raw request carries one of the kill flags. */
static int kills_suidgid(const struct fuse_buf *buf)
{
    const struct fuse_in_header *in;
    const char *arg;
    size_t room;

    if ((buf->flags & FUSE_BUF_IS_FD) || buf->size < sizeof(*in))
        return 0;
    in = buf->mem;
    arg = (const char *)buf->mem + sizeof(*in);
    room = buf->size - sizeof(*in);
    switch (in->opcode) {
    case FUSE_WRITE:
        return room >= sizeof(struct fuse_write_in) &&
               (((const struct fuse_write_in *)arg)->write_flags & FUSE_WRITE_KILL_SUIDGID);
    case FUSE_OPEN:
        return room >= sizeof(struct fuse_open_in) &&
               (((const struct fuse_open_in *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID);
    case FUSE_CREATE:
        return room >= sizeof(struct fuse_create_in) &&
               (((const struct fuse_create_in *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID);
    case FUSE_SETATTR:
        return room >= sizeof(struct fuse_setattr_in) &&
               (((const struct fuse_setattr_in *)arg)->valid & FATTR_KILL_SUIDGID);
    default:
        return 0;
    }
}

static void peek(const struct fuse_buf *buf)
{
    last_kill = kills_suidgid(buf);
    if (last_kill) {
        const struct fuse_in_header *in = buf->mem;
        last_gid = in->gid;
        last_pid = in->pid;
    }
}

int killpriv_asked(void)
{
    return last_kill;
}

static PyObject *configure_killpriv(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    (void)self;
    if (on < 0)
        return NULL;
    wanted = on;
    Py_RETURN_NONE;
}

static PyObject *killpriv_active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(active);
}

static PyObject *request_kill(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (!last_kill)
        Py_RETURN_NONE;
    return Py_BuildValue("(II)", (unsigned)last_gid, (unsigned)last_pid);
}

static PyMethodDef methods[] = {
    {"configure_killpriv", configure_killpriv, METH_O,
     "Ask for FUSE_HANDLE_KILLPRIV_V2 in INIT (call before mounting)."},
    {"killpriv_active", killpriv_active, METH_NOARGS,
     "Whether the kernel agreed to KILLPRIV_V2 (valid once its INIT arrived)."},
    {"request_kill", request_kill, METH_NOARGS,
     "None, or (gid, pid) of the caller when the request being handled asks the daemon to "
     "drop setuid/setgid (ask at the handler's start, before any await)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature killpriv_feature = {"killpriv", NULL, before_init, after_init, methods};
