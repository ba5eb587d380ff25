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
 * Files and directories whose topmost part is in the writable upper layer are
 * armed for SETATTR too (and never for OPEN: their data may change under a
 * cache). A chmod, a chown by root and a utimes of such an inode need no copy-up,
 * and the daemon's answer is then only the same call on the real inode and its
 * new stat; an untar sends three of them per file. The kernel asks for setuid
 * and setgid to be dropped with every chown (killpriv.c); root's chown, made by
 * the daemon as root, drops just what the daemon drops for root. Anything else
 * goes to the daemon: a truncate, any other wish to drop setuid/setgid, a chown
 * by anyone but root (the daemon knows the caller's groups), and every failure,
 * which it repeats and answers in its own words. A directory that is in one layer
 * only (the upper with no lower part, or opaque; or one lower layer, no other having
 * a part of it) is armed for LOOKUP of missing names too: the answer is then a
 * negative entry, as the daemon's (an untar looks up each name before it creates it,
 * Perl and Python look for each module along a search path).
 *
 * Such a directory is armed for CREATE too, the one request per file of an untar
 * that went to Python. There the daemon's rules are short: the new name hides
 * nothing (nothing is below), so the file is made where the name is, owned by the
 * caller (on an upper mounted grpid, with its directory's group, as the upper gives
 * the kernel overlay's), with its mode less the umask, and opened as the daemon opens
 * one. This
 * makes it so (openat with O_CREAT | O_EXCL under the caller's fsuid and fsgid, as
 * the kernel overlay creates: the file is the caller's from the start, so a daemon
 * killed at any point never leaves one of the daemon's own in the upper layer; then
 * fstat, and a passthrough backing file when the daemon's files are passed through)
 * and calls the Python side for the
 * file's node (configure_creates), right here, with no trip through pyfuse3's loop
 * and trio's scheduler. The handle stays here as an open's does: released here with
 * its backing file, claimed by the Python side when it needs it, and before it opens
 * the inode itself (claim_ino: the kernel passes every open of an inode through one
 * backing file). Anything else goes to the daemon, which makes the
 * file its own way: a setgid directory or a setuid/setgid/sticky mode (the
 * setgid-directory rules, and a chown that would clear those bits), a directory
 * with a default ACL (which gives the mode instead of the umask), a name the
 * daemon refuses or one already there (a whiteout it replaces: O_EXCL fails), any
 * failure (what was made is removed first), and a file the Python side declines.
 *
 * Handles made here have the top bit of their low half set; the daemon's never
 * do (unionfs.overlay.files), so the two never meet.
 */
#include "hook.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
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
    uint64_t ino;
    int dirfd;      /* the layer's root (O_PATH), owned by the Python side */
    int pathfd;     /* an O_PATH fd of it, while among the last used (kept_paths), or -1 */
    int dir;        /* a directory: no OPEN */
    int nlink_one;  /* a directory shown with nlink 1 */
    int upper;      /* in the writable upper layer: SETATTR, and no OPEN */
    int sole;       /* a directory only there (no part below): LOOKUP of a missing name */
    int nparts;     /* a merged directory: its parts below, for LOOKUP of a missing name */
    struct part *parts;
    char path[];    /* below it */
};

/* A part of a merged directory in a layer below its topmost: the layer's root (O_PATH,
   owned by the Python side) and the directory's path below it. */
struct part {
    int dirfd;
    char *path;
};

/* What a SETATTR answered here may set (with the handle and lock owner, unused),
   and what it must set at least one of. */
#define SETATTR_SOME                                                                         \
    (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_ATIME |     \
     FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)
#define SETATTR_KILL (FUSE_SET_ATTR_KILL_SUID | FUSE_SET_ATTR_KILL_SGID)
#define SETATTR_HERE (SETATTR_SOME | SETATTR_KILL | FUSE_SET_ATTR_CTIME)

struct handle {
    uint64_t ino;
    int fd, flags;
    uint32_t backing; /* a file made here and passed through: its backing id, else 0 */
};

static void (*inner_open)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_getattr)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_lookup)(fuse_req_t, fuse_ino_t, const char *);
static void (*inner_setattr)(fuse_req_t, fuse_ino_t, struct stat *, int,
                             struct fuse_file_info *);
static void (*inner_create)(fuse_req_t, fuse_ino_t, const char *, mode_t,
                            struct fuse_file_info *);
static PyObject *created_cb, *replied_cb; /* configure_creates: the Python side's bookkeeping */
static int writeback;                  /* and whether the kernel caches writes */
static int grpid; /* and whether the upper gives new files their directory's group */
static int backing_refused;            /* the kernel refused a created file's backing file */
static uid_t daemon_uid;               /* the daemon's own ids (configure_creates): a create */
static gid_t daemon_gid;               /* with these needs no change of fsuid */
static int wrapped, on;
static int attrs_here;      /* configure_opens(on, attr_timeout): GETATTR too */
static double attr_timeout;  /* what the daemon gives with its attributes */
static double entry_timeout; /* and with a negative entry */
static struct u64map armed;   /* ino -> struct armed * */
static struct u64map handles; /* fh -> struct handle *: answered here, not claimed */
/* ino -> fh of such a handle with a backing id: the kernel wants every open of an inode
   passed through with one and the same backing file, so the Python side claims it
   before it opens the inode itself (claim_ino). */
static struct u64map backed;
static uint64_t next_fh;
static unsigned long long opens_served, attrs_served, setattrs_served, misses_served,
    creates_served;

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

/* The O_PATH fds of the armed inodes used last are kept (an untar's new file gets
   three SETATTRs and a GETATTR, its directory a LOOKUP per file): each use then saves
   a path walk and a close. An fd names the inode the path named when it was opened,
   which stays so while the inode is armed: only a request that may change the layers
   can change what a path names, and all are disarmed (and their fds closed) when one
   starts. A ring of their numbers evicts the oldest. */
#define KEPT_PATHS 64
static uint64_t kept_paths[KEPT_PATHS]; /* 0: none */
static unsigned kept_next;

static void forget_path(struct armed *a)
{
    if (a->pathfd >= 0) {
        close(a->pathfd);
        a->pathfd = -1;
    }
}

static void keep_path(struct armed *a, int fd)
{
    uint64_t old = kept_paths[kept_next];
    if (old != 0) {
        /* That number may be armed anew meanwhile, its fd kept in a later slot: closed
           a little early then, as the slot says it may be. */
        struct armed *o = (struct armed *)(uintptr_t)u64map_get(&armed, old, 0);
        if (o != NULL)
            forget_path(o);
    }
    kept_paths[kept_next] = a->ino;
    kept_next = (kept_next + 1) % KEPT_PATHS;
    a->pathfd = fd;
}

/* An O_PATH fd of the armed inode, checked to be of its kind, and its stat; -1 when
   it is not there as armed (a symlink on the way, another kind of file). With keep,
   it is kept (keep_path) and the caller must not close it; the next call may close
   it, and so may the Python side's (disarm). */
static int path_armed(struct armed *a, struct stat *st, int keep)
{
    struct open_how how;
    int fd;
    if (keep && a->pathfd >= 0) {
        if (fstat(a->pathfd, st) == 0)
            return a->pathfd; /* its kind cannot have changed */
        forget_path(a);
    }
    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_NOFOLLOW | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    fd = (int)syscall(SYS_openat2, a->dirfd, a->path, &how, sizeof(how));
    if (fd < 0)
        return -1;
    if (fstat(fd, st) < 0 || (a->dir ? !S_ISDIR(st->st_mode) : !S_ISREG(st->st_mode))) {
        close(fd);
        return -1;
    }
    if (keep)
        keep_path(a, fd);
    return fd;
}

static void reply_attr(fuse_req_t req, fuse_ino_t ino, const struct armed *a, struct stat *st)
{
    if (a->nlink_one)
        st->st_nlink = 1;
    st->st_ino = ino;
    fuse_reply_attr(req, st, attr_timeout);
    requests_answered = 1;
}

static struct armed *armed_attrs(fuse_ino_t ino)
{
    if (!on || !attrs_here)
        return NULL;
    return (struct armed *)(uintptr_t)u64map_get(&armed, ino, 0);
}

static void hook_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct armed *a = armed_attrs(ino);
    struct stat st;
    if (a == NULL || path_armed(a, &st, 1) < 0) {
        inner_getattr(req, ino, fi);
        return;
    }
    reply_attr(req, ino, a, &st);
    attrs_served++;
}

/* Whether no part below the topmost of the merged directory *a* has *name* (nor
   anything else there: a whiteout, a marker; those go to the daemon), each part's path
   walked beneath its layer's root without following a symlink, as the daemon walks it.
   A lower layer never changes, so no part can gain the name while it is armed. */
static int missing_below(const struct armed *a, const char *name)
{
    char buf[PATH_MAX];
    struct open_how how;
    int i, n, fd;
    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_NOFOLLOW | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    for (i = 0; i < a->nparts; i++) {
        const struct part *p = &a->parts[i];
        n = *p->path ? snprintf(buf, sizeof(buf), "%s/%s", p->path, name)
                     : snprintf(buf, sizeof(buf), "%s", name);
        if (n < 0 || (size_t)n >= sizeof(buf))
            return 0;
        fd = (int)syscall(SYS_openat2, p->dirfd, buf, &how, sizeof(how));
        if (fd >= 0) {
            close(fd);
            return 0;
        }
        if (errno != ENOENT)
            return 0;
    }
    return 1;
}

/* LOOKUP in a directory that is in one layer only (the upper, or one lower layer with
   no part of it in the layers above or below): a name not there is not in the merged
   view either (nothing below to find, or to hide with a whiteout; an OCI whiteout of a
   name not there hides nothing either), and the daemon's answer is a negative entry.
   Anything found goes to the daemon, which makes its node; so does any error. Only a
   request that changes the layers can give the directory another part, and it disarms
   every inode first. A merged directory is armed with its parts below (the daemon's
   resolution: redirects followed, cut at an opaque one) and answers alike when none of
   them has the name either. */
static void hook_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct armed *a = armed_attrs(parent);
    struct fuse_entry_param e;
    struct stat st;
    int fd, missing;
    if (a == NULL || !(a->sole || a->nparts > 0) || (fd = path_armed(a, &st, 1)) < 0)
        goto python;
    missing = fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT;
    if (!missing || !missing_below(a, name))
        goto python;
    memset(&e, 0, sizeof(e));
    e.entry_timeout = entry_timeout;
    fuse_reply_entry(req, &e);
    requests_answered = 1;
    misses_served++;
    return;
python:
    inner_lookup(req, parent, name);
}

/* A time to set: "now" is the upper filesystem's clock when it is set (UTIME_NOW), as
   on the kernel overlay (the daemon sets the time the kernel sent with the request, a
   moment earlier). */
static struct timespec time_to_set(int to_set, int set, int now, const struct timespec *t)
{
    struct timespec ts = {0, UTIME_OMIT};
    if (to_set & now)
        ts.tv_nsec = UTIME_NOW;
    else if (to_set & set)
        ts = *t;
    return ts;
}

/* The daemon's setattr of an inode in the upper layer (unionfs.overlay.files):
   chown, chmod, then the times; 0, or -1 with errno. */
static int set_attrs(int fd, const struct stat *attr, int to_set)
{
    if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
        gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
        if (fchownat(fd, "", uid, gid, AT_EMPTY_PATH) < 0)
            return -1;
    }
    if (to_set & FUSE_SET_ATTR_MODE) {
        /* chmod has no AT_EMPTY_PATH before fchmodat2 (6.6), which seccomp profiles may
           refuse: through the fd's magic link, as the daemon does. */
        char link[32];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        if (chmod(link, attr->st_mode & 07777) < 0)
            return -1;
    }
    if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                  FUSE_SET_ATTR_MTIME_NOW)) {
        struct timespec ts[2];
        ts[0] = time_to_set(to_set, FUSE_SET_ATTR_ATIME, FUSE_SET_ATTR_ATIME_NOW, &attr->st_atim);
        ts[1] = time_to_set(to_set, FUSE_SET_ATTR_MTIME, FUSE_SET_ATTR_MTIME_NOW, &attr->st_mtim);
        if (utimensat(fd, "", ts, AT_EMPTY_PATH) < 0)
            return -1;
    }
    return 0;
}

static void hook_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    struct armed *a = armed_attrs(ino);
    int owners = to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID);
    struct stat st;
    int fd, res;
    if (a == NULL || !a->upper || (to_set & ~SETATTR_HERE) || !(to_set & SETATTR_SOME))
        goto python;
    /* A chown by root: the daemon's own chown (as root) drops what the kernel asks
       it to drop with one, as the daemon does for root. Any other kill is its work. */
    if (owners ? fuse_req_ctx(req)->uid != 0 : (killpriv_asked() || (to_set & SETATTR_KILL)))
        goto python;
    if ((fd = path_armed(a, &st, 1)) < 0)
        goto python;
    res = set_attrs(fd, attr, to_set);
    if (res == 0)
        res = fstat(fd, &st);
    if (res < 0)
        goto python; /* the daemon tries again, and says what went wrong its own way */
    reply_attr(req, ino, a, &st);
    setattrs_served++;
    return;
python:
    inner_setattr(req, ino, attr, to_set, fi);
}

static int arm_here(unsigned long long ino, int dirfd, const char *path, size_t len, int dir,
                    int nlink_one, int upper, int sole);

/* The Python side's answer to a file made here (configure_creates): whether it took it
   (its node, which the reply names), and then the entry the reply carries. */
static int bookkeeping(fuse_ino_t parent, const char *name, int fd, struct fuse_entry_param *e)
{
    unsigned long long ino, generation;
    PyObject *res = PyObject_CallFunction(created_cb, "Ky#i", (unsigned long long)parent, name,
                                          (Py_ssize_t)strlen(name), fd);
    if (res == NULL) {
        PyErr_WriteUnraisable(created_cb);
        return 0;
    }
    if (res == Py_None || !PyArg_ParseTuple(res, "KK", &ino, &generation)) {
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(created_cb);
        Py_DECREF(res);
        return 0;
    }
    Py_DECREF(res);
    e->ino = ino;
    e->generation = generation;
    e->attr.st_ino = ino; /* shown as the daemon shows it (ino.c) */
    e->attr_timeout = attr_timeout;
    e->entry_timeout = entry_timeout;
    return 1;
}

/* After the reply (delivered: the kernel got it), the Python side's work that can wait. */
static void replied(uint64_t ino, int delivered)
{
    PyObject *res = PyObject_CallFunction(replied_cb, "Ki", (unsigned long long)ino, delivered);
    if (res == NULL)
        PyErr_WriteUnraisable(replied_cb);
    Py_XDECREF(res);
}

static uint64_t new_handle(void);
static void drop_handle(uint64_t fh, struct handle *h);

/* The handle of a file made here: kept here, as an open answered here (released here,
   claimed by the Python side when it needs it), with the file's backing id when it is
   passed through, which its upper half carries as the daemon's handles do. NULL when
   there is no memory for it. */
static struct handle *created_handle(int fd, int flags, int backing, uint64_t *fhp)
{
    struct handle *h = malloc(sizeof(*h));
    uint64_t fh;
    if (h == NULL)
        return NULL;
    h->ino = 0; /* until the Python side names the node */
    h->fd = fd;
    h->flags = flags;
    h->backing = (uint32_t)backing;
    do /* the key as registered, backing id and all, free */
        fh = new_handle() | ((uint64_t)(uint32_t)backing << 32);
    while (ops_fd_of(fh) >= 0);
    if (ops_set_fd(fh, fd) < 0 || u64map_put(&handles, fh, (uint64_t)(uintptr_t)h) < 0) {
        ops_set_fd(fh, -1);
        free(h);
        return NULL;
    }
    *fhp = fh;
    return h;
}

/* Whether directory *dirfd* (O_PATH) may have a default ACL, which gives a new entry
   its mode instead of the umask (the daemon's rules then: unionfs.overlay.acl). */
static int inherits_acl(int dirfd)
{
    char link[32];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
    if (getxattr(link, "system.posix_acl_default", NULL, 0) >= 0)
        return 1;
    return errno != ENODATA && errno != EOPNOTSUPP;
}

/* openat(O_CREAT) as the caller: under their fsuid and fsgid (this thread's only; the
   daemon's worker threads keep theirs), with the daemon's effective capabilities kept
   (a change of fsuid from 0 drops the filesystem ones: the caller's supplementary
   groups, which the daemon does not know, may be what lets them write there, and the
   kernel checked that already). The same ids as the daemon's: a plain openat. A daemon
   that may not take those ids makes nothing (EPERM), and the daemon's Python side
   makes the file its own way. */
static int create_as(uid_t uid, gid_t gid, int dirfd, const char *name, int flags, mode_t mode)
{
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];
    uid_t old_uid;
    gid_t old_gid;
    int fd, saved;
    if (uid == daemon_uid && gid == daemon_gid)
        return openat(dirfd, name, flags, mode);
    if (syscall(SYS_capget, &head, caps) < 0)
        return -1;
    old_gid = (gid_t)setfsgid(gid);
    old_uid = (uid_t)setfsuid(uid);
    /* Each returns the old id whether it took or not (a daemon without CAP_SETUID or
       CAP_SETGID): asked again with an id it can never take, it tells the current one. */
    if ((uid_t)setfsuid((uid_t)-1) != uid || (gid_t)setfsgid((gid_t)-1) != gid) {
        fd = -1;
        saved = EPERM;
    } else {
        syscall(SYS_capset, &head, caps); /* the effective set of before: a subset of the permitted */
        fd = openat(dirfd, name, flags, mode);
        saved = errno;
    }
    setfsuid(old_uid);
    setfsgid(old_gid);
    syscall(SYS_capset, &head, caps); /* as before, not as a return to fsuid 0 makes them */
    errno = saved;
    return fd;
}

static void hook_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                        struct fuse_file_info *fi)
{
    struct armed *a = armed_attrs(parent), *made;
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct fuse_entry_param e;
    size_t len = strlen(name), at;
    int dirfd, fd, flags, root, backing, delivered;
    gid_t gid;
    uint64_t fh;
    char *path;
    struct handle *h;
    /* Only in a directory of the upper layer armed writable: never on a read-only mount,
       even one a remount made writable to the kernel. */
    if (a == NULL || !a->sole || !a->upper || created_cb == NULL || backing_refused ||
        !PyGILState_Check() || (mode & 07000) || len > 255 || strncmp(name, ".wh.", 4) == 0 ||
        strchr(name, '/') != NULL)
        goto python;
    memset(&e, 0, sizeof(e));
    /* Not kept: the Python side's work below may close what is (disarm). */
    if ((dirfd = path_armed(a, &e.attr, 0)) < 0)
        goto python;
    if ((e.attr.st_mode & S_ISGID) || inherits_acl(dirfd)) {
        close(dirfd);
        goto python;
    }
    /* The group the file must have: the caller's, or on an upper mounted grpid (which
       gives it the kernel overlay's files too), its directory's. */
    gid = grpid ? e.attr.st_gid : ctx->gid;
    /* As the daemon opens a file it creates (unionfs.overlay.namespace.create_file). */
    flags = (fi->flags & ~(O_TRUNC | O_APPEND | O_DIRECT)) | O_CREAT | O_EXCL | O_CLOEXEC;
    if (writeback && (flags & O_ACCMODE) == O_WRONLY)
        flags = (flags & ~O_ACCMODE) | O_RDWR;
    fd = create_as(ctx->uid, ctx->gid, dirfd, name, flags, mode & 0777 & ~(ctx->umask & 0777));
    if (fd < 0) {
        close(dirfd);
        goto python; /* there already (a whiteout), or a failure: the daemon's */
    }
    /* The new file's place, to arm it with (a may be freed from the call to the Python
       side on: it may disarm what it drops). */
    at = strlen(a->path);
    root = a->dirfd;
    if ((path = malloc(at + 1 + len + 1)) == NULL) {
        close(fd);
        goto undo;
    }
    memcpy(path, a->path, at);
    path[at] = '/';
    memcpy(path + at + 1, name, len + 1);
    /* Passed through when the daemon's files are (a file only in the upper layer always
       may be). A backing file the kernel refuses is the daemon's to handle and log, and
       from then on every CREATE is: asking again would make each file twice. */
    backing = -1;
    if (fstat(fd, &e.attr) == 0 && e.attr.st_uid == ctx->uid && e.attr.st_gid == gid &&
        (backing = passthrough_backing(fd)) < 0)
        backing_refused = 1;
    if (backing < 0) {
        close(fd);
        free(path);
        goto undo;
    }
    /* Filed with the caller's flags, as the daemon files the handles it makes. */
    if ((h = created_handle(fd, fi->flags, backing, &fh)) == NULL) {
        passthrough_unback((uint32_t)backing);
        close(fd);
        free(path);
        goto undo;
    }
    if (!bookkeeping(parent, name, fd, &e)) {
        drop_handle(fh, h);
        free(path);
        goto undo;
    }
    /* The Python side's work in bookkeeping never claims a handle (only requests that
       change the layers do, and none runs while this one is answered). */
    h->ino = e.ino;
    if (backing > 0 && u64map_put(&backed, e.ino, fh) < 0) {
        replied(e.ino, 0); /* no reply will name the node */
        opens_release(fh);
        free(path);
        goto undo; /* and the daemon tries */
    }
    /* Its GETATTR and SETATTR here too, as the daemon arms a file it gives, with its
       O_PATH fd kept: an untar's SETATTRs of it follow. */
    if (arm_here(e.ino, root, path, at + 1 + len, 0, 0, 1, 0) > 0 &&
        (made = (struct armed *)(uintptr_t)u64map_get(&armed, e.ino, 0)) != NULL &&
        (fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)) >= 0)
        keep_path(made, fd);
    close(dirfd);
    free(path);
    fi->fh = fh;
    fi->keep_cache = 0; /* in the upper layer: its data may change under a cache */
    fi->direct_io = 0;
    fi->nonseekable = 0;
    delivered = fuse_reply_create(req, &e, fi) == 0;
    if (!delivered)
        opens_release(fh); /* the caller was interrupted: the kernel has no handle */
    /* Then what the Python side can do while the caller goes on; not delivered, the
       kernel has no reference to the node either. */
    replied(e.ino, delivered);
    requests_answered = 1;
    creates_served += delivered;
    return;
undo:
    unlinkat(dirfd, name, 0);
    close(dirfd);
python:
    inner_create(req, parent, name, mode, fi);
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
    if (a == NULL || a->dir || a->upper || (h = malloc(sizeof(*h))) == NULL)
        goto python;
    h->fd = open_armed(a, fi->flags);
    if (h->fd < 0) {
        free(h);
        goto python; /* the daemon says what went wrong, its own way */
    }
    h->ino = ino;
    h->flags = fi->flags;
    h->backing = 0;
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

/* A handle leaves this file's care (released, or claimed). */
static void unlist(uint64_t fh, const struct handle *h)
{
    u64map_del(&handles, fh);
    if (h->backing != 0 && u64map_get(&backed, h->ino, 0) == fh)
        u64map_del(&backed, h->ino);
}

static void drop_handle(uint64_t fh, struct handle *h)
{
    unlist(fh, h);
    ops_set_fd(fh, -1);
    close(h->fd);
    passthrough_unback(h->backing);
    free(h);
}

int opens_release(uint64_t fh)
{
    struct handle *h;
    if (!(fh & C_HANDLE))
        return 0;
    h = (struct handle *)(uintptr_t)u64map_get(&handles, fh, 0);
    if (h == NULL)
        return 0; /* claimed: the Python side closes it */
    drop_handle(fh, h);
    return 1;
}

static int wrap(struct fuse_lowlevel_ops *ops)
{
    if (ops->open == NULL || ops->getattr == NULL || ops->setattr == NULL ||
        ops->lookup == NULL)
        return -1;
    inner_open = ops->open;
    ops->open = hook_open;
    inner_getattr = ops->getattr;
    ops->getattr = hook_getattr;
    inner_setattr = ops->setattr;
    ops->setattr = hook_setattr;
    inner_lookup = ops->lookup;
    ops->lookup = hook_lookup;
    if (ops->create != NULL) {
        inner_create = ops->create;
        ops->create = hook_create;
    }
    wrapped = 1;
    return 0;
}

static void free_parts(struct armed *a)
{
    int i;
    for (i = 0; i < a->nparts; i++)
        free(a->parts[i].path);
    free(a->parts);
    a->parts = NULL;
    a->nparts = 0;
}

static void drop(uint64_t ino)
{
    struct armed *a = (struct armed *)(uintptr_t)u64map_get(&armed, ino, 0);
    if (a != NULL) {
        u64map_del(&armed, ino);
        forget_path(a);
        free_parts(a);
        free(a);
    }
}

/* 1: armed; 0: not answered here; -1: out of memory. */
static int arm_here(unsigned long long ino, int dirfd, const char *path, size_t len, int dir,
                    int nlink_one, int upper, int sole)
{
    struct armed *a;
    if (!on || len == 0 || len != strlen(path)) /* the root, or a NUL in the name */
        return 0;
    if ((dir || upper) && !attrs_here)
        return 0; /* armed for its attributes only */
    drop(ino);
    a = malloc(sizeof(*a) + len + 1);
    if (a == NULL)
        return -1;
    a->ino = ino;
    a->dirfd = dirfd;
    a->pathfd = -1;
    a->dir = dir;
    a->nlink_one = nlink_one;
    a->upper = upper;
    a->sole = sole;
    a->nparts = 0;
    a->parts = NULL;
    memcpy(a->path, path, len + 1);
    if (u64map_put(&armed, ino, (uint64_t)(uintptr_t)a) < 0) {
        free(a);
        return -1;
    }
    return 1;
}

static PyObject *arm_as(unsigned long long ino, int dirfd, const char *path, Py_ssize_t len,
                        int dir, int nlink_one, int upper, int sole)
{
    int res = arm_here(ino, dirfd, path, (size_t)len, dir, nlink_one, upper, sole);
    if (res < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(res);
}

/* arm and arm_upper: (ino, dirfd, path) of a regular file. */
static PyObject *arm_file(PyObject *args, int upper)
{
    unsigned long long ino;
    int dirfd;
    const char *path;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Kiy#", &ino, &dirfd, &path, &len))
        return NULL;
    return arm_as(ino, dirfd, path, len, 0, 0, upper, 0);
}

static PyObject *arm(PyObject *self, PyObject *args)
{
    (void)self;
    return arm_file(args, 0);
}

static PyObject *arm_upper(PyObject *self, PyObject *args)
{
    (void)self;
    return arm_file(args, 1);
}

/* The parts below of the merged directory *a*: a sequence of (dirfd, path) from the
   Python side. 1: attached; 0: one the hook cannot walk (the directory is then armed
   without them); -1: out of memory or a bad argument, with the Python error set. */
static int attach_parts(struct armed *a, PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "parts must be a sequence");
    Py_ssize_t i, n;
    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    a->parts = calloc((size_t)(n > 0 ? n : 1), sizeof(*a->parts));
    if (a->parts == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        const char *path;
        Py_ssize_t len;
        int dirfd;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iy#", &dirfd, &path, &len)) {
            Py_DECREF(fast);
            free_parts(a);
            return -1;
        }
        if ((size_t)len != strlen(path)) { /* a NUL in a name: not walked here */
            Py_DECREF(fast);
            free_parts(a);
            return 0;
        }
        a->parts[i].path = strdup(path);
        if (a->parts[i].path == NULL) {
            Py_DECREF(fast);
            free_parts(a);
            PyErr_NoMemory();
            return -1;
        }
        a->parts[i].dirfd = dirfd;
        a->nparts = (int)i + 1;
    }
    Py_DECREF(fast);
    return 1;
}

static PyObject *arm_dir(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int dirfd, nlink_one, upper, sole, res;
    const char *path;
    Py_ssize_t len;
    PyObject *parts = NULL;
    struct armed *a;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kiy#ppp|O", &ino, &dirfd, &path, &len, &nlink_one, &upper,
                          &sole, &parts))
        return NULL;
    res = arm_here(ino, dirfd, path, (size_t)len, 1, nlink_one, upper, sole);
    if (res < 0)
        return PyErr_NoMemory();
    if (res == 0 || parts == NULL || sole)
        return PyBool_FromLong(res);
    a = (struct armed *)(uintptr_t)u64map_get(&armed, ino, 0);
    if (a == NULL || attach_parts(a, parts) < 0) {
        if (a != NULL)
            drop(ino);
        return NULL;
    }
    Py_RETURN_TRUE;
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
        if (armed.keys[i] != 0) {
            struct armed *a = (struct armed *)(uintptr_t)armed.values[i];
            forget_path(a);
            free_parts(a);
            free(a);
        }
    free(armed.keys);
    free(armed.values);
    memset(&armed, 0, sizeof(armed));
    memset(kept_paths, 0, sizeof(kept_paths));
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
    return Py_BuildValue("(KKiiI)", (unsigned long long)fh, (unsigned long long)h->ino, h->fd,
                         h->flags, (unsigned)h->backing);
}

/* The tuple of handle fh, which the caller now owns; None when it is not here. */
static PyObject *take(uint64_t fh)
{
    struct handle *h = (struct handle *)(uintptr_t)u64map_get(&handles, fh, 0);
    PyObject *out;
    if (h == NULL)
        Py_RETURN_NONE;
    out = handle_tuple(fh, h);
    if (out != NULL) {
        unlist(fh, h);
        free(h);
    }
    return out;
}

static PyObject *claim(PyObject *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    (void)self;
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return take(fh);
}

static PyObject *claim_ino(PyObject *self, PyObject *arg)
{
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    uint64_t fh;
    (void)self;
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if ((fh = u64map_get(&backed, ino, 0)) == 0)
        Py_RETURN_NONE; /* the usual case: one lookup */
    return take(fh);
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
    free(backed.keys);
    free(backed.values);
    memset(&backed, 0, sizeof(backed));
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
    double timeout, entries;
    (void)self;
    if (!PyArg_ParseTuple(args, "ppdd", &want, &attrs, &timeout, &entries))
        return NULL;
    attrs_here = attrs;
    attr_timeout = timeout;
    entry_timeout = entries;
    on = want && wrapped;
    if (!on)
        drop_all();
    return PyBool_FromLong(on);
}

static PyObject *configure_creates(PyObject *self, PyObject *args)
{
    PyObject *created, *replied;
    int wb, gp;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOpp", &created, &replied, &wb, &gp))
        return NULL;
    if (created != Py_None && (!PyCallable_Check(created) || !PyCallable_Check(replied))) {
        PyErr_SetString(PyExc_TypeError, "configure_creates: not callable");
        return NULL;
    }
    Py_CLEAR(created_cb);
    Py_CLEAR(replied_cb);
    if (created != Py_None && inner_create != NULL) {
        Py_INCREF(created);
        Py_INCREF(replied);
        created_cb = created;
        replied_cb = replied;
    }
    writeback = wb;
    grpid = gp;
    backing_refused = 0;
    daemon_uid = geteuid();
    daemon_gid = getegid();
    return PyBool_FromLong(created_cb != NULL);
}

static PyObject *opens_served_here(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KKKKK)", opens_served, attrs_served, setattrs_served, misses_served,
                         creates_served);
}

static PyMethodDef methods[] = {
    {"arm", arm, METH_VARARGS,
     "arm(ino, dirfd, path): answer read-only opens of ino here, by opening path below "
     "dirfd; False when opens are not answered here."},
    {"arm_dir", arm_dir, METH_VARARGS,
     "arm_dir(ino, dirfd, path, nlink_one, upper, sole[, parts]): answer GETATTR of the "
     "directory ino here, from path below dirfd (with nlink 1 if nlink_one); with upper "
     "(dirfd is the writable upper layer) its SETATTR too; with sole (no layer but this one "
     "has a part of it), or with parts (the (dirfd, path) of each part below, in the "
     "layers below), LOOKUP of names none of them holds; with upper and sole CREATE "
     "(configure_creates); False when not answered here."},
    {"arm_upper", arm_upper, METH_VARARGS,
     "arm_upper(ino, dirfd, path): answer GETATTR and SETATTR of the regular file ino, "
     "whose topmost part is path below dirfd, the writable upper layer, here; False when "
     "not answered here."},
    {"disarm", disarm, METH_O, "disarm(ino): opens of ino go to Python again."},
    {"disarm_all", disarm_all, METH_NOARGS, "Every open goes to Python until armed again."},
    {"armed_count", armed_count, METH_NOARGS, "How many inodes are armed."},
    {"claim", claim, METH_O,
     "claim(fh): (fh, ino, fd, flags, backing) of a handle answered here, which the "
     "caller now owns (its RELEASE then goes to it, and its backing id, or 0), or None."},
    {"claim_ino", claim_ino, METH_O,
     "claim_ino(ino): claim() of the handle of a file CREATEd here and passed through, "
     "if still here (every open of an inode must use its backing id), or None."},
    {"claim_all", claim_all, METH_NOARGS, "claim() of every handle answered here."},
    {"unclaimed", unclaimed, METH_NOARGS, "How many handles answered here are not claimed."},
    {"configure_opens", configure_opens, METH_VARARGS,
     "configure_opens(on, attrs, attr_timeout, entry_timeout): answer opens of armed "
     "inodes here (off: disarm all), and with attrs their GETATTR, valid for attr_timeout, "
     "and the rest armed for (negative entries valid for entry_timeout); returns whether "
     "opens are."},
    {"configure_creates", configure_creates, METH_VARARGS,
     "configure_creates(created, replied, writeback, grpid): answer CREATE in a directory armed "
     "with sole here, calling created(parent, name, fd) for the node of the file made (it "
     "returns (ino, generation) with the kernel's reference held, or None to leave the "
     "request to the daemon), which is then armed as by arm_upper and its handle kept "
     "here, and replied(ino, delivered) after the reply; created None: never. Returns "
     "whether creates are answered here."},
    {"opens_served", opens_served_here, METH_NOARGS,
     "How many OPENs, GETATTRs, SETATTRs, LOOKUPs (of missing names) and CREATEs were "
     "answered here: (opens, getattrs, setattrs, lookups, creates)."},
    {NULL, NULL, 0, NULL},
};

const struct hook_feature opens_feature = {"opens", wrap, NULL, NULL, methods};
