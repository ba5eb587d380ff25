/*
 * Let the kernel cache directory listings and symlink targets, which pyfuse3
 * 3.5 cannot ask for.
 *
 * A FUSE filesystem that answers OPENDIR with ENOSYS gets no more OPENDIR or
 * RELEASEDIR requests, and the kernel then keeps every listing in its page
 * cache (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE) until a change through the mount
 * invalidates it. A warm walk then costs no round trip per directory. The
 * catch is that READDIR then carries file handle 0, and pyfuse3 hands its
 * readdir handler only the file handle, not the inode. So readdirplus and
 * fsyncdir put the inode number into a zero file handle (once opendir
 * answers ENOSYS there are no directory handles at all, so nothing is
 * ambiguous), and init records whether the kernel offers opendir-less
 * directories at all.
 */
#include "hook.h"

static void (*inner_readdirplus)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static void (*inner_fsyncdir)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
static int kernel_no_opendir; /* the kernel announced FUSE_CAP_NO_OPENDIR_SUPPORT */
static int wrapped;

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

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->readdirplus == NULL || ops->fsyncdir == NULL)
        return -1;
    inner_readdirplus = ops->readdirplus;
    inner_fsyncdir = ops->fsyncdir;
    ops->readdirplus = hook_readdirplus;
    ops->fsyncdir = hook_fsyncdir;
    wrapped = 1;
    return 0;
}

static void before_init(struct fuse_conn_info *conn)
{
    kernel_no_opendir = (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT) != 0;
}

static void after_init(struct fuse_conn_info *conn)
{
    /* A symlink's target never changes (a new link is a new inode, with a new
       generation if its number is reused), so the kernel may keep it. */
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static PyObject *listing_active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped && kernel_no_opendir);
}

static PyMethodDef methods[] = {
    {"listing_active", listing_active, METH_NOARGS,
     "Whether directories are served without opendir (valid once the kernel's INIT arrived)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature listing_feature = {"listing", wrap, before_init, after_init, methods};
