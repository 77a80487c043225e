"""Build ``pam_keyhandoff.so``: a Linux-PAM module whose logic is Python (cffi embedding).

Usage::

    python cffi_build/pam.py OUTDIR [--sys-path DIR]... [--libpython SONAME]

writes ``OUTDIR/pam_keyhandoff.so``.  Run it with the interpreter the module is meant to
use (the one that has keyhandoff and cffi installed): its version is the libpython the
module links to, and by default its ``sys.path`` (plus the directories holding
``keyhandoff`` and ``_cffi_backend``) is baked into the module.  ``--sys-path`` replaces
that list (tests use it to build deliberately broken copies).

This is not a Python extension: it is not in setup.py's ``cffi_modules``.

Why the C side is as large as it is (PROTOCOLS.md section 6):

* cffi's embedding returns 0 from an exported function when Python cannot start or the
  Python code raises, and 0 is PAM_SUCCESS.  So every ``pam_sm_*`` entry point is written
  in C here, checks that the interpreter started, calls one *static* ``extern "Python"``
  function declared with ``error=PAM_SERVICE_ERR`` and additionally requires a completion
  flag that only the Python code sets on a normal return.  Nothing is exported through
  ``embedding_api()``: an exported Python function would answer PAM_SUCCESS on failure.
* Linux-PAM ``dlopen``s modules ``RTLD_LOCAL``, so the libpython this module pulls in would
  keep its symbols private and every extension module (``_cffi_backend``, ``_struct``...)
  would fail to load.  Before Python starts, the C code re-opens libpython
  ``RTLD_GLOBAL`` (``RTLD_NOLOAD`` first: promote the copy already mapped).
* cffi would start Python with ``Py_InitializeEx(0)``, which honours ``PYTHONPATH``,
  ``PYTHONHOME``, ``PYTHONSTARTUP``-style variables and imports ``site``/``sitecustomize``:
  anyone who controls the display manager's environment would run code as root.  The C
  code therefore initializes the interpreter itself, first, with
  ``PyConfig_InitIsolatedConfig`` (environment ignored, no user site), ``site`` not
  imported at all, no signal handlers, no bytecode writing, and an explicit, baked
  ``sys.path``; cffi then finds ``Py_IsInitialized()`` true and only sets up its module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

MODULE_NAME = "_keyhandoff_pam"  # the embedded CPython module (never imported from disk)
TARGET = "pam_keyhandoff.so"

CDEF = """
    #define PAM_SUCCESS ...
    #define PAM_SERVICE_ERR ...
    #define PAM_AUTHINFO_UNAVAIL ...
    #define LOG_ERR ...
    #define LOG_WARNING ...
    #define LOG_INFO ...
    #define LOG_DEBUG ...

    /* Implemented in Python (embedding init code below).  Static: only our C calls it. */
    extern "Python" int _keyhandoff_pam_authenticate(void *pamh, int argc, const char **argv,
                                                     char *token, size_t token_size,
                                                     int *completed);

    /* Implemented in C: pam_syslog with a fixed format (the message is never a format). */
    void keyhandoff_pam_log(void *pamh, int priority, const char *message);
"""

# The Python half.  It runs once, when the first pam_sm_authenticate starts the embedded
# interpreter.  Any exception here makes cffi_start_python() fail -> PAM_SERVICE_ERR.
INIT_CODE = """
from _keyhandoff_pam import ffi, lib

from keyhandoff import pam_module as _impl

# The numbers pam_module returns must be this libpam's numbers; refuse to run otherwise.
assert (_impl.PAM_SUCCESS, _impl.PAM_SERVICE_ERR, _impl.PAM_AUTHINFO_UNAVAIL) == (
    lib.PAM_SUCCESS, lib.PAM_SERVICE_ERR, lib.PAM_AUTHINFO_UNAVAIL)
assert (_impl.LOG_ERR, _impl.LOG_WARNING, _impl.LOG_INFO, _impl.LOG_DEBUG) == (
    lib.LOG_ERR, lib.LOG_WARNING, lib.LOG_INFO, lib.LOG_DEBUG)

_current_pamh = [ffi.NULL]


def _log(priority, message):
    lib.keyhandoff_pam_log(_current_pamh[0], priority, message.encode("utf-8", "replace"))


def _onerror(exc_type, exc_value, tb):
    # Only the exception's type and where it was raised: an exception's text is not ours
    # to trust (a third-party message could quote data).  Never the traceback's locals.
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = "" if tb is None else f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
    try:
        _log(lib.LOG_ERR, f"internal error: {exc_type.__name__}{where}")
    except BaseException:
        pass
    return None  # -> error=PAM_SERVICE_ERR, and *completed stays 0


@ffi.def_extern(error=lib.PAM_SERVICE_ERR, onerror=_onerror)
def _keyhandoff_pam_authenticate(pamh, argc, argv, token, token_size, completed):
    _current_pamh[0] = pamh
    try:
        args = [ffi.string(argv[i]).decode("utf-8", "surrogateescape") for i in range(argc)]
        out = ffi.buffer(token, token_size)

        def deliver(entry):
            out[0 : len(entry)] = entry
            out[len(entry)] = b"\\0"

        rc = _impl.authenticate(args, token_size=token_size, deliver=deliver, log=_log)
        completed[0] = 1
        return rc
    finally:
        _current_pamh[0] = ffi.NULL
"""

C_SOURCE = r"""
/* cffi's prologue already included Python.h (and with it _GNU_SOURCE). */
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>
#include <syslog.h>
#include <wchar.h>

#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT
#define PAM_SM_SESSION
#define PAM_SM_PASSWORD
#include <security/pam_modules.h>
#include <security/pam_ext.h>

/* Baked in at build time by cffi_build/pam.py. */
@BAKED@

/* systemd accepts 2048-byte passphrases; one more for the NUL. */
#define KH_TOKEN_SIZE 2049

#define KH_EXPORT __attribute__((visibility("default")))

/* cffi defines the extern "Python" glue after this source; declare it (static) here. */
static int _keyhandoff_pam_authenticate(void *pamh, int argc, const char **argv,
                                        char *token, size_t token_size, int *completed);

void keyhandoff_pam_log(void *pamh, int priority, const char *message)
{
    if (pamh != NULL)
        pam_syslog((const pam_handle_t *)pamh, priority, "%s", message);
    else
        syslog(LOG_AUTHPRIV | priority, "pam_keyhandoff: %s", message);
}

static pthread_once_t kh_once = PTHREAD_ONCE_INIT;
static int kh_python_ok;          /* set once by kh_start_python(), then read-only */
static const char *kh_start_error = "not started";

static int kh_init_isolated(void)
{
    PyStatus status;
    PyPreConfig preconfig;
    PyConfig config;
    size_t i;

    /* Isolated preconfig: ignore PYTHON* variables (PYTHONMALLOC, PYTHONUTF8...) and leave
       the host's locale alone (no LC_CTYPE coercion inside the display manager). */
    PyPreConfig_InitIsolatedConfig(&preconfig);
    status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status))
        return -1;

    /* Isolated config: no PYTHONPATH/PYTHONHOME/PYTHONSTARTUP, no user site, no script
       directory on sys.path.  On top: site is not imported at all, so no .pth file and no
       sitecustomize/usercustomize runs, whatever sys.path holds. */
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.install_signal_handlers = 0;    /* the host owns its signals */
    config.write_bytecode = 0;             /* never write .pyc files as root from here */
    config.pathconfig_warnings = 0;
    config.parse_argv = 0;

    status = PyConfig_SetString(&config, &config.program_name, L"pam_keyhandoff");
    if (PyStatus_Exception(status))
        goto fail;
    status = PyConfig_SetString(&config, &config.home, kh_python_home);
    if (PyStatus_Exception(status))
        goto fail;
    config.module_search_paths_set = 1;
    for (i = 0; kh_sys_path[i] != NULL; i++) {
        status = PyWideStringList_Append(&config.module_search_paths, kh_sys_path[i]);
        if (PyStatus_Exception(status))
            goto fail;
    }
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status))
        return -1;
    /* Release the GIL the way cffi does after its own Py_InitializeEx(): every later
       entry (cffi's start-up and each extern "Python" call) takes it with
       PyGILState_Ensure. */
    (void)PyEval_SaveThread();
    return 0;

fail:
    PyConfig_Clear(&config);
    return -1;
}

static void kh_start_python(void)
{
    /* Linux-PAM loaded us RTLD_LOCAL: make libpython's symbols global for the extension
       modules Python will load.  NOLOAD first so we promote the copy already mapped
       instead of risking a second one.  The handle is never closed. */
    if (dlopen(kh_libpython, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD) == NULL &&
        dlopen(kh_libpython, RTLD_NOW | RTLD_GLOBAL) == NULL) {
        kh_start_error = "cannot load libpython";
        return;
    }
    /* A host that already runs Python (e.g. a Python program calling PAM) keeps its own
       interpreter; we do not (and cannot) re-initialize it. */
    if (!Py_IsInitialized() && kh_init_isolated() != 0) {
        kh_start_error = "the Python interpreter did not start";
        return;
    }
    if (cffi_start_python() != 0) {
        kh_start_error = "the Python side of the module did not load";
        return;
    }
    kh_python_ok = 1;
}

KH_EXPORT int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    char token[KH_TOKEN_SIZE];
    int completed = 0;
    int rc;

    (void)flags;  /* PAM_SILENT changes nothing: we never prompt and print nothing */
    (void)pthread_once(&kh_once, kh_start_python);
    if (!kh_python_ok) {
        pam_syslog(pamh, LOG_ERR, "%s", kh_start_error);
        return PAM_SERVICE_ERR;
    }

    memset(token, 0, sizeof token);
    rc = _keyhandoff_pam_authenticate(pamh, argc, argv, token, sizeof token, &completed);

    /* Fail closed: cffi answers 0 (PAM_SUCCESS) when no Python code is attached, and the
       error= value on an exception.  Only a normal return sets *completed. */
    if (completed != 1)
        rc = PAM_SERVICE_ERR;
    else if (rc == PAM_SUCCESS) {
        if (token[0] == '\0' || memchr(token, '\0', sizeof token) == NULL)
            rc = PAM_SERVICE_ERR;   /* success without a NUL-terminated token is a bug */
        else if (pam_set_item(pamh, PAM_AUTHTOK, token) != PAM_SUCCESS)
            rc = PAM_SERVICE_ERR;   /* libpam keeps its own copy and wipes it itself */
    }
    else if (rc != PAM_AUTHINFO_UNAVAIL)
        rc = PAM_SERVICE_ERR;       /* only these three answers exist */

    explicit_bzero(token, sizeof token);
    return rc;
}

/* Like pam_gdm (and pam_permit, pam_unix without credentials): this auth module has no
   credentials to establish; setcred runs only after the auth stack decided. */
KH_EXPORT int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}

/* Not an account module: no opinion, and PAM_IGNORE can never make a stack succeed. */
KH_EXPORT int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

/* Nothing to do at session open/close; ignoring keeps a shared include harmless. */
KH_EXPORT int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

KH_EXPORT int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

/* We cannot change a password.  A line in a password stack is a configuration error: say
   so loudly instead of letting a chain of ignores hide it. */
KH_EXPORT int pam_sm_chauthtok(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)flags; (void)argc; (void)argv;
    pam_syslog(pamh, LOG_ERR, "pam_keyhandoff cannot change passwords (password stack)");
    return PAM_SERVICE_ERR;
}
"""


def _c_wide(text: str) -> str:
    """A C wide-string literal for an ASCII path (refuse anything we would have to escape)."""
    if not text.isascii() or any(c in text for c in '"\\\n') or not text.isprintable():
        raise SystemExit(f"refusing to bake a path that is not plain ASCII: {text!r}")
    return f'L"{text}"'


def _check_safe_dir(path: str) -> None:
    """Refuse a sys.path entry others could write to: it would run their code as root."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise SystemExit(f"refusing to bake {path}: writable by group or others")


def default_sys_path() -> list[str]:
    """The building interpreter's module path plus where keyhandoff and _cffi_backend live.

    ``site`` does not run inside the module, so ``.pth`` files (an editable install, a venv's
    ``distutils-precedence.pth``) are not processed: the directories they would add are
    baked explicitly.
    """
    import _cffi_backend  # noqa: PLC0415  (only the build needs to locate it)

    import keyhandoff  # noqa: PLC0415

    entries = [p for p in sys.path[1:] if p and Path(p).is_dir()]  # [0] is cffi_build/
    for module_file in (_cffi_backend.__file__, keyhandoff.__file__):
        where = Path(module_file or "").resolve().parent
        if module_file and Path(module_file).name == "__init__.py":
            where = where.parent  # a package: its parent directory goes on sys.path
        if str(where) not in entries:
            entries.append(str(where))
    return [str(Path(p).resolve()) for p in entries]


def make_builder(sys_path: list[str], libpython: str) -> FFI:
    """The FFI builder for pam_keyhandoff.so with ``sys_path`` and ``libpython`` baked in."""
    for p in sys_path:
        if not os.path.isabs(p):
            raise SystemExit(f"sys.path entries must be absolute: {p!r}")
        if os.path.isdir(p):
            _check_safe_dir(p)
    if not libpython.isascii() or not libpython.isprintable() or '"' in libpython:
        raise SystemExit(f"bad libpython name {libpython!r}")
    baked = "\n".join(
        [
            f'static const char kh_libpython[] = "{libpython}";',
            f"static const wchar_t kh_python_home[] = {_c_wide(sys.base_prefix)};",
            "static const wchar_t *const kh_sys_path[] = {",
            *(f"    {_c_wide(p)}," for p in sys_path),
            "    NULL,",
            "};",
        ],
    )
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.embedding_init_code(INIT_CODE)
    ffibuilder.set_source(
        MODULE_NAME,
        C_SOURCE.replace("@BAKED@", baked),
        libraries=["pam"],
        extra_compile_args=["-Wall", "-Wextra", "-fvisibility=hidden", "-D_FORTIFY_SOURCE=2",
                            "-O2", "-fstack-protector-strong"],
        # nodelete: Python keeps pointers into this object (the embedded module, the
        # extern "Python" glue); pam_end()'s dlclose must never unmap it.
        extra_link_args=["-Wl,-z,nodelete", "-Wl,-z,now", "-Wl,-z,relro", "-ldl"],
    )
    return ffibuilder


def main(argv: list[str] | None = None) -> int:
    """Build OUTDIR/pam_keyhandoff.so."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--sys-path", action="append", dest="sys_path", metavar="DIR",
                        help="baked sys.path entry (repeat; replaces the default list)")
    parser.add_argument("--libpython", default=sysconfig.get_config_var("INSTSONAME"),
                        help="soname of the libpython to promote to RTLD_GLOBAL")
    args = parser.parse_args(argv)
    sys_path = args.sys_path if args.sys_path is not None else default_sys_path()
    ffibuilder = make_builder(sys_path, args.libpython)
    args.outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pam_keyhandoff-build-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, target=TARGET)
        final = args.outdir / TARGET
        # cffi writes the target inside tmpdir; copy next to the destination, then rename
        # so a PAM stack never dlopens a half-written module.
        staged = args.outdir / f".{TARGET}.tmp"
        shutil.copyfile(built, staged)
        staged.chmod(0o644)
        os.replace(staged, final)
    print(final)  # noqa: T201  (the one output: where the module is)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
