/*
 * The session hook: where pyfuse3's operation table passes on its way to
 * libfuse, and the module unionfs.fuse._fusehook (see hook.h).
 *
 * This file defines libfuse's session constructor. Loaded with RTLD_GLOBAL
 * before pyfuse3 is imported, it is what pyfuse3's call binds to. Which entry
 * point that is depends on the libfuse headers pyfuse3 was compiled with:
 *
 *   - up to 3.16, fuse_session_new (symbol version FUSE_3.0);
 *   - from 3.17, fuse_session_new is an inline function in fuse_lowlevel.h
 *     that calls fuse_session_new_versioned (FUSE_3.17) with one more
 *     argument, the libfuse version pyfuse3 was built for.
 *
 * So both are defined here (the second only when this module is compiled
 * against 3.17 headers, which is also what links it to the same libfuse as
 * pyfuse3: make install builds both against one library). An unversioned
 * definition in a module loaded first satisfies the versioned reference.
 * The real function is the next definition in the search order (dlvsym
 * RTLD_NEXT: libfuse, which this module links against: it calls
 * fuse_version(), which also keeps the linker from dropping that dependency),
 * found at call time, so no library name is assumed.
 *
 * Before wrapping anything it checks that the table is one it knows: no
 * larger than the table it was compiled with (libfuse only ever appends to
 * it) and with an init entry. Otherwise it passes pyfuse3's table on
 * untouched, records why, and the daemon works without the features (one
 * log line says so; unionfs.fuse.hook). Each feature checks the entries it
 * wraps itself and stays off when one is missing.
 *
 * If pyfuse3 links libfuse some other way, neither function is called:
 * bound() then says false, and the daemon falls back the same way.
 */
#include "hook.h" /* first: Python.h defines _GNU_SOURCE, which dlvsym and RTLD_NEXT need */

#include <dlfcn.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

#if FUSE_MAKE_VERSION(FUSE_MAJOR_VERSION, FUSE_MINOR_VERSION) >= FUSE_MAKE_VERSION(3, 17)
#define HOOK_VERSIONED_SESSION 1
typedef struct fuse_session *(*session_new_versioned_fn)(struct fuse_args *,
                                                         const struct fuse_lowlevel_ops *, size_t,
                                                         struct libfuse_version *, void *);
#endif

/* requests_feature last: it reads the table as the others leave it. */
static const struct hook_feature *const features[] = {
    &listing_feature, &ino_feature,     &ops_feature,  &passthrough_feature,
    &killpriv_feature, &release_feature, &caps_feature, &opens_feature, &requests_feature};
#define N_FEATURES (sizeof(features) / sizeof(features[0]))

static struct fuse_lowlevel_ops hooked_ops;
static void (*inner_init)(void *, struct fuse_conn_info *);
static int feature_on[N_FEATURES];
static int wrapped; /* pyfuse3's fuse_session_new call came through here, table accepted */
static const char *reason = "pyfuse3 did not create its session through the hook";
static struct fuse_session *session;

struct fuse_session *hook_session(void)
{
    return session;
}

void hook_session_gone(struct fuse_session *se)
{
    if (se == session)
        session = NULL;
}

static void hook_init(void *userdata, struct fuse_conn_info *conn)
{
    size_t i;
    for (i = 0; i < N_FEATURES; i++)
        if (feature_on[i] && features[i]->before_init != NULL)
            features[i]->before_init(conn);
    inner_init(userdata, conn);
    for (i = 0; i < N_FEATURES; i++)
        if (feature_on[i] && features[i]->after_init != NULL)
            features[i]->after_init(conn);
}

static session_new_fn next_session_new(void)
{
    void *fn = dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (fn == NULL)
        fn = dlsym(RTLD_NEXT, "fuse_session_new");
    return (session_new_fn)fn;
}

/* The table to hand libfuse: the wrapped copy, or pyfuse3's own (with the reason). */
static const struct fuse_lowlevel_ops *hook_table(const struct fuse_lowlevel_ops *op,
                                                  size_t op_size)
{
    size_t i;
    if (op_size > sizeof(hooked_ops)) {
        reason = "pyfuse3's operation table is larger than the one the hook was built for";
        return op;
    }
    if (op->init == NULL) {
        reason = "pyfuse3's operation table has no init entry";
        return op;
    }
    memset(&hooked_ops, 0, sizeof(hooked_ops));
    memcpy(&hooked_ops, op, op_size);
    inner_init = op->init;
    hooked_ops.init = hook_init;
    for (i = 0; i < N_FEATURES; i++)
        feature_on[i] = features[i]->wrap == NULL || features[i]->wrap(&hooked_ops) == 0;
    wrapped = 1;
    reason = "";
    return &hooked_ops;
}

static struct fuse_session *no_next(const char *what)
{
    /* Cannot happen while this module links libfuse; say so rather than crash. */
    reason = what;
    fprintf(stderr, "unionfs: %s\n", reason);
    return NULL;
}

/* Exported as "fuse_session_new" under another C name, so that headers which make
   fuse_session_new a macro or an inline function still compile. */
struct fuse_session *unionfs_session_new(struct fuse_args *args,
                                         const struct fuse_lowlevel_ops *op, size_t op_size,
                                         void *userdata) __asm__("fuse_session_new")
    __attribute__((visibility("default")));

struct fuse_session *unionfs_session_new(struct fuse_args *args,
                                         const struct fuse_lowlevel_ops *op, size_t op_size,
                                         void *userdata)
{
    session_new_fn real = next_session_new();
    if (real == NULL)
        return no_next("libfuse's fuse_session_new was not found after the hook");
    const struct fuse_lowlevel_ops *table = hook_table(op, op_size);
    /* The wrapped table is whole: entries a feature set past pyfuse3's size count. */
    session = real(args, table, table == &hooked_ops ? sizeof(hooked_ops) : op_size, userdata);
    return session;
}

#ifdef HOOK_VERSIONED_SESSION
struct fuse_session *unionfs_session_new_versioned(struct fuse_args *args,
                                                   const struct fuse_lowlevel_ops *op,
                                                   size_t op_size, struct libfuse_version *version,
                                                   void *userdata)
    __asm__("fuse_session_new_versioned") __attribute__((visibility("default")));

struct fuse_session *unionfs_session_new_versioned(struct fuse_args *args,
                                                   const struct fuse_lowlevel_ops *op,
                                                   size_t op_size, struct libfuse_version *version,
                                                   void *userdata)
{
    session_new_versioned_fn real =
        (session_new_versioned_fn)dlvsym(RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");
    if (real == NULL)
        return no_next("libfuse's fuse_session_new_versioned was not found after the hook");
    const struct fuse_lowlevel_ops *table = hook_table(op, op_size);
    session = real(args, table, table == &hooked_ops ? sizeof(hooked_ops) : op_size, version,
                   userdata);
    return session;
}
#endif

static PyObject *libfuse_version(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(fuse_version());
}

static PyObject *bound(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(wrapped);
}

static PyObject *why_not(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(reason);
}

static PyObject *features_on(PyObject *self, PyObject *unused)
{
    size_t i;
    PyObject *out = PyList_New(0);
    (void)self;
    (void)unused;
    if (out == NULL)
        return NULL;
    for (i = 0; i < N_FEATURES; i++) {
        if (!(wrapped && feature_on[i]))
            continue;
        PyObject *name = PyUnicode_FromString(features[i]->name);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"bound", bound, METH_NOARGS,
     "Whether pyfuse3's session was created through the hook with a table it knows."},
    {"why_not", why_not, METH_NOARGS, "Why the hook is not bound ('' when it is)."},
    {"libfuse_version", libfuse_version, METH_NOARGS,
     "The version of the libfuse the hook runs with (e.g. 314 for 3.14)."},
    {"features", features_on, METH_NOARGS, "The features that wrapped the table."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "unionfs.fuse._fusehook",
    .m_doc = "What unionfs adds to pyfuse3: see unionfs/fuse/hook/hook.h.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fusehook(void)
{
    size_t i;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    for (i = 0; i < N_FEATURES; i++) {
        if (features[i]->methods != NULL && PyModule_AddFunctions(m, features[i]->methods) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
