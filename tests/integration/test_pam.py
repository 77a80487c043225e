"""pam_keyhandoff.so (csrc/) and gdm's pam_gdm.so under the real Linux-PAM, driven by pamtester.

Each test writes its own service file ``/etc/pam.d/keyhandoff-test-<random>`` and removes
it afterwards.  ``PAM_AUTHTOK`` is observed with ``pam_exec.so expose_authtok``: a checker
script writes the token it receives on stdin to a 0600 file in the test's tmp_path (never
to any output).  pamtester is a child of the test and inherits its session keyring: the
situation of gdm.service with ``KeyringMode=shared``, whose session keyring links root's
``@u``.

Root's ``@u`` is one per machine: other test runs put ``keyhandoff:login`` and
``cryptsetup`` keys there, and ``add_key`` of the same name updates a key in place.  So
most tests here put their keys into a private session keyring that does *not* link ``@u``
(``own_session``): the module searches the session keyring recursively, so a key directly
in it is possessed exactly like one in a linked ``@u``, and nothing outside the test can
reach or shadow it.  Possession through a linked keyring is tested with a stand-in for
``@u`` (``linked_keyring_key``).

The trust rule (csrc/pam_keyhandoff.c): only a key found by ``keyctl_search`` from the
session keyring, of type ``user`` with the exact description, owned by uid 0, with
permissions exactly 0x3f010000 is read.  The adversarial tests below make every other
kind of key as a real unprivileged user (``setpriv`` to uid 65534) or as root.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from support.pam_stack import (
    AUTHINFO_UNAVAIL,
    SERVICE_ERR,
    clean_env,
    pam_service,
    pamtester,
)
from support.parts import require_binary
from support.passphrases import MARKER, make

from keyhandoff import keyring
from keyhandoff.cache import KEY_PERM, SystemdCache
from keyhandoff.errors import KeyNotFound, KeyRevoked
from keyhandoff.secret import MAX_PASSPHRASE, Secret

LOGIN_KEYNAME = "keyhandoff:login"
PADDED_SIZE = 4096
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PAM service files need root")


# --------------------------------------------------------------------------- payloads


def pad(secret: bytes, *, length: int | None = None, size: int = PADDED_SIZE) -> bytes:
    """keyhandoff's padded payload (COMMON format); ``length``/``size`` forge bad ones."""
    head = struct.pack(">H", len(secret) if length is None else length)
    body = head + secret
    return body + bytes(max(0, size - len(body)))


# --------------------------------------------------------------------------- keys


@pytest.fixture
def own_session() -> int:
    """A private session keyring without @u, inherited by pamtester (see module docstring)."""
    return keyring.join_session_keyring()


def put_key(description: str, payload: bytes, *, timeout: int, where: int,
            perm: int = KEY_PERM) -> int:
    """Put a ``user`` key as keyhandoff does: perm and expiry before it is reachable."""
    serial = keyring.add("user", description, Secret(payload), keyring.THREAD)
    try:
        keyring.set_perm(serial, perm)
        keyring.set_timeout(serial, timeout)
        keyring.link(serial, where)
    finally:
        keyring.unlink(serial, keyring.THREAD)
    return serial


@pytest.fixture
def raw_key(own_session):
    """Put any payload under any description (in the private session keyring)."""
    serials: list[int] = []

    def put(description: str, payload: bytes, *, timeout: int = 60, perm: int = KEY_PERM) -> int:
        serial = put_key(description, payload, timeout=timeout, where=own_session, perm=perm)
        serials.append(serial)
        return serial

    yield put
    for serial in serials:
        _discard(serial, own_session)


@pytest.fixture
def login_key(raw_key):
    """Put the one-shot ``keyhandoff:login`` key, padded as keyhandoff.login writes it."""

    def put(passphrase: bytes, *, timeout: int = 60) -> int:
        return raw_key(LOGIN_KEYNAME, pad(passphrase), timeout=timeout)

    return put


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


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def refused(result, checker) -> bool:
    """The module answered AUTHINFO_UNAVAIL and no PAM_AUTHTOK reached the next module."""
    return (not result.succeeded and AUTHINFO_UNAVAIL in result.stdout + result.stderr
            and checker.token() is None)


# --------------------------------------------------------------------------- the artifact


def test_module_is_plain_c_with_only_pam_entry_points(pam_module):
    """No interpreter: libpam, libkeyutils, libc only; only pam_sm_* exported; hardened."""
    readelf = require_binary("readelf", "apt-get install binutils")
    dyn = subprocess.run([readelf, "-dW", str(pam_module)], capture_output=True, text=True,
                         check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^]]+)\]", dyn))
    assert needed == {"libpam.so.0", "libkeyutils.so.1", "libc.so.6"}, needed
    assert re.search(r"\(FLAGS\).*BIND_NOW", dyn) or "(BIND_NOW)" in dyn, dyn
    assert re.search(r"\(FLAGS_1\).*NOW", dyn), dyn

    phdrs = subprocess.run([readelf, "-lW", str(pam_module)], capture_output=True, text=True,
                           check=True).stdout
    assert "GNU_RELRO" in phdrs

    syms = subprocess.run([readelf, "--dyn-syms", "-W", str(pam_module)], capture_output=True,
                          text=True, check=True).stdout
    defined, undefined = set(), set()
    for line in syms.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[4] in {"GLOBAL", "WEAK"}:
            name = cols[7].split("@")[0]
            (undefined if cols[6] == "UND" else defined).add(name)
    assert defined == {"pam_sm_authenticate", "pam_sm_setcred", "pam_sm_acct_mgmt",
                       "pam_sm_open_session", "pam_sm_close_session", "pam_sm_chauthtok"}
    # The lookup is keyctl_search from a possessed keyring: never the /proc/keys fallback
    # of find_key_by_type_and_desc, never a request_key upcall.
    assert {"keyctl_search", "keyctl_describe_alloc", "keyctl_read", "keyctl_invalidate",
            "pam_set_item"} <= undefined, undefined
    assert {"explicit_bzero", "__explicit_bzero_chk"} & undefined  # _FORTIFY_SOURCE: _chk
    assert not {"find_key_by_type_and_desc", "request_key", "keyctl_read_alloc"} & undefined
    assert not any(s.startswith("Py") for s in undefined)


# --------------------------------------------------------------------------- (a) one-shot key


@pytest.fixture
def probing_checker(tmp_path):
    """pam_exec after our module: records the token AND whether keyhandoff:login still exists.

    (The description is in the script: pam_exec runs it with the PAM environment only.)"""
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    token_file, probe_file = tmp_path / "authtok", tmp_path / "probe"
    script = tmp_path / "probe.sh"
    script.write_text(
        "#!/bin/sh\numask 077\n"
        f'cat > "{token_file}"\n'
        f"{keyctl} search @s user {LOGIN_KEYNAME} >/dev/null 2>&1; echo $? > '{probe_file}'\n",
    )
    script.chmod(0o700)

    @dataclass
    class Probe:
        def line(self) -> str:
            return f"auth required pam_exec.so expose_authtok quiet {script}"

        def token(self) -> bytes | None:
            if not token_file.exists():
                return None
            data = token_file.read_bytes()
            token_file.unlink()
            return data.removesuffix(b"\0")

        def key_found_by_next_module(self) -> bool:
            return probe_file.read_text().strip() == "0"

    yield Probe()
    token_file.unlink(missing_ok=True)


def test_login_key_becomes_authtok_and_is_invalidated(pam_module, probing_checker, login_key):
    passphrase = make("pam-login")
    login_key(passphrase)

    result = pamtester(f"auth requisite {pam_module}", probing_checker.line())

    assert result.succeeded, result
    assert probing_checker.token() == passphrase
    # Invalidated before the token was handed on: the next module cannot find the key.
    assert not probing_checker.key_found_by_next_module()
    assert not key_exists(LOGIN_KEYNAME), "the one-shot key must be gone after use"
    # A second login finds nothing: the key cannot be replayed.
    again = pamtester(f"auth requisite {pam_module}", probing_checker.line())
    assert not again.succeeded
    assert AUTHINFO_UNAVAIL in again.stdout + again.stderr
    assert probing_checker.token() is None


def test_keep_leaves_the_key(pam_module, probing_checker, login_key):
    passphrase = make("pam-keep")
    serial = login_key(passphrase)

    result = pamtester(f"auth requisite {pam_module} keep", probing_checker.line())

    assert result.succeeded, result
    assert probing_checker.token() == passphrase
    assert probing_checker.key_found_by_next_module()
    assert keyring.find("user", LOGIN_KEYNAME) == serial
    with keyring.read(serial) as still:
        assert bytes(still.view()) == pad(passphrase)


@pytest.mark.parametrize("options", ["kep", "keyname=", "keyname", "debug", "keep kep",
                                     "keyname=cryptsetup Keep"])
def test_unknown_option_is_a_service_error(pam_module, checker, login_key, options):
    login_key(make("pam-badopt"))
    result = pamtester(f"auth requisite {pam_module} {options}", checker.line())
    assert not result.succeeded
    assert SERVICE_ERR in result.stdout + result.stderr
    assert checker.token() is None
    assert key_exists(LOGIN_KEYNAME), "a misconfigured module must not consume the key"


def test_last_keyname_option_wins(pam_module, checker, login_key):
    passphrase = make("pam-lastopt")
    login_key(passphrase)
    result = pamtester(f"auth requisite {pam_module} keyname=cryptsetup keyname={LOGIN_KEYNAME}",
                       checker.line())
    assert result.succeeded, result
    assert checker.token() == passphrase


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


# pam_exec passes at most 511 bytes of PAM_AUTHTOK on (PAM_MAX_RESP_SIZE) and libpam gives
# PAM_AUTHTOK to modules only (PAM_BAD_ITEM for an application), so the exact token of the
# format tests is read by this test-only module after ours: it writes PAM_AUTHTOK to a 0600
# file, or nothing when there is none (its source: tests/support/pam_authtok_dump.c).
AUTHTOK_DUMP_C = Path(__file__).resolve().parents[1] / "support" / "pam_authtok_dump.c"


@pytest.fixture(scope="session")
def authtok_dump_module(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("authtok-dump")
    subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-o",
                    str(out / "pam_authtok_dump.so"), str(AUTHTOK_DUMP_C), "-lpam"],
                   check=True, capture_output=True)
    return out / "pam_authtok_dump.so"


@pytest.fixture
def exact_token(authtok_dump_module, tmp_path):
    """Run a stack of ``lines`` + the dump module; return (pamtester result, token | None)."""
    token_file = tmp_path / "exact-authtok"

    def run(*lines: str):
        token_file.unlink(missing_ok=True)
        result = pamtester(*lines, f"auth required {authtok_dump_module} {token_file}")
        if not token_file.exists():
            return result, None
        assert token_file.stat().st_mode & 0o077 == 0
        data = token_file.read_bytes()
        token_file.unlink()
        return result, data

    yield run
    token_file.unlink(missing_ok=True)


A, B = make("entry-a"), make("entry-b")
LONGEST = MARKER + b"x" * (MAX_PASSPHRASE - len(MARKER))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (A, A),
        (A + b"\0" + B, B),
        (A + b"\0" + B + b"\0", B),          # older writers' trailing NUL
        (A + b"\0\0", A),
        (b"\0", None),
        (b"\0\0" + B, B),
        (A + b"\0" + LONGEST, LONGEST),      # 2048 bytes: systemd's limit, accepted
        (A + b"\0" + LONGEST + b"y", None),  # 2049: never cut to a partial token
    ],
    ids=["one", "two", "trailing-nul", "trailing-nuls", "only-nul", "leading-nuls",
         "2048", "2049"],
)
def test_systemd_format_last_entry(pam_module, exact_token, raw_key, payload, expected):
    name = unique("kh-test-systemd-")
    raw_key(name, payload)
    result, token = exact_token(f"auth requisite {pam_module} keyname={name} keep")
    if expected is None:
        assert not result.succeeded
        assert AUTHINFO_UNAVAIL in result.stdout + result.stderr
        assert token is None
    else:
        assert result.succeeded, result
        assert token == expected, (len(token or b""), len(expected))


# --------------------------------------------------------------------------- (b') our format


PW = make("padded")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (pad(PW), PW),
        (pad(b"k"), b"k"),
        (pad(LONGEST), LONGEST),
        (pad(LONGEST + b"y"), None),                     # L = 2049 > MAX_PASSPHRASE
        (pad(b"x" * 4094), None),                        # largest L: well-formed, too long
        (pad(PW, length=0), None),                       # L = 0
        (pad(PW, length=4095), None),                    # L beyond the payload
        (pad(PW, length=len(PW) - 1), None),             # L short: the rest is not zero
        (pad(PW)[:-1], None),                            # 4095 bytes
        (pad(PW) + b"\0", None),                         # 4097 bytes
        (pad(PW)[:-1] + b"\1", None),                    # non-zero padding
        (pad(PW[:4] + b"\0" + PW[4:]), None),            # a NUL inside cannot be a C string
        (PW, None),                                      # unpadded: not our format
        (A + b"\0" + PW, None),                          # systemd format under our name
    ],
    ids=["good", "one-byte", "2048", "2049", "4094", "L0", "L4095", "L-short", "size-4095",
         "size-4097", "nonzero-pad", "nul-inside", "unpadded", "entries"],
)
def test_padded_format(pam_module, exact_token, raw_key, payload, expected):
    name = unique("keyhandoff:test-")
    raw_key(name, payload)
    result, token = exact_token(f"auth requisite {pam_module} keyname={name} keep")
    if expected is None:
        assert not result.succeeded
        assert AUTHINFO_UNAVAIL in result.stdout + result.stderr
        assert token is None
    else:
        assert result.succeeded, result
        assert token == expected, (len(token or b""), len(expected))


def test_malformed_one_shot_key_is_consumed_and_gives_nothing(pam_module, checker, raw_key):
    """One-shot: a key that was read is invalidated whatever it held (as before the rewrite)."""
    raw_key(LOGIN_KEYNAME, PW)  # unpadded
    assert refused(pamtester(f"auth requisite {pam_module}", checker.line()), checker)
    assert not key_exists(LOGIN_KEYNAME)


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


def test_revoked_key_is_authinfo_unavail(pam_module, checker, login_key):
    keyring.revoke(login_key(make("pam-revoked")))
    assert refused(pamtester(f"auth requisite {pam_module}", checker.line()), checker)


# --------------------------------------------------------------------------- (d) other stacks


def _pamtester_op(service_lines: list[str], operation: str) -> subprocess.CompletedProcess:
    with pam_service(*service_lines) as service:
        return subprocess.run(["pamtester", service, "root", operation],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False, env=clean_env())


@pytest.mark.parametrize("operation", ["acct_mgmt", "open_session", "close_session"])
def test_account_and_session_are_ignored(pam_module, login_key, operation):
    """PAM_IGNORE: no opinion (alone it cannot make a stack succeed), and nothing read."""
    login_key(make("pam-ignore"))
    kind = "account" if operation == "acct_mgmt" else "session"
    alone = _pamtester_op([f"{kind} required {pam_module}"], operation)
    assert alone.returncode != 0, alone
    with_permit = _pamtester_op([f"{kind} required {pam_module}",
                                 f"{kind} required pam_permit.so"], operation)
    assert with_permit.returncode == 0, with_permit
    assert key_exists(LOGIN_KEYNAME)


def test_password_stack_is_a_service_error(pam_module, login_key):
    login_key(make("pam-chauthtok"))
    proc = _pamtester_op([f"password required {pam_module}"], "chauthtok")
    assert proc.returncode != 0
    assert SERVICE_ERR in proc.stdout + proc.stderr
    assert key_exists(LOGIN_KEYNAME)


class _PamConv(ctypes.Structure):
    _fields_: ClassVar = [
        ("conv", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p)),
        ("appdata_ptr", ctypes.c_void_p),
    ]


@contextlib.contextmanager
def pam_handle(*service_lines: str):
    """A real libpam handle in this process (for what pamtester cannot do or show)."""
    libpam = ctypes.CDLL("libpam.so.0")
    libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                                 ctypes.c_void_p]
    libpam.pam_get_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    no_conversation = _PamConv._fields_[0][1](lambda *_args: 19)  # PAM_CONV_ERR: never asks
    conv = _PamConv(no_conversation, None)
    handle = ctypes.c_void_p()
    with pam_service(*service_lines) as service:
        rc = libpam.pam_start(service.encode(), b"root", ctypes.byref(conv),
                              ctypes.byref(handle))
        assert rc == 0, rc
        try:
            yield libpam, handle
        finally:
            libpam.pam_end(handle, 0)


def _pam_setcred(*service_lines: str) -> int:
    """pam_setcred(PAM_ESTABLISH_CRED) through the real libpam (pamtester has no setcred)."""
    with pam_handle(*service_lines) as (libpam, handle):
        return int(libpam.pam_setcred(handle, 0x0002))


def test_setcred_succeeds_and_reads_nothing(pam_module, login_key):
    """Like pam_gdm: no credentials to establish (PAM_SUCCESS); pam_deny shows the contrast."""
    login_key(make("pam-setcred"))
    assert _pam_setcred(f"auth required {pam_module}") == 0
    assert _pam_setcred("auth required pam_deny.so") != 0
    assert key_exists(LOGIN_KEYNAME)


# --------------------------------------------------------------------------- (e) adversaries


@contextlib.contextmanager
def nobodys_key(description: str, payload: bytes, perm: int = 0x3F3F3F3F):
    """A key made by a real unprivileged process (uid/gid 65534) in its OWN session keyring.

    The process stays alive (its session keyring, and with it the key, lives while it
    does); yields the key's serial; the process is ended by its PID.  The payload goes
    through stdin, never argv.
    """
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    script = (
        f'id=$({keyctl} padd user "$1" @s) && {keyctl} setperm "$id" {perm:#x} && '
        f'{keyctl} timeout "$id" 60 && echo "$id" && exec sleep 60'
    )
    proc = subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         keyctl, "session", "-", "sh", "-c", script, "sh", description],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(), cwd="/",
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.close()
        line = proc.stdout.readline().strip()
        assert line.isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
        serial = int(line)
        info = keyring.describe(serial)  # root may view it: 0x3f3f3f3f gives "other" view
        assert (info.uid, info.perm) == (NOBODY, perm), info
        yield serial
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _payload_for(keyname: str, secret: bytes) -> bytes:
    """What a forger would write to pass the format check of that keyname."""
    return pad(secret) if keyname.startswith("keyhandoff:") else secret


@pytest.mark.parametrize("keyname", [LOGIN_KEYNAME, "cryptsetup"])
@pytest.mark.usefixtures("own_session")
def test_key_of_another_user_in_its_own_keyring_is_not_read(pam_module, checker, keyname):
    """Finding 2: uid 65534 adds keyhandoff:login / cryptsetup, 0x3f3f3f3f, in ITS @s.

    The old module (find_key_by_type_and_desc) found it through /proc/keys and handed
    nobody's chosen passphrase to root's stack with PAM_SUCCESS."""
    chosen = make("chosen-by-nobody")
    opt = f" keyname={keyname}" if keyname != LOGIN_KEYNAME else ""
    with nobodys_key(keyname, _payload_for(keyname, chosen)):
        result = pamtester(f"auth requisite {pam_module}{opt} keep", checker.line())
        assert refused(result, checker), result


@pytest.mark.parametrize("keyname", [LOGIN_KEYNAME, "cryptsetup"])
def test_key_of_another_user_linked_into_our_session_is_not_read(pam_module, checker,
                                                                 own_session, keyname):
    """A nobody-owned key that root's PAM process really possesses: the owner check."""
    chosen = make("linked-by-nobody")
    opt = f" keyname={keyname}" if keyname != LOGIN_KEYNAME else ""
    with nobodys_key(keyname, _payload_for(keyname, chosen)) as serial:
        keyring.link(serial, own_session)
        try:
            assert keyring.search(own_session, "user", keyname) == serial  # possessed
            result = pamtester(f"auth requisite {pam_module}{opt}", checker.line())
            assert refused(result, checker), result
            keyring.describe(serial)  # not consumed either: the module never touched it
        finally:
            with contextlib.suppress(OSError):
                keyring.unlink(serial, own_session)


@pytest.mark.parametrize("perm", [0x3F3F0000, 0x3F3F3F3F, 0x3F010001, 0x3F000000, 0x3F030000],
                         ids=lambda perm: f"{perm:#010x}")
@pytest.mark.parametrize("keyname", [LOGIN_KEYNAME, "cryptsetup"])
def test_root_key_with_other_permissions_is_not_read(pam_module, checker, raw_key, keyname,
                                                     perm):
    """Root-owned, possessed, but not the permissions keyhandoff and systemd set."""
    opt = f" keyname={keyname}" if keyname != LOGIN_KEYNAME else ""
    serial = raw_key(keyname, _payload_for(keyname, make("wrong-perm")), perm=perm)
    result = pamtester(f"auth requisite {pam_module}{opt}", checker.line())
    assert refused(result, checker), result
    assert keyring.describe(serial).perm == perm  # not consumed


def test_root_key_given_to_another_owner_is_not_read(pam_module, checker, raw_key):
    """Possessed, 0x3f010000, but chowned away from uid 0."""
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    serial = raw_key(LOGIN_KEYNAME, pad(make("chowned")))
    subprocess.run([keyctl, "chown", str(serial), str(NOBODY)], check=True,
                   capture_output=True)
    assert refused(pamtester(f"auth requisite {pam_module}", checker.line()), checker)


# --------------------------------------------------------------------------- (f) the log

# Run pamtester in a private mount namespace whose /dev is a tmpfs with the usual character
# devices bound in and our own datagram socket at /dev/log: every pam_syslog line of the
# module arrives here (this host has no syslog daemon, and the journal is shared).
SYSLOG_HELPER = r"""
import json, os, socket, subprocess, sys, tempfile
service = sys.argv[1]
old = tempfile.mkdtemp(prefix="kh-olddev-")
def mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True)
mount("--rbind", "/dev", old)
mount("-t", "tmpfs", "-o", "mode=0755", "kh-devlog", "/dev")
for node in ("null", "zero", "full", "random", "urandom"):
    open("/dev/" + node, "w").close()
    mount("--bind", os.path.join(old, node), "/dev/" + node)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/dev/log")
proc = subprocess.run(["pamtester", service, "root", "authenticate"],
                      stdin=subprocess.DEVNULL, capture_output=True)
sock.setblocking(False)
logs = []
while True:
    try:
        logs.append(sock.recv(65536).decode("utf-8", "replace"))
    except BlockingIOError:
        break
print(json.dumps({"rc": proc.returncode, "out": proc.stdout.decode("utf-8", "replace"),
                  "err": proc.stderr.decode("utf-8", "replace"), "logs": logs}))
"""


def pamtester_logged(tmp_path: Path, *lines: str) -> tuple[str, list[str]]:
    """pamtester over ``lines``; returns (its output, the syslog lines it sent)."""
    unshare = require_binary("unshare", "apt-get install util-linux")
    helper = tmp_path / "syslog_helper.py"
    helper.write_text(SYSLOG_HELPER)
    with pam_service(*lines) as service:
        proc = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "python3", str(helper), service],
            capture_output=True, text=True, check=False, env=clean_env(), timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    return got["out"] + got["err"], got["logs"]


def test_the_log_names_keys_and_never_holds_a_passphrase(pam_module, tmp_path, checker,
                                                         login_key, raw_key, own_session):
    passphrase = make("pam-logged")
    login_key(passphrase)
    out, logs = pamtester_logged(tmp_path, f"auth requisite {pam_module}", checker.line())
    assert "successfully authenticated" in out
    assert checker.token() == passphrase
    assert any("pam_keyhandoff" in m and "passphrase from key 'keyhandoff:login' handed to "
               "PAM_AUTHTOK (key invalidated)" in m for m in logs), logs

    malformed = unique("keyhandoff:test-log-")
    raw_key(malformed, make("unpadded-in-log"))
    out, more = pamtester_logged(tmp_path, f"auth requisite {pam_module} keyname={malformed}")
    assert AUTHINFO_UNAVAIL in out
    assert any(f"key '{malformed}' holds no usable passphrase" in m for m in more), more
    logs += more

    with nobodys_key("cryptsetup", make("nobody-in-log")) as serial:
        keyring.link(serial, own_session)
        try:
            out, more = pamtester_logged(tmp_path, f"auth requisite {pam_module} "
                                                   "keyname=cryptsetup")
        finally:
            keyring.unlink(serial, own_session)
    assert AUTHINFO_UNAVAIL in out
    assert any(f"key {serial} named 'cryptsetup' is not trusted (owner uid 65534, "
               "permissions 3f3f3f3f" in m for m in more), more
    logs += more

    out, more = pamtester_logged(tmp_path, f"auth requisite {pam_module} kep")
    assert SERVICE_ERR in out
    assert any("configuration error: unknown option 'kep'" in m for m in more), more
    logs += more

    assert not [m for m in logs if MARKER.decode() in m], "a passphrase reached the log"


# --------------------------------------------------------------------------- (g) real pam_gdm


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
    same for any linked keyring: possession through the session link; without it, root
    may still view the key (it is listed in /proc/keys) but not read it.
    """
    description = unique("keyhandoff:login-test-")
    stand_in = keyring.named_keyring(f"keyhandoff-test-u-{secrets.token_hex(4)}", own_session,
                                     KEY_PERM)
    serials: list[int] = []

    def put(passphrase: bytes) -> int:
        serial = put_key(description, pad(passphrase), timeout=60, where=stand_in)
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


@pytest.mark.usefixtures("own_session")
def test_pam_gdm_reads_another_users_cryptsetup_key(pam_gdm, checker):
    """A fact about gdm's module, not ours (SECURITY.md, "What is not protected").

    pam_gdm looks up ``cryptsetup`` with find_key_by_type_and_desc, which falls back to
    /proc/keys when root's stack possesses no such key: uid 65534's key, made in its own
    session with open permissions, becomes root's PAM_AUTHTOK.  If gdm ever fixes this, this
    test fails and SECURITY.md's note goes."""
    chosen = make("chosen-for-gdm")
    with nobodys_key("cryptsetup", chosen):
        result = pamtester(f"auth requisite {pam_gdm}", checker.line())
    assert result.succeeded, result
    assert checker.token() == chosen
