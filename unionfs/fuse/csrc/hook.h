/*
 * What the C hook adds to pyfuse3, one feature per file.
 *
 * pyfuse3 hands libfuse a table of lowlevel operations. session.c defines
 * fuse_session_new; loaded with RTLD_GLOBAL before pyfuse3, it is what
 * pyfuse3's call binds to (ELF symbol interposition). It copies pyfuse3's
 * table, lets every feature below wrap the entries it needs, and passes the
 * copy to libfuse's own fuse_session_new. A feature never changes what
 * pyfuse3 does with a request it handles; it adds what pyfuse3 withholds
 * (a capability asked for in INIT, an inode pyfuse3 does not pass on, ...).
 *
 * A feature is a struct hook_feature: the ops it wraps (wrap), what it learns
 * from the kernel's INIT before pyfuse3's handler runs (pyfuse3 calls the
 * Python side's init from there, which may ask the module what is on) and
 * what it asks of the kernel after it (pyfuse3 sets its own wishes first),
 * and the Python functions it adds to the module (methods).
 */
#ifndef UNIONFS_HOOK_H
#define UNIONFS_HOOK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

struct hook_feature {
    const char *name;
    /* Wrap entries of the copied table; returns 0, or -1 when the table lacks
       an entry the feature needs (the feature then stays off). */
    int (*wrap)(struct fuse_lowlevel_ops *ops);
    /* Called with the connection before and after pyfuse3's init handler. */
    void (*before_init)(struct fuse_conn_info *conn);
    void (*after_init)(struct fuse_conn_info *conn);
    PyMethodDef *methods; /* NULL-terminated, or NULL */
};

/* The features, in the order they wrap (listing.c, ...). */
extern const struct hook_feature listing_feature;
extern const struct hook_feature ino_feature; /* ino.c */
extern const struct hook_feature ops_feature; /* ops.c */
extern const struct hook_feature passthrough_feature; /* passthrough.c */
extern const struct hook_feature killpriv_feature;    /* killpriv.c */
extern const struct hook_feature requests_feature;    /* requests.c */
extern const struct hook_feature release_feature;     /* release.c */
extern const struct hook_feature caps_feature;        /* caps.c */
extern const struct hook_feature opens_feature;       /* opens.c */

/* The session pyfuse3 created through the hook (NULL before, if it did not, or once
   destroyed: hook_session_gone, called by ops.c's fuse_session_destroy). */
struct fuse_session *hook_session(void);
void hook_session_gone(struct fuse_session *se);

/* passthrough.c: the file info a reply to OPEN or CREATE carries: fi, or a copy
   with the backing id the Python side put in the handle's upper half. */
const struct fuse_file_info *passthrough_reply_info(const struct fuse_file_info *fi,
                                                    struct fuse_file_info *copy);
/* And a backing file for fd: its id, 0 when files are not passed through, -1 with
   errno when the kernel refuses it; passthrough_unback(id) lets it go. */
int passthrough_backing(int fd);
void passthrough_unback(uint32_t id);

/* ops.c: the real fd filed for a file handle (-1: none); file one (fd < 0: drop it),
   returning -1 when out of memory. */
int ops_fd_of(uint64_t fh);
int ops_set_fd(uint64_t fh, int fd);

/* requests.c: set by a feature that answered the request being processed itself,
   at once, so that nothing of it is left for pyfuse3 (the next request may then be
   read and processed right away, see requests.c). */
extern int requests_answered;

/* opens.c: close a handle answered there and not claimed; 0 when fh is not one. */
int opens_release(uint64_t fh);

/* Whether the request being dispatched asks the daemon to drop setuid/setgid
   (killpriv.c; always 0 without KILLPRIV_V2). */
int killpriv_asked(void);

#endif
