"""The real root after an initramfs handoff: restore takes the record the token plugin left
in our keyring.  (The capture of a passphrase typed in the initramfs: test_initrd_capture.py.)

The token plugin (csrc/token_keyhandoff_onetime.c) is played here by the test itself, in the
key format the plugin uses: the sealed record, as the EFI variable held it minus its 4
attribute bytes, not padded, in a ``user`` key ``keyhandoff:record`` in our keyring, with
our permissions and a kernel timeout; the variable deleted.  A "reboot" on one kernel is a
new boot id (as in test_update.py).
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import TYPE_CHECKING

import pytest
from support.luks_images import format_image, metadata, opens, uuid_of
from support.parts import require_binary
from support.passphrases import make
from support.scratch_efi import chattr_immutable, clear_immutable, last_json, run_in_child

from keyhandoff import efi, keyring, keys, names
from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import KeyUnavailable
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

#: the ``cache`` fixture (tests/conftest.py) disarms after each test here
pytestmark = pytest.mark.arms

#: Two boots of a chain on one kernel, in two interpreters on a scratch efivarfs directory.
#: ``arm``: arm a full reboot for ``boots`` boots.  ``take``: the record out of the EFI
#: variable (the plugin's read-and-delete), its bytes to ``state/blob`` for the test to place.
#: ``restore``: the next boot's restore, the one-time key checked against the volume, finish,
#: and the re-arm when the chain has boots left.
SCRIPT = """
import json, os, sys, uuid
from datetime import timedelta
from keyhandoff import efi, keyring, names, update
from keyhandoff.cache import PassphraseCache
from keyhandoff.host import Host
from keyhandoff.luks import LuksHeader, WrongPassphrase
from keyhandoff.secret import Secret

phase, img, pw_file, state, boots = sys.argv[1:6]
boot_file = os.path.join(state, "boot_id")
host = Host(boot_id_path=boot_file)
cache = PassphraseCache()

def reboot():
    # RAM is gone: every key of ours but the record the plugin put there after the reboot
    cache.forget_all()
    cache.forget_key(names.CHAIN_KEY)
    vol = update.targets([img], host=host)[0].uuid
    for prefix in (names.VK_PREFIX, names.SEALED_PREFIX):
        cache.forget_key(prefix + vol)
    with open(boot_file, "w") as f:
        f.write(str(uuid.uuid4()))

def record_key():
    try:
        keyring.find_trusted("user", names.RECORD_BLOB_KEY, perm=names.KEY_PERM,
                             within=cache.keyring_serial)
    except Exception as exc:
        return type(exc).__name__
    return "there"

def onetime_slots():
    from keyhandoff import onetime
    with LuksHeader.open(img) as h:
        return [s.keyslot for s in onetime.slots(h)]

out = {}
if phase != "take":
    reboot()
if phase == "take":
    with efi.RecordVariable().take() as blob:
        with open(os.path.join(state, "blob"), "wb") as f:
            f.write(bytes(blob.view()))
    out["variable"] = efi.RECORD_VARIABLE.exists()
elif phase == "arm":
    with open(pw_file, "rb") as f:
        pw = Secret.passphrase(f.read())
    vol = update.targets([img], host=host)[0].uuid
    cache.put(vol, pw, timeout=120)
    r = update.arm(host=host, reboot="full", boots=int(boots), ttl=timedelta(minutes=10),
                   volumes=[img], ask=None)
    cache.forget(vol)
    out["armed"] = [r.channel, onetime_slots()]
else:
    vol = update.targets([img], host=host)[0].uuid
    out["record_key_before"] = record_key()
    rr = update.restore(host=host, volumes=[img])
    out["restore"] = [rr.channel, list(rr.restored), rr.refused, rr.keyslots_destroyed]
    out["record_key_after"] = record_key()
    out["variable_after"] = efi.RECORD_VARIABLE.exists()
    out["opens"] = None
    if rr.restored:
        with cache.get_onetime(vol) as key, LuksHeader.open(img) as h:
            try:
                h.verify(key)
                out["opens"] = True
            except WrongPassphrase:
                out["opens"] = False
    out["slots_before_finish"] = onetime_slots()
    f = update.finish(host=host)
    out["finish"] = [f.keyslots_destroyed, onetime_slots()]
    out["armed_after"] = update.status(host=host)["armed"]
    if out["armed_after"]:
        r2 = update.rearm(host=host)
        out["rearm"] = [r2.channel, onetime_slots(), efi.RECORD_VARIABLE.exists()]
print(json.dumps(out))
"""

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
EVERYTHING_TO_EVERYONE = 0x3F3F3F3F


class Boots:
    """An image armed in one "boot", restored in the next: each phase a fresh interpreter."""

    def __init__(self, tmp_path: Path) -> None:
        self.pw = make("root")
        self.img = format_image(tmp_path / "root.img", self.pw)
        self.efivars = tmp_path / "efivars"
        self.efivars.mkdir()
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.pw_file = tmp_path / "pw"
        self.pw_file.write_bytes(self.pw)
        self.outputs: list[bytes] = []

    def run(self, phase: str, *, boots: int = 1, prefix: Sequence[str] = ()) -> dict:
        proc = run_in_child(SCRIPT, self.efivars, phase, self.img, self.pw_file, self.state,
                            boots, prefix=prefix)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        self.outputs += [proc.stdout, proc.stderr]
        return last_json(proc)

    def arm(self, boots: int = 1) -> bytes:
        """Arm, and take the record out of its variable as the plugin does: its bytes."""
        out = self.run("arm", boots=boots)
        assert out["armed"][0] == "efi"
        assert len(out["armed"][1]) == 1
        return self.take()

    def take(self) -> bytes:
        """The plugin's read-and-delete of the variable: the record's bytes."""
        assert self.variable_file().exists()
        assert self.run("take")["variable"] is False
        blob = (self.state / "blob").read_bytes()
        (self.state / "blob").unlink()
        return blob

    def variable_file(self) -> Path:
        return self.efivars / f"{names.EFI_RECORD_NAME}-{names.EFI_VENDOR_GUID}"

    def check_nothing_leaked(self) -> None:
        self.pw_file.unlink()
        for blob in [*self.outputs, *(p.read_bytes() for p in self.efivars.iterdir())]:
            assert self.pw not in blob


@pytest.fixture
def boots(tmp_path, cache) -> Iterator[Boots]:
    b = Boots(tmp_path)
    yield b
    b.check_nothing_leaked()


def publish_record(blob: bytes, *, perm: int = names.KEY_PERM) -> int:
    """What the plugin leaves: the record, unpadded, in our keyring, with a timeout."""
    return keys.publish(names.RECORD_BLOB_KEY, Secret(bytearray(blob)), perm=perm,
                        keyring_serial=PassphraseCache().keyring_serial, timeout=600,
                        padded=False)


def still_there(serial: int) -> bool:
    """Whether the key is alive (not removed, not invalidated)."""
    try:
        info = keyring.describe(serial)
    except KeyUnavailable:
        return False
    return info.description == names.RECORD_BLOB_KEY


def remove(serial: int) -> None:
    with contextlib.suppress(KeyUnavailable):
        keyring.unlink(serial, PassphraseCache().keyring_serial)
    with contextlib.suppress(KeyUnavailable):
        keyring.invalidate(serial)


def assert_restored_and_finished(out: dict) -> None:
    assert out["record_key_before"] == "there"
    assert out["restore"][0] == "efi"
    assert out["restore"][2] is None  # not refused
    assert len(out["restore"][1]) == 1
    assert out["restore"][3] == 0  # its one-time keyslot was claimed, not swept
    assert out["opens"] is True
    assert out["record_key_after"] == "KeyNotFound"  # restore consumed it
    assert len(out["slots_before_finish"]) == 1
    assert out["finish"] == [1, []]  # the used one-time keyslot destroyed
    assert out["armed_after"] is False  # boots=1: the chain is over


# --- restore: the record the plugin left in our keyring -----------------------------------


def test_restore_takes_the_record_from_the_keyring(boots):
    blob = boots.arm()
    serial = publish_record(blob)
    out = boots.run("restore")
    assert_restored_and_finished(out)
    assert out["restore"][1] == [uuid_of(boots.img)]
    assert not still_there(serial)
    # restore neither needed nor wrote an EFI variable
    assert out["variable_after"] is False
    assert list(boots.efivars.iterdir()) == []
    assert opens(boots.img, boots.pw)


def test_the_keyring_copy_wins_and_a_stale_variable_is_deleted(boots):
    blob = boots.arm()
    serial = publish_record(blob)
    # a variable beside it that would be refused if it were used: not a record at all
    stale = boots.variable_file()
    stale.write_bytes(efi.RECORD_ATTRIBUTES_NV.to_bytes(4, "little") + b"stale, not a record")
    stale.chmod(0o600)
    out = boots.run("restore")
    assert_restored_and_finished(out)
    assert not still_there(serial)
    assert out["variable_after"] is False
    assert not stale.exists()


def test_a_chain_goes_on_after_a_root_handoff(boots):
    """boots=2: the volume key kept from the one-time key re-arms; the next boot again."""
    serial = publish_record(boots.arm(boots=2))
    out = boots.run("restore")
    assert out["restore"][0] == "efi"
    assert len(out["restore"][1]) == 1
    assert out["opens"] is True
    assert out["finish"] == [1, []]
    assert out["armed_after"] is True
    assert out["rearm"][0] == "efi"
    assert len(out["rearm"][1]) == 1  # a fresh one-time keyslot for the next boot
    assert out["rearm"][2] is True  # and its record in the variable
    assert not still_there(serial)
    serial = publish_record(boots.take())
    out = boots.run("restore")
    assert_restored_and_finished(out)
    assert not still_there(serial)
    assert opens(boots.img, boots.pw)


def test_a_stale_variable_that_cannot_be_deleted_stops_both(boots):
    """Delete before use: without CAP_LINUX_IMMUTABLE the immutable variable stays, so
    neither record is used (and the keyring copy is gone all the same)."""
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    serial = publish_record(boots.arm())
    stale = boots.variable_file()
    stale.write_bytes(efi.RECORD_ATTRIBUTES_NV.to_bytes(4, "little") + b"stale, not a record")
    chattr_immutable(stale)
    try:
        out = boots.run("restore", prefix=[setpriv, "--bounding-set=-linux_immutable",
                                            "--inh-caps=-linux_immutable"])
        assert stale.exists()
    finally:
        # left immutable, it made pytest give up removing the whole session's directory
        # (the VM images too): gigabytes left in /tmp after every run
        clear_immutable(stale.parent)
    assert out["record_key_before"] == "there"
    assert out["restore"][0] is None
    assert out["restore"][1] == []
    assert "could not be deleted, so it is not used" in out["restore"][2]
    assert out["restore"][3] == 1  # the one-time keyslot nothing claims is destroyed
    assert not still_there(serial)
    assert stale.exists()


def test_without_a_copy_the_variable_is_used_as_before(boots):
    """No key: the EFI variable path, unchanged (the plugin did not run, e.g. a data volume)."""
    blob = boots.arm()
    boots.variable_file().write_bytes(efi.RECORD_ATTRIBUTES_NV.to_bytes(4, "little") + blob)
    out = boots.run("restore")
    assert out["record_key_before"] == "KeyNotFound"
    assert out["restore"][0] == "efi"
    assert len(out["restore"][1]) == 1
    assert out["variable_after"] is False
    assert out["finish"] == [1, []]


def test_a_record_key_with_other_permissions_is_not_used(boots):
    blob = boots.arm()
    serial = publish_record(blob, perm=0x3F3F0000)  # group may read it too: not ours
    try:
        out = boots.run("restore")
        assert out["record_key_before"] == "KeyNotFound"
        # nothing restored; the one-time keyslot no valid record claims is destroyed
        assert out["restore"] == [None, [], None, 1]
        assert out["slots_before_finish"] == []
        assert still_there(serial)  # ignored, and not removed
    finally:
        remove(serial)
    assert opens(boots.img, boots.pw)


@contextlib.contextmanager
def foreign_record(blob: bytes) -> Iterator[int]:
    """``keyhandoff:record`` made by uid 65534 (0x3f3f3f3f), linked into our keyring."""
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    require_binary("setpriv", "apt-get install util-linux")
    script = ('serial=$(keyctl padd user "$1" @s) && keyctl setperm "$serial" 0x3f3f3f3f '
              '&& echo "$serial" && exec sleep 120')
    proc = subprocess.Popen(
        [*NOBODY, keyctl, "session", "-", "sh", "-c", script, "sh", names.RECORD_BLOB_KEY],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    serial = None
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(blob)
        proc.stdin.close()
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read() if proc.stderr else b""
        serial = int(line)
        keyring.link(serial, PassphraseCache().keyring_serial)  # "other" may link it
        yield serial
    finally:
        if serial is not None:
            with contextlib.suppress(KeyUnavailable):
                keyring.unlink(serial, PassphraseCache().keyring_serial)
        proc.kill()
        proc.wait()


def test_a_record_key_of_another_uid_is_not_used(boots):
    blob = boots.arm()
    with foreign_record(blob) as serial:
        [info] = keyring.proc_keys({serial})
        assert (info.uid, info.description) == (65534, names.RECORD_BLOB_KEY)
        assert serial in keyring.list_keyring(PassphraseCache().keyring_serial)
        out = boots.run("restore")
        assert out["record_key_before"] == "KeyNotFound"
        assert out["restore"] == [None, [], None, 1]
        assert serial in keyring.list_keyring(PassphraseCache().keyring_serial)  # left alone
    tokens = metadata(boots.img)["tokens"].values()
    assert not any(t.get("type") == names.TOKEN_TYPE for t in tokens)  # swept


def test_disarm_removes_the_keyring_copy(boots):
    from keyhandoff import update  # noqa: PLC0415

    serial = publish_record(boots.arm())
    counts = update.disarm(quiet=True, volumes=[str(boots.img)])
    assert counts["records"] >= 1
    assert not still_there(serial)
