"""pam_keyhandoff.so and gdm's pam_gdm.so under the real Linux-PAM, driven by pamtester.

Each test writes its own service file ``/etc/pam.d/keyhandoff-test-<random>`` and removes
it afterwards.  ``PAM_AUTHTOK`` is observed with ``pam_exec.so expose_authtok``: a checker
script writes the token it receives on stdin to a 0600 file in the test's tmp_path (never
to any output).  pamtester is a child of the test and inherits its session keyring, which
possesses root's ``@u`` (the conftest fixture): the situation of gdm.service with
``KeyringMode=shared``.

Root's ``@u`` is one per machine: other test runs (and other engineers' tests) put
``keyhandoff:login`` and ``cryptsetup`` keys there concurrently, and ``add_key`` of the same
name updates a key in place.  So most tests here put their keys into a private session
keyring that does *not* link ``@u`` (``own_session``): the modules find keys with
``find_key_by_type_and_desc``, which searches the session keyring exactly as it searches a
linked ``@u``, and nothing outside the test can reach or shadow them.  Possession through
a linked keyring (and its absence) is tested with a stand-in for ``@u`` (see
``linked_keyring_key``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import require_binary
from pam_stack import (
    AUTHINFO_UNAVAIL,
    BUILD_SCRIPT,
    REPO,
    SERVICE_ERR,
    build_module,
    clean_env,
    pam_service,
    pamtester,
)
from passphrases import MARKER, make

from keyhandoff import keyring
from keyhandoff.cache import KEY_PERM, SystemdCache
from keyhandoff.errors import KeyNotFound, KeyRevoked
from keyhandoff.secret import Secret

LOGIN_KEYNAME = "keyhandoff:login"


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PAM service files need root")


# --------------------------------------------------------------------------- building


def default_baked_path() -> list[str]:
    """What the build bakes by default (stdlib, site-packages, keyhandoff's parent)."""
    code = f"import runpy; print('\\n'.join(runpy.run_path({str(BUILD_SCRIPT)!r})"
    code += "['default_sys_path']()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    return out.split()


# --------------------------------------------------------------------------- keys


@pytest.fixture
def own_session() -> int:
    """A private session keyring without @u, inherited by pamtester (see module docstring)."""
    return keyring.join_session_keyring()


def put_key(description: str, passphrase: bytes, *, timeout: int, where: int) -> int:
    """Put a ``user`` key as keyhandoff.login does: perm and expiry before it is reachable."""
    with Secret.passphrase(passphrase) as secret:
        serial = keyring.add("user", description, secret, keyring.THREAD)
    try:
        keyring.set_perm(serial, KEY_PERM)
        keyring.set_timeout(serial, timeout)
        keyring.link(serial, where)
    finally:
        keyring.unlink(serial, keyring.THREAD)
    return serial


@pytest.fixture
def login_key(own_session):
    """Put the one-shot ``keyhandoff:login`` key (in the private session keyring)."""
    serials: list[int] = []

    def put(passphrase: bytes, *, timeout: int = 60) -> int:
        serial = put_key(LOGIN_KEYNAME, passphrase, timeout=timeout, where=own_session)
        serials.append(serial)
        return serial

    yield put
    for serial in serials:
        _discard(serial, own_session)


@pytest.fixture
def systemd_cache(own_session, tmp_path):
    """systemd's ``cryptsetup`` key through our writer (private keyring and ask dir)."""
    cache = SystemdCache(keyring_id=own_session, ask_dir=str(tmp_path))
    yield cache
    with contextlib.suppress(OSError):
        cache.clear()


def _discard(serial: int, parent: int) -> None:
    """Remove a key whatever its state (an expired key cannot be invalidated, only unlinked)."""
    with contextlib.suppress(OSError):
        keyring.invalidate(serial)
    with contextlib.suppress(OSError):
        keyring.unlink(serial, parent)


def key_exists(description: str) -> bool:
    """Whether a live key is reachable (an invalidated one reads as revoked until the GC)."""
    try:
        keyring.find("user", description)
    except (KeyNotFound, KeyRevoked):
        return False
    return True


# --------------------------------------------------------------------------- (a) one-shot key


def test_login_key_becomes_authtok_and_is_invalidated(pam_module, checker, login_key):
    passphrase = make("pam-login")
    login_key(passphrase)

    result = pamtester(f"auth requisite {pam_module}", checker.line())

    assert result.succeeded, result
    assert checker.token() == passphrase
    assert not key_exists(LOGIN_KEYNAME), "the one-shot key must be gone after use"
    # A second login finds nothing: the key cannot be replayed.
    again = pamtester(f"auth requisite {pam_module}", checker.line())
    assert not again.succeeded
    assert AUTHINFO_UNAVAIL in again.stdout + again.stderr
    assert checker.token() is None


def test_keep_leaves_the_key(pam_module, checker, login_key):
    passphrase = make("pam-keep")
    serial = login_key(passphrase)

    result = pamtester(f"auth requisite {pam_module} keep", checker.line())

    assert result.succeeded, result
    assert checker.token() == passphrase
    assert keyring.find("user", LOGIN_KEYNAME) == serial
    with keyring.read(serial) as still:
        assert bytes(still.view()) == passphrase


def test_unknown_option_is_a_service_error(pam_module, checker, login_key):
    login_key(make("pam-badopt"))
    result = pamtester(f"auth requisite {pam_module} kep", checker.line())
    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr
    assert checker.token() is None
    assert key_exists(LOGIN_KEYNAME), "a misconfigured module must not consume the key"


# --------------------------------------------------------------------------- (b) systemd's key


def test_cryptsetup_keyname_takes_the_last_entry(pam_module, checker, systemd_cache):
    first, second, last = make("typo"), make("other-volume"), make("pam-last")
    assert systemd_cache.add([Secret(first), Secret(second), Secret(last)], timeout=60)

    result = pamtester(f"auth requisite {pam_module} keyname=cryptsetup", checker.line())

    assert result.succeeded, result
    assert checker.token() == last
    assert not key_exists("cryptsetup"), "without keep, systemd's key is consumed too"


def test_cryptsetup_keyname_with_keep(pam_module, checker, systemd_cache):
    first, last = make("a"), make("b")
    systemd_cache.add([Secret(first), Secret(last)], timeout=60)

    result = pamtester(f"auth requisite {pam_module} keyname=cryptsetup keep", checker.line())

    assert result.succeeded, result
    assert checker.token() == last
    assert [bytes(s.view()) for s in systemd_cache.read()] == [first, last]


# --------------------------------------------------------------------------- (c) nothing there


@pytest.mark.usefixtures("own_session")
def test_nothing_cached_is_authinfo_unavail(pam_module, checker):
    assert not key_exists(LOGIN_KEYNAME)

    result = pamtester(f"auth requisite {pam_module}", checker.line())
    assert not result.succeeded
    assert AUTHINFO_UNAVAIL in result.stdout + result.stderr
    assert checker.token() is None, "requisite failed: pam_exec must not even run"

    # optional: the stack goes on, and no token was set (pam_exec prompts, reads EOF).
    pamtester(f"auth optional {pam_module}", checker.line())
    assert checker.token() in (None, b"")


def test_expired_login_key_is_authinfo_unavail(pam_module, checker, login_key):
    login_key(make("pam-expired"), timeout=1)
    time.sleep(2)
    result = pamtester(f"auth requisite {pam_module}", checker.line())
    assert not result.succeeded
    assert AUTHINFO_UNAVAIL in result.stdout + result.stderr
    assert checker.token() is None


# --------------------------------------------------------------------------- (d) fail closed

SHADOW_PAM_MODULE = '''
"""A broken keyhandoff: hands over a token, then raises."""
PAM_SUCCESS, PAM_SERVICE_ERR, PAM_AUTHINFO_UNAVAIL = 0, 3, 9
LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 3, 4, 6, 7


def authenticate(args, *, token_size, deliver, log):
    deliver(memoryview(TOKEN))
    raise RuntimeError("broken installation")
'''


def test_python_exception_never_succeeds(tmp_path_factory, checker, login_key):
    login_key(make("pam-raise-real"))
    shadow = tmp_path_factory.mktemp("shadow-raises")
    (shadow / "keyhandoff").mkdir()
    (shadow / "keyhandoff" / "__init__.py").write_text("")
    (shadow / "keyhandoff" / "pam_module.py").write_text(
        f"TOKEN = {make('pam-raise-partial')!r}\n" + SHADOW_PAM_MODULE,
    )
    baked = [str(shadow), *default_baked_path()]
    module = build_module(tmp_path_factory.mktemp("pam-raises"),
                          *[f"--sys-path={p}" for p in baked])

    result = pamtester(f"auth requisite {module}", "auth required pam_permit.so")
    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr

    # The token written before the exception must not have become PAM_AUTHTOK.
    pamtester(f"auth optional {module}", checker.line())
    assert checker.token() in (None, b"")


def test_import_failure_never_succeeds(tmp_path_factory, login_key):
    login_key(make("pam-noimport"))
    without_keyhandoff = [p for p in default_baked_path() if not (Path(p) / "keyhandoff").is_dir()]
    assert without_keyhandoff
    module = build_module(tmp_path_factory.mktemp("pam-noimport"),
                          *[f"--sys-path={p}" for p in without_keyhandoff])

    result = pamtester(f"auth requisite {module}", "auth required pam_permit.so")

    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr
    assert "Failed to initialize the Python-CFFI embedding logic" in result.stderr


def test_interpreter_that_cannot_start_never_succeeds(tmp_path_factory, login_key):
    login_key(make("pam-nostart"))
    nowhere = tmp_path_factory.mktemp("nowhere") / "missing"
    module = build_module(tmp_path_factory.mktemp("pam-nostdlib"), f"--sys-path={nowhere}")

    result = pamtester(f"auth requisite {module}", "auth required pam_permit.so")

    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr


def test_missing_libpython_never_succeeds(tmp_path_factory, login_key):
    login_key(make("pam-nolib"))
    module = build_module(tmp_path_factory.mktemp("pam-nolib"),
                          "--libpython=libpython-keyhandoff-missing.so.1")
    result = pamtester(f"auth requisite {module}", "auth required pam_permit.so")
    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr


# --------------------------------------------------------------------------- (e) isolation


def test_caller_environment_cannot_inject_python(pam_module, tmp_path, checker, login_key):
    """PYTHONPATH (sitecustomize, a shadow keyhandoff), PYTHONUSERBASE, PYTHONHOME: ignored."""
    marker = tmp_path / "injected"
    evil = tmp_path / "evil"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (evil / "keyhandoff").mkdir(parents=True)
    (evil / "sitecustomize.py").write_text(payload)
    (evil / "keyhandoff" / "__init__.py").write_text(payload)
    (evil / "keyhandoff" / "pam_module.py").write_text(payload)
    user_site = tmp_path / "userbase" / "lib" / f"python{sysconfig.get_python_version()}"
    (user_site / "site-packages").mkdir(parents=True)
    (user_site / "site-packages" / "usercustomize.py").write_text(payload)
    env = {
        **clean_env(),
        "PYTHONPATH": str(evil),
        "PYTHONUSERBASE": str(tmp_path / "userbase"),
    }
    # The payload is live: an ordinary Python started with this environment runs it.
    # The base interpreter (no venv .pth finders), run outside the repository (no cwd hit).
    python = os.path.realpath(sys.executable)
    subprocess.run([python, "-c", "import keyhandoff.pam_module"], env=env, check=True,
                   cwd=tmp_path)
    ran = set(marker.read_text().split())
    assert ran == {"sitecustomize", "usercustomize", "keyhandoff", "keyhandoff.pam_module"}, (
        "an injection payload did not work; this test would prove nothing"
    )
    marker.unlink()

    passphrase = make("pam-isolated")
    login_key(passphrase)
    # PYTHONHOME pointing at a tree without a stdlib: honoured, Python could not even start.
    result = pamtester(f"auth requisite {pam_module}", checker.line(),
                       env={**env, "PYTHONHOME": str(evil)})

    assert not marker.exists(), "code from the caller's environment ran inside the PAM module"
    assert result.succeeded, result
    assert checker.token() == passphrase


# --------------------------------------------------------------------------- (f) real pam_gdm


def test_pam_gdm_takes_the_last_entry_of_our_cryptsetup_key(pam_gdm, checker, systemd_cache):
    a, b = make("gdm-a"), make("gdm-b")
    systemd_cache.add([Secret(a), Secret(b)], timeout=60)

    result = pamtester(f"auth optional {pam_gdm}", checker.line())

    assert result.succeeded, result
    assert checker.token() == b
    assert key_exists("cryptsetup"), "pam_gdm does not consume the key"


def test_pam_gdm_after_our_key_expired(pam_gdm, checker, systemd_cache, own_session):
    systemd_cache.add([Secret(make("gdm-exp-a")), Secret(make("gdm-exp-b"))], timeout=1)
    serial = keyring.find("user", "cryptsetup")
    try:
        time.sleep(2)
        pamtester(f"auth optional {pam_gdm}", checker.line())
        assert checker.token() in (None, b""), "pam_gdm handed over an expired passphrase"

        result = pamtester(f"auth requisite {pam_gdm}", "auth required pam_permit.so")
        assert not result.succeeded
        assert AUTHINFO_UNAVAIL in result.stdout + result.stderr
    finally:
        _discard(serial, own_session)


def test_pam_gdm_only_sees_keys_its_session_reaches(pam_gdm, checker, systemd_cache):
    """pamtester in a new session keyring: the key it cannot reach is not handed over."""
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    systemd_cache.add([Secret(make("gdm-noposs"))], timeout=60)
    with pam_service(f"auth optional {pam_gdm}", checker.line()) as service:
        proc = subprocess.run(
            [keyctl, "session", "-", "pamtester", service, "root", "authenticate"],
            stdin=subprocess.DEVNULL, capture_output=True, check=False, env=clean_env(),
        )
    assert MARKER not in proc.stdout + proc.stderr
    assert checker.token() in (None, b"")


# --------------------------------------------------------------------------- possession


@pytest.fixture
def linked_keyring_key(own_session):
    """A uniquely named key in a keyring linked into the session, as @u is in production.

    Not root's real @u: other test runs' conftest clean-up treats any key that appears in
    @u during *their* test as their leftover and removes it.  The kernel rules are the
    same for any linked keyring: possession through the session link, and for root
    without possession the key is still listed in /proc/keys (uid 0 may view it), which
    ``find_key_by_type_and_desc`` falls back to, but not readable.
    """
    description = f"keyhandoff:login-test-{secrets.token_hex(6)}"
    stand_in = keyring.named_keyring(f"keyhandoff-test-u-{secrets.token_hex(4)}", own_session,
                                     KEY_PERM)
    serials: list[int] = []

    def put(passphrase: bytes) -> int:
        serial = put_key(description, passphrase, timeout=60, where=stand_in)
        serials.append(serial)
        return serial

    yield description, put
    for serial in serials:
        _discard(serial, stand_in)


def test_key_read_through_a_linked_keyring(pam_module, checker, linked_keyring_key):
    description, put = linked_keyring_key
    passphrase = make("pam-linked")
    put(passphrase)

    result = pamtester(f"auth requisite {pam_module} keyname={description}", checker.line())

    assert result.succeeded, result
    assert checker.token() == passphrase
    assert not key_exists(description)


def test_key_without_possession_is_not_read(pam_module, checker, linked_keyring_key):
    """0x3f010000: root without possession may view the key but not read it."""
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    description, put = linked_keyring_key
    serial = put(make("pam-no-possession"))
    line = f"auth requisite {pam_module} keyname={description}"
    with pam_service(line, checker.line()) as service:
        proc = subprocess.run(
            [keyctl, "session", "-", "pamtester", service, "root", "authenticate"],
            stdin=subprocess.DEVNULL, capture_output=True, check=False, env=clean_env(),
        )
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert MARKER.decode() not in out
    assert proc.returncode != 0
    assert AUTHINFO_UNAVAIL in out
    assert checker.token() is None
    assert keyring.find("user", description) == serial, "an unread key must not be consumed"
