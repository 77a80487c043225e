"""PassphraseCache and SystemdCache against the real kernel keyring and real systemd."""

import os
import select
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_binary
from passphrases import make

from keyhandoff import keyring
from keyhandoff.cache import KEY_PERM, InvalidVolume, SystemdCache
from keyhandoff.errors import KeyExpired, KeyNotFound
from keyhandoff.secret import Secret, SecretError

ASK_DIR = Path("/run/systemd/ask-password")


def vol() -> str:
    return str(uuid.uuid4())


def test_put_get_list_forget(cache):
    v1, v2 = vol(), vol()
    pw1, pw2 = make("c1"), make("c2")
    cache.put(v1, Secret.passphrase(pw1), timeout=60)
    cache.put(v2.upper(), Secret.passphrase(pw2), timeout=30)  # UUIDs are normalised
    with cache.get(v1) as got:
        assert bytes(got.view()) == pw1
    with cache.get(v2) as got:
        assert bytes(got.view()) == pw2
    listed = {e.volume: e.seconds_left for e in cache.entries()}
    assert set(listed) >= {v1, v2}
    assert 50 <= listed[v1] <= 60
    assert 20 <= listed[v2] <= 30
    assert cache.forget(v1)
    assert not cache.forget(v1)
    with pytest.raises(KeyNotFound):
        cache.get(v1)
    assert cache.forget_all() >= 1
    assert cache.entries() == []


def test_replacing_an_entry_destroys_the_old_key(cache):
    v = vol()
    first = cache.put(v, Secret.passphrase(make("old")), timeout=60)
    new_pw = make("new")
    second = cache.put(v, Secret.passphrase(new_pw), timeout=60)
    assert first != second
    with pytest.raises(OSError):
        keyring.read(first)
    with cache.get(v) as got:
        assert bytes(got.view()) == new_pw
    assert [e.volume for e in cache.entries()].count(v) == 1


def test_every_key_has_permissions_and_a_kernel_timeout(cache):
    v = vol()
    serial = cache.put(v, Secret.passphrase(make("perm")), timeout=5)
    d = keyring.describe(serial)
    assert d.perm == KEY_PERM == 0x3F010000
    assert keyring.describe(cache.keyring_serial).perm == KEY_PERM
    [info] = keyring.proc_keys({serial})
    assert info.expiry != "perm"


@pytest.mark.parametrize("timeout", [0, -1, 86401, 1.5, True])
def test_no_entry_without_a_bounded_timeout(cache, timeout):
    with pytest.raises((ValueError, TypeError)):
        cache.put(vol(), Secret.passphrase(make("t")), timeout=timeout)
    assert cache.entries() == []


def test_entry_expires_in_the_kernel(cache):
    v = vol()
    cache.put(v, Secret.passphrase(make("exp")), timeout=2)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            cache.get(v).wipe()
        except (KeyExpired, KeyNotFound):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the kernel did not expire the entry")


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "12345678123412341234123456789abc",
                                 "../12345678-1234-1234-1234-123456789abc", "x" * 36])
def test_malformed_volume_refused(cache, bad):
    with pytest.raises(InvalidVolume):
        cache.put(bad, Secret.passphrase(make("v")), timeout=5)
    assert cache.entries() == []


@pytest.mark.parametrize("data", [b"", b"a" * 2049, b"ab\0cd"])
def test_bad_passphrase_refused_nothing_stored(cache, data):
    with pytest.raises(SecretError):
        cache.put(vol(), Secret(data, allow_empty=True), timeout=5)
    assert cache.entries() == []


# --- who can read: the permission matrix --------------------------------------------------

def _reader(serial: int, prefix: list[str]) -> str:
    """Whether the real ``keyctl`` (run after ``prefix``) can read the key's payload.

    A separate binary: no import of ours is needed in the other uid's process (a checkout in
    a 0700 directory is unreadable to it), and the payload goes to a pipe, never shown.
    """
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    r = subprocess.run([*prefix, keyctl, "pipe", str(serial)],
                       capture_output=True, timeout=20, check=False)
    if r.returncode == 0:
        return "read"
    return "refused " + r.stderr.decode(errors="replace").strip().rsplit(":", 1)[-1].strip()


def test_permission_matrix(cache):
    serial = cache.put(vol(), Secret.passphrase(make("matrix")), timeout=30)
    require_binary("keyctl", "apt-get install keyutils")
    # possessor (our session links @u, as KeyringMode=shared does): reads
    assert _reader(serial, []) == "read"
    # same uid, not possessing @u (a fresh session keyring): refused
    assert _reader(serial, ["keyctl", "session", "-"]).startswith("refused")
    # another uid, in a session of its own: refused
    other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "keyctl", "session", "-"]
    assert _reader(serial, other).startswith("refused")
    # the owner can see that the key exists (view) but not read it
    d = keyring.describe(serial)
    assert d.uid == 0
    assert d.perm & 0x00FF0000 == 0x00010000  # owner: view only
    assert d.perm & 0x0000FFFF == 0  # group, other: nothing


def test_another_uid_inheriting_our_session_possesses_it(cache):
    """Why units must not share a session keyring linking @u with unprivileged processes.

    Possession follows the process's keyrings, not its uid: this documents (and would
    catch a change in) the kernel rule SECURITY.md relies on.
    """
    serial = cache.put(vol(), Secret.passphrase(make("inherit")), timeout=30)
    other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert _reader(serial, other) == "read"


# --- systemd's cryptsetup key ---------------------------------------------------------------


@pytest.fixture
def systemd_key():
    name = f"kh-test-cryptsetup-{os.getpid()}-{time.monotonic_ns()}"
    sc = SystemdCache(keyname=name)
    yield sc
    sc.clear()


def _raw(sc: SystemdCache) -> bytes:
    with keyring.read(keyring.find("user", sc.keyname)) as raw:
        return bytes(raw.view())


def _ask_cached(name: str) -> subprocess.CompletedProcess[bytes]:
    exe = require_binary("systemd-ask-password", "apt-get install systemd")
    return subprocess.run(
        [exe, "--no-tty", f"--keyname={name}", "--accept-cached", "--multiple",
         "--timeout=2", "kh test"],
        capture_output=True, timeout=20, check=False,
    )


def test_writer_format_matches_systemd(systemd_key):
    a, b = make("a"), make("b")
    assert systemd_key.add([Secret(a)])
    assert _raw(systemd_key) == a  # no trailing NUL
    assert systemd_key.add([Secret(b), Secret(a)])  # a is a duplicate: skipped
    assert _raw(systemd_key) == a + b"\0" + b
    assert not systemd_key.add([Secret(a), Secret(b"", allow_empty=True)])  # nothing new
    serial = keyring.find("user", systemd_key.keyname)
    assert keyring.describe(serial).perm == 0x3F010000
    [info] = keyring.proc_keys({serial})
    assert info.seconds_left is not None
    assert 120 <= info.seconds_left <= 150  # /proc/keys rounds 150 s down to "2m"


def test_duplicate_does_not_refresh_timeout(systemd_key):
    a = make("a")
    systemd_key.add([Secret(a)], timeout=3)
    assert not systemd_key.add([Secret(a)], timeout=150)
    [info] = keyring.proc_keys({keyring.find("user", systemd_key.keyname)})
    assert info.seconds_left is not None
    assert info.seconds_left <= 3


def test_systemd_ask_password_reads_what_we_wrote(systemd_key):
    a, b = make("a"), make("b")
    systemd_key.add([Secret(a), Secret(b)])
    r = _ask_cached(systemd_key.keyname)
    assert r.returncode == 0, r.stderr
    assert r.stdout == a + b"\n" + b + b"\n"


def test_reader_accepts_trailing_nul_and_skips_empty(systemd_key):
    a, b = make("a"), make("b")
    keyring.add("user", systemd_key.keyname, a + b"\0" + b + b"\0", keyring.USER)
    got = systemd_key.read()
    assert [bytes(s.view()) for s in got] == [a, b]
    last = systemd_key.last()
    assert last is not None
    assert bytes(last.view()) == b


def test_missing_key_reads_empty(systemd_key):
    assert systemd_key.read() == []
    assert systemd_key.last() is None


def _wait_ask_file(known: set[str], timeout: float = 10) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in ASK_DIR.glob("ask.*"):
            if p.name not in known:
                return p
        select.select([], [], [], 0.05)
    pytest.fail("no ask file appeared")


def test_we_read_what_systemd_ask_password_stored(systemd_key):
    """systemd-ask-password asks, the real systemd-reply-password answers, systemd caches it."""
    exe = require_binary("systemd-ask-password", "apt-get install systemd")
    reply = Path("/lib/systemd/systemd-reply-password")
    if not reply.exists():
        require_binary("systemd-reply-password", "apt-get install systemd")
    created_dir = not ASK_DIR.exists()
    ASK_DIR.mkdir(parents=True, exist_ok=True)
    known = {p.name for p in ASK_DIR.glob("ask.*")}
    first, second = make("typed1"), make("typed2")
    try:
        for pw in (first, second, first):
            q = subprocess.Popen(
                [exe, "--no-tty", f"--keyname={systemd_key.keyname}", "--timeout=10", "kh test"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                ask = _wait_ask_file(known)
                socket_line = next(line for line in ask.read_text().splitlines()
                                   if line.startswith("Socket="))
                subprocess.run([str(reply), "1", socket_line[len("Socket="):]],
                               input=pw + b"\n", timeout=10, check=True)
                out, _err = q.communicate(timeout=10)
                assert out == pw + b"\n"
            finally:
                if q.poll() is None:
                    q.kill()
                    q.wait()
        assert [bytes(s.view()) for s in systemd_key.read()] == [first, second]
        assert _raw(systemd_key) == first + b"\0" + second
    finally:
        if created_dir:
            for p in ASK_DIR.iterdir():
                p.unlink()
            ASK_DIR.rmdir()
