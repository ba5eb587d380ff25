/*
 * Let the kernel cache directory listings, which pyfuse3 3.5 cannot ask for.
 *
 * A FUSE filesystem that answers OPENDIR with ENOSYS gets no more OPENDIR or
 * RELEASEDIR requests, and the kernel then keeps every listing in its page
 * cache (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE) until a change through the mount
 * invalidates it. A warm walk then costs no round trip per directory. The
 * catch is that READDIR then carries file handle 0, and pyfuse3 hands its
 * readdir handler only the file handle, not the inode.
 *
 * This module closes that gap without touching pyfuse3. Loaded with
 * RTLD_GLOBAL before pyfuse3 is imported, it defines fuse_session_new, so
 * pyfuse3's call binds here (ELF symbol interposition). The wrapper passes a
 * copy of pyfuse3's operation table to libfuse's own fuse_session_new, with
 * three entries wrapped:
 *   init        records whether the kernel supports opendir-less directories,
 *               and lets the kernel cache symlink targets (FUSE_CAP_CACHE_SYMLINKS:
 *               a process start resolves /bin, /lib, /lib64 and the loader's
 *               links again and again);
 *   readdirplus,
 *   fsyncdir    put the inode number into a zero file handle, so Python can
 *               tell which directory it is (once opendir answers ENOSYS there
 *               are no directory handles at all, so nothing is ambiguous).
 * Nothing else changes: every request still goes to pyfuse3's own handlers.
 *
 * If pyfuse3 was imported before this module, or links libfuse some other way,
 * the wrapper is never called; active() then says false and the daemon keeps
 * its ordinary opendir handles.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 32
#include <dlfcn.h>
#include <fuse_lowlevel.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static struct fuse_lowlevel_ops hooked_ops;
static void (*inner_init)(void *, struct fuse_conn_info *);
static void (*inner_readdirplus)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static void (*inner_fsyncdir)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
static int wrapped;          /* pyfuse3's fuse_session_new call came through here */
static int kernel_no_opendir; /* the kernel announced FUSE_CAP_NO_OPENDIR_SUPPORT */

static void hook_init(void *userdata, struct fuse_conn_info *conn)
{
    kernel_no_opendir = (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT) != 0;
    inner_init(userdata, conn);
    /* A symlink's target never changes (a new link is a new inode, with a new
       generation if its number is reused), so the kernel may keep it. */
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void hook_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    inner_readdirplus(req, ino, size, off, fi);
}

static void hook_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    inner_fsyncdir(req, ino, datasync, fi);
}

static session_new_fn libfuse_session_new(void)
{
    void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    void *fn = NULL;
    if (lib == NULL)
        return NULL;
    fn = dlvsym(lib, "fuse_session_new", "FUSE_3.0");
    if (fn == NULL)
        fn = dlsym(lib, "fuse_session_new");
    dlclose(lib); /* still loaded: this module links against it */
    return (session_new_fn)fn;
}

/* Exported as "fuse_session_new" under another C name, so that headers which make
   fuse_session_new a macro or an inline function (libfuse 3.17) still compile; pyfuse3
   built against those calls another entry point, and the hook then stays unused. */
struct fuse_session *unionfs_session_new(struct fuse_args *args,
                                         const struct fuse_lowlevel_ops *op, size_t op_size,
                                         void *userdata) __asm__("fuse_session_new")
    __attribute__((visibility("default")));

struct fuse_session *unionfs_session_new(struct fuse_args *args,
                                         const struct fuse_lowlevel_ops *op, size_t op_size,
                                         void *userdata)
{
    session_new_fn real = libfuse_session_new();
    if (real == NULL)
        return NULL;
    if (op_size > sizeof(hooked_ops) || op->init == NULL || op->readdirplus == NULL ||
        op->fsyncdir == NULL)
        return real(args, op, op_size, userdata); /* not the table we know: leave it be */
    memset(&hooked_ops, 0, sizeof(hooked_ops));
    memcpy(&hooked_ops, op, op_size);
    inner_init = op->init;
    inner_readdirplus = op->readdirplus;
    inner_fsyncdir = op->fsyncdir;
    hooked_ops.init = hook_init;
    hooked_ops.readdirplus = hook_readdirplus;
    hooked_ops.fsyncdir = hook_fsyncdir;
    wrapped = 1;
    return real(args, &hooked_ops, op_size, userdata);
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped && kernel_no_opendir);
}

static PyObject *bound(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped);
}

static PyMethodDef methods[] = {
    {"active", active, METH_NOARGS,
     "Whether directories are served without opendir (valid once the kernel's INIT arrived)."},
    {"bound", bound, METH_NOARGS, "Whether pyfuse3's session was created through this module."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "unionfs._fusehook",
    .m_doc = "Directory listings cached by the kernel: see _fusehook.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fusehook(void)
{
    return PyModule_Create(&module);
}
