"""PassphraseCache and SystemdCache against the real kernel keyring and real systemd."""

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.agent_process import ASK_DIR, ask, ask_file_of, finish, type_answer
from support.parts import require, require_binary
from support.passphrases import make

from keyhandoff import keyring
from keyhandoff.cache import KEY_PERM, InvalidVolume, SystemdCache
from keyhandoff.errors import KeyExpired, KeyNotFound
from keyhandoff.secret import Secret, SecretError


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


# --- one-time keys: their own key name, beside the passphrase -------------------------------


def test_a_one_time_key_has_its_own_name_beside_the_passphrase(cache):
    v = vol()
    pw, otk = make("pass"), make("onetime")
    passphrase = cache.put(v, Secret.passphrase(pw), timeout=60)
    onetime = cache.put_onetime(v.upper(), Secret.passphrase(otk), timeout=30)  # normalised
    assert onetime != passphrase
    assert keyring.describe(onetime).description == f"keyhandoff:onetime:{v}"
    assert keyring.describe(onetime).perm == KEY_PERM
    [info] = keyring.proc_keys({onetime})
    assert info.seconds_left is not None
    assert 20 <= info.seconds_left <= 30
    with cache.get(v) as got:
        assert bytes(got.view()) == pw  # the one-time key did not displace the passphrase
    serial, got = cache.get_onetime_entry(v)
    with got:
        assert (serial, bytes(got.view())) == (onetime, otk)
    # entries() lists passphrases; the one-time key is listed on its own
    assert [(e.volume, e.serial) for e in cache.entries()] == [(v, passphrase)]
    assert [(e.volume, e.serial) for e in cache.onetime_entries()] == [(v, onetime)]
    # forgetting the passphrase leaves the one-time key, and the other way round
    assert cache.forget(v)
    with cache.get_onetime(v) as got:
        assert bytes(got.view()) == otk
    assert cache.forget_onetime(v)
    assert not cache.forget_onetime(v)
    with pytest.raises(KeyNotFound, match="keyhandoff:onetime:"):
        cache.get_onetime(v)
    assert cache.onetime_entries() == []


def test_a_new_one_time_key_replaces_the_old_one(cache):
    v = vol()
    first = cache.put_onetime(v, Secret.passphrase(make("ot1")), timeout=60)
    second = cache.put_onetime(v, Secret.passphrase(make("ot2")), timeout=60)
    assert first != second
    with pytest.raises(OSError):
        keyring.read(first)
    assert [e.serial for e in cache.onetime_entries()] == [second]
    cache.forget_onetime(v)


def test_a_one_time_key_expires_in_the_kernel(cache):
    v = vol()
    cache.put_onetime(v, Secret.passphrase(make("otexp")), timeout=1)
    time.sleep(1.5)
    with pytest.raises(KeyExpired):
        cache.get_onetime(v)
    assert cache.onetime_entries() == []
    cache.forget_onetime(v)  # unlinks the expired key


@pytest.mark.parametrize("timeout", [0, -1, 86401, True])
def test_no_one_time_key_without_a_bounded_timeout(cache, timeout):
    v = vol()
    with pytest.raises((ValueError, TypeError)):
        cache.put_onetime(v, Secret.passphrase(make("otbad")), timeout=timeout)
    with pytest.raises(KeyNotFound):
        cache.get_onetime(v)


def test_forget_all_takes_one_time_keys_too(cache):
    v, w = vol(), vol()
    cache.put(v, Secret.passphrase(make("fa1")), timeout=60)
    cache.put_onetime(v, Secret.passphrase(make("fa2")), timeout=60)
    cache.put_onetime(w, Secret.passphrase(make("fa3")), timeout=60)
    assert cache.forget_all() == 3
    assert cache.entries() == []
    assert cache.onetime_entries() == []


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


def _systemd_serial(sc: SystemdCache) -> int:
    """The serial of the test's systemd-format key, searched in @u as systemd writes it."""
    return keyring.search(keyring.USER, "user", sc.keyname)


def _raw(sc: SystemdCache) -> bytes:
    with keyring.read(_systemd_serial(sc)) as raw:
        return bytes(raw.view())


def _ask_cached(name: str) -> subprocess.CompletedProcess[bytes]:
    q = ask("--accept-cached", "--multiple", timeout=2, keyname=name, message="kh test")
    out, err = q.communicate(timeout=20)
    return subprocess.CompletedProcess(q.args, q.returncode, out, err)


def test_writer_format_matches_systemd(systemd_key):
    a, b = make("a"), make("b")
    assert systemd_key.add([Secret(a)])
    assert _raw(systemd_key) == a  # no trailing NUL
    assert systemd_key.add([Secret(b), Secret(a)])  # a is a duplicate: skipped
    assert _raw(systemd_key) == a + b"\0" + b
    assert not systemd_key.add([Secret(a), Secret(b"", allow_empty=True)])  # nothing new
    serial = _systemd_serial(systemd_key)
    assert keyring.describe(serial).perm == 0x3F010000
    [info] = keyring.proc_keys({serial})
    assert info.seconds_left is not None
    assert 120 <= info.seconds_left <= 150  # /proc/keys rounds 150 s down to "2m"


def test_duplicate_does_not_refresh_timeout(systemd_key):
    a = make("a")
    systemd_key.add([Secret(a)], timeout=3)
    assert not systemd_key.add([Secret(a)], timeout=150)
    [info] = keyring.proc_keys({_systemd_serial(systemd_key)})
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


def test_we_read_what_systemd_ask_password_stored(systemd_key):
    """systemd-ask-password asks, the real systemd-reply-password answers, systemd caches it."""
    reply = Path("/lib/systemd/systemd-reply-password")  # what type_answer runs
    require(reply.exists(), str(reply), "apt-get install systemd")
    created_dir = not ASK_DIR.exists()
    ASK_DIR.mkdir(parents=True, exist_ok=True)
    first, second = make("typed1"), make("typed2")
    try:
        for pw in (first, second, first):
            q = ask(timeout=10, keyname=systemd_key.keyname, message="kh test")
            try:
                type_answer(ask_file_of(q), pw)
            finally:
                _rc, out = finish(q, timeout=10)
            assert out == pw + b"\n"
        assert [bytes(s.view()) for s in systemd_key.read()] == [first, second]
        assert _raw(systemd_key) == first + b"\0" + second
    finally:
        if created_dir:
            for p in ASK_DIR.iterdir():
                p.unlink()
            ASK_DIR.rmdir()


# --- expired entries, and what a cache command may remove (findings 7 and 3) --------------

def _wait_expired(serials: set[int], timeout: float = 6) -> None:
    """Wait (bounded) until /proc/keys says ``expd`` for each key: the kernel's expiry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = {i.serial: i for i in keyring.proc_keys(serials)}
        if all(s in infos and infos[s].expiry == "expd" for s in serials):
            return
        time.sleep(0.1)
    pytest.fail("the kernel did not expire the keys in time")


def _linked(cache) -> dict[int, str]:
    """Every key linked into our keyring, live or expired, by serial.

    Invalidated keys are left out: the kernel marks them at once and its GC unlinks them
    moments later (they are unusable meanwhile).  Expired keys stay linked until unlinked.
    """
    serials = set(keyring.list_keyring(cache.keyring_serial))
    infos = list(keyring.proc_keys(serials))
    for missing in serials - {i.serial for i in infos}:  # only what the GC just took
        with pytest.raises(OSError):
            keyring.describe(missing)
    return {i.serial: i.description for i in infos if "i" not in i.flags}


def test_forget_all_removes_expired_and_live_entries_and_keeps_the_chain_state(cache):
    expired = [vol(), vol()]
    live = vol()
    gone = {cache.put(v, Secret.passphrase(make("short")), timeout=1) for v in expired}
    kept = cache.put(live, Secret.passphrase(make("live")), timeout=60)
    chain = ["keyhandoff:chain", f"keyhandoff:vk:{vol()}", f"keyhandoff:sealed:{vol()}"]
    for desc in chain:
        cache.put_key(desc, Secret(b"state"), timeout=60, padded=desc != "keyhandoff:chain")
    try:
        _wait_expired(gone)
        assert gone | {kept} <= set(_linked(cache))
        assert cache.forget_all() == 1  # the one usable passphrase; no EKEYEXPIRED
        left = _linked(cache)
        assert not [d for d in left.values() if d.startswith("keyhandoff:luks:")]
        assert sorted(left.values()) == sorted(chain)  # the state naming armed volumes stays
        with pytest.raises(KeyNotFound):
            cache.get(live)
    finally:
        for desc in chain:
            cache.forget_key(desc)
    assert _linked(cache) == {}


def test_forget_of_an_expired_entry_unlinks_it(cache):
    v = vol()
    serial = cache.put(v, Secret.passphrase(make("exp1")), timeout=1)
    _wait_expired({serial})
    with pytest.raises(KeyExpired):
        cache.get(v)
    # listing skips what the kernel expired (it lingers, unusable, until the GC)
    assert cache.entries() == []
    assert not cache.forget(v)  # nothing usable was there ...
    assert serial not in _linked(cache)  # ... and the dead key is gone from our keyring


def test_put_replaces_an_expired_entry(cache):
    v = vol()
    first = cache.put(v, Secret.passphrase(make("exp2")), timeout=1)
    _wait_expired({first})
    pw = make("after")
    second = cache.put(v, Secret.passphrase(pw), timeout=30)
    assert set(_linked(cache)) == {second}  # linking displaced the expired key
    with cache.get(v) as got:
        assert bytes(got.view()) == pw


# --- padded payloads: /proc/key-users shows no length (finding 11) ----------------------

def _root_qnbytes() -> int:
    """Root's payload bytes in the world-readable /proc/key-users, once it stopped moving.

    (The kernel's GC frees keys of earlier tests asynchronously: read until stable.)
    """
    def read() -> int:
        for line in Path("/proc/key-users").read_text().splitlines():
            uid, rest = line.split(":", 1)
            if uid.strip() == "0":
                return int(rest.split()[3].split("/")[0])
        pytest.fail("root has no line in /proc/key-users")

    last = read()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    pytest.fail("root's key bytes did not settle")


def test_key_users_does_not_show_the_passphrase_length(cache):
    warm = vol()
    cache.put(warm, Secret.passphrase(make("warm")), timeout=5)  # thread keyring exists now
    cache.forget(warm)
    growth = {}
    for length in (1, 2048, 700):
        before = _root_qnbytes()
        cache.put(vol(), Secret.passphrase(b"x" * length), timeout=30)
        growth[length] = _root_qnbytes() - before
    assert growth[1] == growth[2048] == growth[700], growth
    assert growth[1] > 4096  # payload, description and the kernel's own accounting


def _proc_keys_size(serial: int) -> int:
    """The payload size /proc/keys reports for a user key (its last column)."""
    for line in Path("/proc/keys").read_text().splitlines():
        if int(line.split()[0], 16) == serial:
            return int(line.rsplit(": ", 1)[1])
    pytest.fail(f"key {serial} is not in /proc/keys")


def test_every_secret_payload_is_padded_the_chain_state_is_not(cache):
    from keyhandoff import login  # noqa: PLC0415

    v = vol()
    name = f"kh-test-cryptsetup-{uuid.uuid4().hex[:8]}"
    pw = make("login")
    try:
        stored = {
            cache.put(v, Secret.passphrase(make("p")), timeout=30): 4096,
            cache.put_onetime(v, Secret.passphrase(make("o")), timeout=30): 4096,
            cache.put_key(f"keyhandoff:vk:{v}", Secret(b"k" * 64), timeout=30): 4096,
            cache.put_key(f"keyhandoff:sealed:{v}", Secret(b"s" * 100), timeout=30): 4096,
            cache.put_key("keyhandoff:chain", Secret(b"{}"), timeout=30, padded=False): 2,
        }
        handed = login.handoff(Secret.passphrase(pw), timeout=30, systemd_keyname=name)
        stored[handed.login_key] = 4096
        # systemd's key keeps systemd's format (the stock pam_gdm reads it)
        stored[keyring.search(keyring.USER, "user", name)] = len(pw)
        assert {s: _proc_keys_size(s) for s in stored} == stored
        with cache.get_key(f"keyhandoff:vk:{v}") as vk:
            assert bytes(vk.view()) == b"k" * 64
        with cache.get_key("keyhandoff:chain", padded=False) as chain:
            assert bytes(chain.view()) == b"{}"
    finally:
        login.clear()
        SystemdCache(keyname=name).clear()
        for desc in (f"keyhandoff:vk:{v}", f"keyhandoff:sealed:{v}", "keyhandoff:chain"):
            cache.forget_key(desc)


def _plant(cache, volume: str, payload: bytes) -> int:
    """A key exactly like ours (owner, permissions, timeout) but with ``payload`` as stored."""
    serial = keyring.add("user", f"keyhandoff:luks:{volume}", payload, keyring.THREAD)
    keyring.set_perm(serial, KEY_PERM)
    keyring.set_timeout(serial, 30)
    keyring.link(serial, cache.keyring_serial)
    keyring.unlink(serial, keyring.THREAD)
    return serial


def _padded(secret: bytes, length: int | None = None, tail: bytes = b"") -> bytes:
    n = len(secret) if length is None else length
    body = n.to_bytes(2, "big") + secret + tail
    return body + bytes(4096 - len(body))


@pytest.mark.parametrize("case", ["raw", "short", "long", "zero-length", "length-4095",
                                  "padding-not-zero", "last-byte"])
def test_a_tampered_payload_is_refused(cache, case):
    pw = make("tamper")
    payload = {
        "raw": pw,  # the old, unpadded format
        "short": _padded(pw)[:4095],
        "long": _padded(pw) + b"\0",
        "zero-length": _padded(b"", 0),
        "length-4095": (4095).to_bytes(2, "big") + b"y" * 4094,
        "padding-not-zero": _padded(pw, tail=b"\1"),
        "last-byte": _padded(pw)[:-1] + b"\1",
    }[case]
    v = vol()
    _plant(cache, v, payload)
    with pytest.raises(KeyNotFound, match=r"padd|length"):
        cache.get(v)
    assert cache.get_key(f"keyhandoff:luks:{v}") is None
    # the control: the same, well-formed, is read
    v2 = vol()
    _plant(cache, v2, _padded(pw))
    with cache.get(v2) as got:
        assert bytes(got.view()) == pw


# --- no key of ours is ever visible without its timeout (finding 12) ---------------------

HANDOFF = (
    "import sys\n"
    "from keyhandoff import login\n"
    "from keyhandoff.secret import Secret\n"
    "pw = Secret.passphrase(sys.stdin.buffer.read())\n"
    "for _ in range(2):  # the second replaces the keys the first made\n"
    "    h = login.handoff(pw, timeout=30, systemd_keyname=sys.argv[1])\n"
    "    print(h.login_key, flush=True)\n"
)

_SYSCALL = re.compile(r"^(?:\d+ +)?(?P<call>add_key|keyctl)\((?P<args>.*)\) += (?P<rc>-?\d+)")


def _keyring_syscalls(trace: Path) -> list[tuple[str, list[str], int]]:
    """(call, arguments, result) of each add_key/keyctl in an ``strace -f -s 0`` log.

    ``-s 0`` prints no string contents (``""...``), so no payload is in the log.
    """
    out = []
    for line in trace.read_text().splitlines():
        m = _SYSCALL.match(line)
        if m:
            out.append((m["call"], [a.strip() for a in m["args"].split(",")], int(m["rc"])))
    return out


def test_login_handoff_links_into_user_keyring_only_after_the_timeout(tmp_path):
    """The real syscall order of a real hand-off, recorded by strace.

    For every key the hand-off makes: the add_key or KEYCTL_LINK that makes it reachable in
    @u comes after its KEYCTL_SET_TIMEOUT.  Before the fix, systemd's key was add_key-ed
    straight into @u and given its timeout afterwards.
    """
    import sys  # noqa: PLC0415

    from keyhandoff import login  # noqa: PLC0415

    strace = require_binary("strace", "apt-get install strace")
    name = f"kh-test-cryptsetup-{uuid.uuid4().hex[:8]}"
    trace = tmp_path / "strace.log"
    try:
        r = subprocess.run(
            [strace, "-f", "-qq", "-s", "0", "-e", "trace=add_key,keyctl", "-o", str(trace),
             sys.executable, "-c", HANDOFF, name],
            input=make("handoff"), capture_output=True, timeout=60, check=False,
        )
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        login_keys = [int(x) for x in r.stdout.split()]
        systemd_key = keyring.search(keyring.USER, "user", name)
    finally:
        login.clear()
        SystemdCache(keyname=name).clear()
    calls = _keyring_syscalls(trace)
    timed: set[int] = set()
    reachable: list[int] = []
    for call, args, rc in calls:
        if call == "keyctl" and args[0] == "KEYCTL_SET_TIMEOUT" and rc == 0:
            timed.add(int(args[1]))
        made_reachable = (
            rc if call == "add_key" and args[-1] == "KEY_SPEC_USER_KEYRING"
            else int(args[1]) if call == "keyctl" and args[0] == "KEYCTL_LINK"
            and args[2] == "KEY_SPEC_USER_KEYRING" and rc == 0
            else None
        )
        if made_reachable is not None:
            assert made_reachable in timed, (
                f"key {made_reachable} reached @u before its timeout was set: "
                f"{[c for c in calls if str(made_reachable) in (c[1] + [str(c[2])])]}"
            )
            reachable.append(made_reachable)
    # the trace saw what it had to see: both keys of both hand-offs were made reachable
    assert set(login_keys) <= set(reachable)
    assert systemd_key in reachable
    assert len(reachable) >= 4


PUBLISHERS = (
    "import sys\n"
    "from keyhandoff.cache import PassphraseCache, SystemdCache\n"
    "from keyhandoff.secret import Secret\n"
    "pw = Secret.passphrase(sys.stdin.buffer.read())\n"
    "cache, volume = PassphraseCache(), sys.argv[2]\n"
    "for _ in range(2):  # the second replaces the keys the first made\n"
    "    print(cache.put(volume, pw, timeout=30), flush=True)\n"
    "    print(cache.put_onetime(volume, pw, timeout=30), flush=True)\n"
    "    print(cache.put_key('keyhandoff:vk:' + volume, pw, timeout=30), flush=True)\n"
    "    print(cache.put_key('keyhandoff:chain', pw, timeout=30, padded=False), flush=True)\n"
    "SystemdCache(keyname=sys.argv[1]).add([pw], timeout=30)\n"
)


def test_every_publisher_links_a_key_only_after_its_timeout(cache, tmp_path):
    """The same syscall order for every key the cache and systemd's key writer make.

    Each goes through ``keys.publish``: add_key into the thread keyring only, then
    KEYCTL_SET_TIMEOUT, and only then the KEYCTL_LINK that makes it reachable.
    """
    import sys  # noqa: PLC0415

    strace = require_binary("strace", "apt-get install strace")
    name = f"kh-test-cryptsetup-{uuid.uuid4().hex[:8]}"
    v = vol()
    trace = tmp_path / "strace.log"
    try:
        r = subprocess.run(
            [strace, "-f", "-qq", "-s", "0", "-e", "trace=add_key,keyctl", "-o", str(trace),
             sys.executable, "-c", PUBLISHERS, name, v],
            input=make("publish"), capture_output=True, timeout=60, check=False,
        )
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        published = [int(x) for x in r.stdout.split()]
        systemd_key = keyring.search(keyring.USER, "user", name)
    finally:
        SystemdCache(keyname=name).clear()
        cache.forget_key(f"keyhandoff:vk:{v}")
        cache.forget_key("keyhandoff:chain")
    calls = _keyring_syscalls(trace)
    timed: set[int] = set()
    reachable: list[int] = []
    for call, args, rc in calls:
        if call == "add_key":
            assert args[-1] == "KEY_SPEC_THREAD_KEYRING", (call, args, rc)
        elif args[0] == "KEYCTL_SET_TIMEOUT" and rc == 0:
            timed.add(int(args[1]))
        elif args[0] == "KEYCTL_LINK" and args[2] != "KEY_SPEC_THREAD_KEYRING" and rc == 0:
            assert int(args[1]) in timed, f"key {args[1]} linked before its timeout was set"
            reachable.append(int(args[1]))
    # the trace saw what it had to see: every key made was linked, each once
    assert len(published) == 8
    assert sorted(reachable) == sorted([*published, systemd_key])


def test_replacing_systemds_key_is_one_link(systemd_key):
    """Linking the new key displaces the old one in @u in one step; the old one is destroyed."""
    systemd_key.add([Secret(make("one"))])
    old = _systemd_serial(systemd_key)
    systemd_key.add([Secret(make("two"))])
    new = _systemd_serial(systemd_key)
    assert new != old
    user = keyring.get_keyring_id(keyring.USER)
    named = [i for i in keyring.proc_keys(set(keyring.list_keyring(user)))
             if i.description == systemd_key.keyname]
    assert [i.serial for i in named] == [new]
    deadline = time.monotonic() + 5  # unreferenced now: the kernel's GC destroys it
    while any(True for _ in keyring.proc_keys({old})):
        if time.monotonic() > deadline:
            pytest.fail("the displaced key was not destroyed")
        time.sleep(0.05)


def test_readers_always_find_systemds_key_while_it_is_replaced(systemd_key):
    """A reader racing the writer never finds no key (no unlink-then-add window)."""
    import threading  # noqa: PLC0415

    systemd_key.add([Secret(make("first"))])
    misses = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                keyring.search(keyring.USER, "user", systemd_key.keyname)
            except KeyNotFound:
                misses.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            systemd_key.add([Secret(make(f"n{i}"))])
    finally:
        done.set()
        t.join()
    assert misses == []
