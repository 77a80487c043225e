"""Keys another uid made are never read (issue #10, finding 2), with a real uid 65534.

The attack: as uid 65534, ``keyctl add user cryptsetup chosen @s`` and ``setperm 0x3f3f3f3f``.
libkeyutils' ``find_key_by_type_and_desc`` falls back to scanning ``/proc/keys`` and returns
any key root may *view*; root may also read it (its "other" bits allow everything).  Then
root's agent counted and read that user's entries: capture was suppressed, and the agent ran
a PBKDF on a chosen guess as root.  Only keys found from a keyring we possess, owned by
uid 0 and carrying exactly our permissions are read now.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from typing import TYPE_CHECKING

import pytest
from support.agent_process import AgentProcess, ask, ask_file_of, finish, type_answer
from support.luks_images import format_image, uuid_of
from support.parts import require_binary
from support.passphrases import make

from keyhandoff import keyring, login
from keyhandoff.cache import KEY_PERM, VOLUME_PREFIX, SystemdCache
from keyhandoff.errors import KeyNotFound
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
EVERYTHING_TO_EVERYONE = 0x3F3F3F3F
#: what uid 65534 stores: a "passphrase" of its choosing (three entries, systemd format)
CHOSEN = b"chosen-by-nobody\0second\0third"


@contextlib.contextmanager
def foreign_key(description: str, payload: bytes = CHOSEN) -> Iterator[int]:
    """A ``user`` key made by uid 65534 in a session keyring of its own, 0x3f3f3f3f.

    The real ``keyctl`` as that uid (no import of ours needed there); the process sleeps
    while the block runs, so its session keyring and the key stay alive, and is ended by
    its PID afterwards.
    """
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    script = (
        'serial=$(keyctl padd user "$1" @s) && keyctl setperm "$serial" 0x3f3f3f3f '
        '&& echo "$serial" && exec sleep 120'
    )
    proc = subprocess.Popen(
        [*NOBODY, keyctl, "session", "-", "sh", "-c", script, "sh", description],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.close()
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read() if proc.stderr else b""
        serial = int(line)
        yield serial
    finally:
        proc.kill()
        proc.wait()


def _really_there(serial: int, description: str) -> None:
    """The foreign key exists, root can view and read it: what the old lookup fell for."""
    [info] = keyring.proc_keys({serial})
    assert (info.uid, info.perm, info.description) == (65534, EVERYTHING_TO_EVERYONE,
                                                       description)
    with keyring.read(serial) as raw:  # "other" may read: only the lookup protects us
        assert len(raw) > 0


def _name() -> str:
    return f"kh-test-foreign-{uuid.uuid4().hex[:12]}"


def test_a_foreign_cryptsetup_key_in_its_own_session_is_not_read():
    name = _name()
    with foreign_key(name) as serial:
        _really_there(serial, name)
        sc = SystemdCache(keyname=name)
        assert sc.read() == []
        assert sc.last() is None
        assert sc.info() is None
        with pytest.raises(KeyNotFound):
            keyring.find_trusted("user", name, perm=EVERYTHING_TO_EVERYONE, within=keyring.USER)
        with pytest.raises(KeyNotFound):
            keyring.find_trusted("user", name, perm=KEY_PERM, within=keyring.SESSION)
        with pytest.raises(KeyNotFound):  # the existence check has no /proc/keys fallback
            keyring.find("user", name)


def test_a_foreign_key_linked_into_a_keyring_we_possess_is_refused(fresh_session_keyring):
    name = _name()
    with foreign_key(name) as serial:
        # "other" has link permission on it: link it into our own session keyring
        keyring.link(serial, keyring.SESSION)
        try:
            assert keyring.search(keyring.SESSION, "user", name) == serial  # possessed now
            assert SystemdCache(keyname=name, keyring_id=fresh_session_keyring).read() == []
            with pytest.raises(KeyNotFound, match="not trusted"):
                keyring.find_trusted("user", name, perm=EVERYTHING_TO_EVERYONE,
                                     within=keyring.SESSION)
        finally:
            keyring.unlink(serial, keyring.SESSION)


def test_a_root_key_with_other_permissions_is_refused(fresh_session_keyring):
    name = _name()
    serial = keyring.add("user", name, CHOSEN, keyring.SESSION)
    try:
        keyring.set_timeout(serial, 30)
        for perm in (EVERYTHING_TO_EVERYONE, 0x3F3F0000, 0x3F010001, 0x3F000000):
            keyring.set_perm(serial, perm)
            assert SystemdCache(keyname=name, keyring_id=fresh_session_keyring).read() == []
            with pytest.raises(KeyNotFound):
                keyring.find_trusted("user", name, perm=KEY_PERM, within=keyring.SESSION)
        keyring.set_perm(serial, KEY_PERM)  # the control: exactly ours is read
        assert keyring.find_trusted("user", name, perm=KEY_PERM,
                                    within=keyring.SESSION) == serial
        got = SystemdCache(keyname=name, keyring_id=fresh_session_keyring).read()
        assert len(got) == 3
        for g in got:
            g.wipe()
    finally:
        keyring.unlink(serial, keyring.SESSION)


def test_our_cache_reads_only_keys_with_our_permissions(cache):
    """A key of our name in our keyring, but not with our permissions: not a passphrase."""
    volume = str(uuid.uuid4())
    pw = make("perm-cache")
    serial = cache.put(volume, Secret.passphrase(pw), timeout=30)
    keyring.set_perm(serial, EVERYTHING_TO_EVERYONE)
    with pytest.raises(KeyNotFound):
        cache.get(volume)
    assert cache.get_key(VOLUME_PREFIX + volume) is None
    assert [e for e in cache.entries() if e.volume == volume] == []
    assert cache.forget(volume)  # but forgetting removes it all the same
    assert not any(i.usable for i in keyring.proc_keys({serial}))  # invalidated


def test_a_foreign_login_key_is_neither_read_nor_destroyed():
    with foreign_key(login.LOGIN_KEY, b"chosen-by-nobody") as serial:
        _really_there(serial, login.LOGIN_KEY)
        assert not login.clear()
        _really_there(serial, login.LOGIN_KEY)  # not ours to destroy either


def test_status_does_not_report_a_foreign_cryptsetup_key():
    from keyhandoff import status  # noqa: PLC0415

    with contextlib.suppress(KeyNotFound):
        keyring.search(keyring.USER, "user", "cryptsetup")
        pytest.fail("root already has a cryptsetup key: this test needs a machine without one")
    with foreign_key("cryptsetup") as serial:
        _really_there(serial, "cryptsetup")
        report = status.collect().as_dict()
        assert report["keyring"]["systemd_cryptsetup_key"] is None


def test_a_foreign_cryptsetup_key_does_not_suppress_capture(tmp_path, cache):
    """The agent captures what the person typed although uid 65534 planted a key of its name.

    Before: the agent counted the planted key's three entries when the prompt appeared and
    found only the one systemd stored for the person afterwards, so it kept nothing.
    """
    pw = make("captured")
    img = format_image(tmp_path / "disk.img", pw)
    vid = uuid_of(img)
    with AgentProcess(tmp_path, retain=45) as agent, foreign_key(agent.keyname) as serial:
        _really_there(serial, agent.keyname)
        q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
        type_answer(ask_file_of(q), pw)
        assert finish(q) == (0, pw + b"\n")
        agent.wait_for_log("keyhandoff: CAPTURED")
        with cache.get(vid) as got:
            assert bytes(got.view()) == pw
        # the planted key was never read as root's: it still holds what nobody put there
        with keyring.read(serial) as raw:
            assert bytes(raw.view()) == CHOSEN
