"""The libkeyutils binding against the real kernel keyring (root)."""

import errno
import subprocess
import time

import pytest
from support.passphrases import make

from keyhandoff import keyring
from keyhandoff.cache import KEY_PERM
from keyhandoff.errors import (
    KeyExpired,
    KeyhandoffError,
    KeyNotFound,
    KeyRevoked,
    PermissionDenied,
    QuotaExceeded,
)
from keyhandoff.secret import Secret


def test_add_read_describe_in_session():
    pw = make("kr")
    serial = keyring.add("user", "kh-test:a", pw, keyring.SESSION)
    with keyring.read(serial) as got:
        assert bytes(got.view()) == pw
    d = keyring.describe(serial)
    assert (d.key_type, d.uid, d.description) == ("user", 0, "kh-test:a")
    assert keyring.search(keyring.SESSION, "user", "kh-test:a") == serial
    assert keyring.find("user", "kh-test:a") == serial
    assert serial in keyring.list_keyring(keyring.get_keyring_id(keyring.SESSION))


def test_update_replaces_payload_and_add_updates_in_place():
    serial = keyring.add("user", "kh-test:b", b"one", keyring.SESSION)
    assert keyring.add("user", "kh-test:b", b"two", keyring.SESSION) == serial
    keyring.update(serial, Secret(b"three"))
    with keyring.read(serial) as got:
        assert bytes(got.view()) == b"three"


def test_errno_funnel():
    with pytest.raises(KeyNotFound) as info:
        keyring.search(keyring.SESSION, "user", "kh-test:missing")
    assert info.value.errno == errno.ENOKEY
    assert isinstance(info.value, KeyhandoffError)
    serial = keyring.add("user", "kh-test:c", b"x", keyring.SESSION)
    keyring.revoke(serial)
    with pytest.raises(KeyRevoked):
        keyring.read(serial)
    serial = keyring.add("user", "kh-test:d", b"x", keyring.SESSION)
    keyring.invalidate(serial)
    # gone, or at least no longer possessed (unlinked everywhere) while the GC runs
    with pytest.raises((KeyNotFound, PermissionDenied)):
        keyring.read(serial)


def test_kernel_enforces_expiry_without_us():
    serial = keyring.add("user", "kh-test:exp", make("exp"), keyring.SESSION)
    keyring.set_timeout(serial, 2)
    [info] = keyring.proc_keys({serial})
    assert info.seconds_left is not None
    assert 1 <= info.seconds_left <= 2
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        # keyctl is a separate process: the key's end does not depend on anything of ours
        r = subprocess.run(["keyctl", "pipe", str(serial)], capture_output=True, check=False)
        if r.returncode != 0:
            break
        time.sleep(0.25)
    assert r.returncode != 0
    assert b"expired" in r.stderr.lower()
    with pytest.raises((KeyExpired, KeyNotFound)):
        keyring.read(serial)


def test_named_keyring_is_created_once():
    a = keyring.named_keyring("kh-test-ring", keyring.SESSION, KEY_PERM)
    b = keyring.named_keyring("kh-test-ring", keyring.SESSION)
    assert a == b
    assert keyring.describe(a).perm == KEY_PERM


def test_quota_maps_to_quota_exceeded():
    # A real EDQUOT: an unprivileged uid has a 20000-byte quota; fill it from a child process.
    code = (
        "from keyhandoff import keyring\n"
        "from keyhandoff.errors import QuotaExceeded\n"
        "keyring.join_session_keyring()\n"
        "try:\n"
        "    for i in range(1000):\n"
        "        keyring.add('user', f'kh-q{i}', b'x' * 4000, keyring.SESSION)\n"
        "except QuotaExceeded:\n"
        "    print('quota')\n"
    )
    import sys  # noqa: PLC0415

    r = subprocess.run(
        # CAP_DAC_READ_SEARCH only lets it import us from a checkout it could not read; the
        # key quota is the uid's, whatever its capabilities.
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.stdout.strip() == "quota", r.stderr
    assert QuotaExceeded.__mro__[1].__name__ == "KeyringError"


def test_permission_denied_for_setperm_on_foreign_key():
    serial = keyring.add("user", "kh-test:perm", b"x", keyring.SESSION)
    keyring.set_perm(serial, 0x01000000)  # possessor may only view: no setattr any more
    with pytest.raises(PermissionDenied):
        keyring.set_perm(serial, KEY_PERM)
    keyring.unlink(serial, keyring.SESSION)


def test_find_trusted_searches_only_from_the_keyring_given():
    serial = keyring.add("user", "kh-test:trusted", b"x", keyring.SESSION)
    keyring.set_perm(serial, KEY_PERM)
    assert keyring.find_trusted("user", "kh-test:trusted", perm=KEY_PERM,
                                within=keyring.SESSION) == serial
    # exact permissions: a superset is not ours
    with pytest.raises(KeyNotFound, match="not trusted"):
        keyring.find_trusted("user", "kh-test:trusted", perm=KEY_PERM | 0x3F,
                             within=keyring.SESSION)
    # not linked into @u: a search from there does not find it
    with pytest.raises(KeyNotFound):
        keyring.find_trusted("user", "kh-test:trusted", perm=KEY_PERM, within=keyring.USER)
    keyring.revoke(serial)
    with pytest.raises(KeyRevoked):
        keyring.find_trusted("user", "kh-test:trusted", perm=KEY_PERM, within=keyring.SESSION)
    keyring.unlink(serial, keyring.SESSION)


def test_describe_a_long_description():
    desc = "kh-test:" + "d" * 3000  # longer than describe()'s first buffer
    serial = keyring.add("user", desc, b"x", keyring.SESSION)
    d = keyring.describe(serial)
    assert (d.description, d.uid, d.key_type) == (desc, 0, "user")
    keyring.unlink(serial, keyring.SESSION)
