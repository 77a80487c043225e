"""The LUKS2 token plugin (csrc/token_keyhandoff_onetime.c) inside the real libcryptsetup.

Every open runs ``cryptsetup open --test-passphrase --token-only --token-type
keyhandoff-onetime`` on a real LUKS2 image file, in a private mount namespace where
libcryptsetup's token directory is a bind mount of a directory holding only the plugin
built from this tree (the machine's own plugin directory is never written).  Records are
sealed by :mod:`keyhandoff.record` and keyslots made by :func:`keyhandoff.onetime.add`, as
``arm`` makes them; the EFI variable is a file in a scratch directory (``EFIVARFS_PATH``).

* Python -> C: a record sealed by Python opens in C, for one volume and for two volumes in
  one record (the second finds the keyring copy the first published).
* Both parsers, same verdict: every refusal of :func:`keyhandoff.record.open_record` (and of
  :func:`keyhandoff.onetime.parse_token` / :func:`~keyhandoff.onetime.not_ours` for the
  token) is made by the plugin too, for the same reason (its debug log names it).
* Delete before use: the variable is gone after the first open, the keyring copy has our
  permissions and a timeout of at most 600 s, and a variable that cannot be deleted means no
  answer and no keyring copy.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.onetime_images import Armed, arm_image, seal
from support.parts import require, require_binary

from keyhandoff import keyring, names, onetime, record
from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import (
    RecordExhausted,
    RecordExpired,
    RecordForeign,
    RecordMalformed,
    RecordNotYetValid,
    RecordRefused,
    RecordSameBoot,
    RecordTampered,
    RecordUnknownFormat,
)
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

REPO = Path(__file__).resolve().parents[2]
#: cryptsetup 2.6.1's compiled-in external token directory (Debian 12).
TOKEN_DIR = "/lib/x86_64-linux-gnu/cryptsetup"  # noqa: S105  # a directory
PLUGIN = "libcryptsetup-token-keyhandoff-onetime.so"
VARIABLE = f"{names.EFI_RECORD_NAME}-{names.EFI_VENDOR_GUID}"
ATTRIBUTES = struct.pack("<I", 7)  # NV | BS | RT, as efivarfs shows them

VERDICTS: dict[type[RecordRefused], str] = {
    RecordUnknownFormat: "unknown-format",
    RecordMalformed: "malformed",
    RecordForeign: "foreign",
    RecordTampered: "tampered",
    RecordExhausted: "exhausted",
    RecordExpired: "expired",
    RecordNotYetValid: "not-yet-valid",
    RecordSameBoot: "same-boot",
}


def boot_id() -> uuid.UUID:
    return uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip())


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A directory holding only the plugin, built by csrc/build-token from this tree."""
    require_binary("cc", "apt-get install build-essential")
    require(Path(TOKEN_DIR).is_dir(), f"libcryptsetup's token directory {TOKEN_DIR}",
            "apt-get install libcryptsetup12")
    out = tmp_path_factory.mktemp("token-plugin")
    proc = subprocess.run([str(REPO / "csrc" / "build-token"), str(out)], capture_output=True,
                          text=True, check=False)
    require(proc.returncode == 0, f"building the token plugin ({proc.stderr.strip()[-500:]})",
            "apt-get install libcryptsetup-dev libssl-dev libjson-c-dev")
    return out


@pytest.fixture(autouse=True)
def no_record_key():
    """The keyring copy the plugin publishes in root's @u is gone after every test."""
    yield
    PassphraseCache().forget_key(names.RECORD_BLOB_KEY)


def write_variable(efivars: Path, blob: bytes) -> Path:
    efivars.mkdir(exist_ok=True)
    path = efivars / VARIABLE
    path.write_bytes(ATTRIBUTES + blob)
    path.chmod(0o600)
    return path


@dataclass
class Opened:
    returncode: int
    log: list[str]  # the plugin's own debug lines

    @property
    def verdict(self) -> str:
        """ok, none (no record), untrusted-token, or the record refusal's name."""
        text = "\n".join(self.log)
        if self.returncode == 0 and "one-time key answered" in text:
            return "ok"
        if "token refused" in text:
            return "untrusted-token"
        found = re.search(r"record refused: ([a-z-]+)", text)
        if found:
            return found.group(1)
        if "no handoff record" in text:
            return "none"
        return "?: " + text


def armed_with_record(tmp_path: Path, **seal_args: int) -> tuple[Armed, Path, bytes]:
    """An armed image (``img``) and a record with its one-time key in the EFI variable of
    the scratch directory ``efivars``, both under ``tmp_path``: (image, efivars, record).
    ``seal_args`` go to :func:`seal`; the record key is gone, only the record has it."""
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        with armed.key:
            blob = seal([armed.entry()], rk, **seal_args)
    efivars = tmp_path / "efivars"
    write_variable(efivars, blob)
    return armed, efivars, blob


def plugin_open(plugin_dir: Path, image: Path, efivars: Path, *,
                readonly_efivars: bool = False, kexec_record: Path | None = None,
                readonly_kexec_dir: bool = False) -> Opened:
    """``cryptsetup open --test-passphrase --token-only`` with only our plugin loadable.

    The kexec channel's file is ``kexec_record`` (default: a name in ``efivars``' parent
    that does not exist), never the machine's own /run/keyhandoff.
    """
    require_binary("unshare", "apt-get install util-linux")
    kexec_record = kexec_record or efivars.parent / "no-kexec-record"
    script = 'mount --bind "$1" "$2" || exit 90\n'
    if readonly_efivars:
        script += 'mount --bind "$3" "$3" && mount -o remount,bind,ro "$3" || exit 91\n'
    if readonly_kexec_dir:
        script += 'mount --bind "$5" "$5" && mount -o remount,bind,ro "$5" || exit 92\n'
    script += ('exec cryptsetup open --test-passphrase --token-only --debug '
               '--token-type keyhandoff-onetime "$4"\n')
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(plugin_dir), TOKEN_DIR, str(efivars), str(image), str(kexec_record.parent)],
        env={**os.environ, "EFIVARFS_PATH": f"{efivars}/",
             "KEYHANDOFF_KEXEC_RECORD": str(kexec_record)},
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode not in {90, 91, 92}, proc.stderr
    lines = [line.split("keyhandoff-onetime: ", 1)[1]
             for line in proc.stdout.splitlines() + proc.stderr.splitlines()
             if "keyhandoff-onetime: " in line]
    return Opened(proc.returncode, lines)


def python_verdict(blob: bytes, record_key: Secret, volume: uuid.UUID) -> str:
    """What restore decides: record.open_record (channel efi), then this volume's key."""
    try:
        opened = record.open_record(blob, record_key, now=int(time.time()), boot_id=boot_id(),
                                    channel=record.RecordChannel.EFI)
    except RecordRefused as exc:
        return VERDICTS[type(exc)]
    with opened:
        keys = [e for e in opened.entries
                if e.volume == volume and e.kind is record.EntryKind.ONETIME_KEY]
        return "ok" if keys else "no-entry"


def record_key_serial() -> int | None:
    try:
        return keyring.find_trusted("user", names.RECORD_BLOB_KEY, perm=names.KEY_PERM,
                                    within=PassphraseCache().keyring_serial)
    except OSError:
        return None


# --------------------------------------------------------------------------- Python -> C


def test_a_record_sealed_by_python_opens_its_keyslot_in_c(plugin_dir, tmp_path):
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        with armed.key:
            blob = seal([armed.entry()], rk)
        efivars = tmp_path / "efivars"
        write_variable(efivars, blob)
        assert python_verdict(blob, rk, armed.volume) == "ok"
    opened = plugin_open(plugin_dir, armed.path, efivars)
    assert opened.verdict == "ok", opened.log
    assert "record taken from the EFI variable" in opened.log


def test_two_volumes_in_one_record_the_second_finds_the_keyring_copy(plugin_dir, tmp_path):
    with record.new_record_key() as rk:
        first = arm_image(tmp_path / "a", rk)
        second = arm_image(tmp_path / "b", rk)
        with first.key, second.key:
            blob = seal([first.entry(), second.entry()], rk)
    efivars = tmp_path / "efivars"
    write_variable(efivars, blob)
    assert plugin_open(plugin_dir, first.path, efivars).verdict == "ok"
    assert not (efivars / VARIABLE).exists()
    again = plugin_open(plugin_dir, second.path, efivars)
    assert again.verdict == "ok", again.log
    assert "record from the keyring" in again.log
    # the plugin never consumes the keyring copy: restore in the real root does
    assert record_key_serial() is not None


def test_no_record_no_answer(plugin_dir, tmp_path):
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        armed.key.wipe()
    (tmp_path / "efivars").mkdir()
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars")
    assert opened.returncode != 0
    assert opened.verdict == "none"


# --------------------------------------------------------------------------- both parsers

NOW_SLACK = 30


@dataclass
class Case:
    """What a table case makes its record from."""

    armed: Armed
    rk: Secret
    good: bytes  # a valid record for armed


def _flip(blob: bytes, offset: int) -> bytes:
    out = bytearray(blob)
    out[offset % len(out)] ^= 0x01
    return bytes(out)


RECORD_CASES = {
    # name: (the record, made from a Case, and the verdict both parsers must give)
    "valid": (lambda c: c.good, "ok"),
    "tampered-header-boots": (lambda c: _flip(c.good, 6), "tampered"),
    "tampered-header-deadline": (lambda c: _flip(c.good, 22), "tampered"),
    "tampered-header-boot-id": (lambda c: _flip(c.good, 30), "tampered"),
    "tampered-nonce": (lambda c: _flip(c.good, 50), "tampered"),
    "tampered-ciphertext": (lambda c: _flip(c.good, 70), "tampered"),
    "tampered-tag": (lambda c: _flip(c.good, -1), "tampered"),
    "wrong-key-id": (lambda c: _flip(c.good, 40), "foreign"),
    "another-record-key": (lambda c: seal([c.armed.entry()], record.new_record_key()),
                           "foreign"),
    "another-channel": (lambda c: seal(
        [c.armed.entry()], c.rk, channel=record.RecordChannel.KEYRING), "foreign"),
    "a-kexec-record-in-the-efi-variable": (lambda c: seal(
        [c.armed.entry()], c.rk, channel=record.RecordChannel.KEXEC), "foreign"),
    "unknown-channel-byte": (lambda c: c.good[:5] + b"\x09" + c.good[6:], "malformed"),
    "expired": (lambda c: seal([c.armed.entry()], c.rk, created=int(time.time()) - 1000,
                                         lifetime=990), "expired"),
    "clock-back": (lambda c: seal(
        [c.armed.entry()], c.rk, created=int(time.time()) + record.CLOCK_SKEW + NOW_SLACK + 60),
        "not-yet-valid"),
    "within-clock-skew": (lambda c: seal(
        [c.armed.entry()], c.rk, created=int(time.time()) + record.CLOCK_SKEW - NOW_SLACK), "ok"),
    "same-boot": (lambda c: seal([c.armed.entry()], c.rk, boot=boot_id()), "same-boot"),
    "boots-left-0": (lambda c: seal([c.armed.entry()], c.rk, boots_left=0), "exhausted"),
    "no-entry-for-this-uuid": (lambda c: seal([c.armed.entry(uuid.uuid4())], c.rk),
                               "no-entry"),
    "oversized": (lambda c: c.good + bytes(record.MAX_RECORD_SIZE + 1 - len(c.good)),
                  "malformed"),
    "truncated": (lambda c: c.good[:100], "malformed"),
    "one-byte-short-of-the-smallest": (lambda c: c.good[:-1], "malformed"),
    "one-byte-short": (lambda c: seal([c.armed.entry(), c.armed.entry(uuid.uuid4())], c.rk)[:-1],
                       "tampered"),
    "wrong-magic": (lambda c: b"XHST" + c.good[4:], "unknown-format"),
    "wrong-version": (lambda c: c.good[:4] + b"\x02" + c.good[5:], "unknown-format"),
    "empty": (lambda c: c.good[:0], "unknown-format"),
}


@pytest.fixture(scope="module")
def armed_once(tmp_path_factory):
    """One armed image and its record key for the whole table (each case its own record)."""
    rk = record.new_record_key()
    armed = arm_image(tmp_path_factory.mktemp("table") / "img", rk)
    yield armed, rk
    armed.key.wipe()
    rk.wipe()


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_the_same_verdict_from_python_and_c(plugin_dir, armed_once, tmp_path, case):
    armed, rk = armed_once
    make_record, expected = RECORD_CASES[case]
    good = seal([armed.entry()], rk)
    blob = make_record(Case(armed, rk, good))
    efivars = tmp_path / "efivars"
    write_variable(efivars, blob)
    in_python = python_verdict(blob, rk, armed.volume)
    in_c = plugin_open(plugin_dir, armed.path, efivars)
    assert (in_python, in_c.verdict) == (expected, expected), in_c.log
    assert (in_c.returncode == 0) is (expected == "ok")


def _replace_token(armed: Armed, **changes: object) -> onetime.OnetimeSlot:
    """Rewrite the image's token with some fields changed; the slot Python parses from it."""
    with LuksHeader.open(str(armed.path)) as header:
        fields = {"type": names.TOKEN_TYPE, "keyslots": [str(armed.slot.keyslot)],
                  "not_after": armed.slot.not_after, "boot_id": armed.slot.boot_id,
                  "record_key": armed.slot.record_key_b64, "binding": armed.slot.binding}
        fields.update(changes)
        header.remove_token(armed.slot.token)
        token = header.set_token(fields)
        raw = header.token_texts[token]
        parsed = onetime.parse_token(token, raw)
        if parsed is not None and onetime.not_ours(header, parsed) is not None:
            parsed = None
    return parsed


TOKEN_CASES = {
    "binding-of-another-keyslot": {"binding": "0" * 64},
    "record-key-of-16-bytes": {"record_key": base64.b64encode(bytes(16)).decode()},
    "record-key-of-33-bytes": {"record_key": base64.b64encode(bytes(33)).decode()},
    "record-key-not-base64": {"record_key": "!" * 44},
    "not-after-as-text": {"not_after": "1767225600"},
    "boot-id-in-capitals": {"boot_id": str(uuid.uuid4()).upper()},
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_a_token_python_does_not_trust_gets_no_answer_in_c(plugin_dir, tmp_path, case):
    armed, efivars, _record = armed_with_record(tmp_path)
    assert _replace_token(armed, **TOKEN_CASES[case]) is None  # Python: not one of ours
    opened = plugin_open(plugin_dir, armed.path, efivars)
    assert opened.returncode != 0
    assert opened.verdict == "untrusted-token", opened.log
    assert (efivars / VARIABLE).exists()  # an untrusted token takes nothing


def test_a_rewritten_token_that_python_still_trusts_still_opens(plugin_dir, tmp_path):
    """The control for the table above: rewriting the token is not what refuses it."""
    armed, efivars, _record = armed_with_record(tmp_path)
    assert _replace_token(armed) is not None
    assert plugin_open(plugin_dir, armed.path, efivars).verdict == "ok"


# --------------------------------------------------------------------------- delete before use


def test_the_variable_is_gone_and_the_keyring_copy_is_strict(plugin_dir, tmp_path):
    armed, efivars, blob = armed_with_record(tmp_path, lifetime=3 * 3600)
    assert plugin_open(plugin_dir, armed.path, efivars).verdict == "ok"
    assert not (efivars / VARIABLE).exists()
    serial = record_key_serial()
    assert serial is not None
    info = keyring.describe(serial)
    assert (info.key_type, info.uid, info.perm) == ("user", 0, names.KEY_PERM)
    (listed,) = keyring.proc_keys({serial})
    assert listed.seconds_left is not None
    assert 0 < listed.seconds_left <= 600
    with keyring.read(serial) as payload:
        assert bytes(payload.view()) == blob  # the record itself: unpadded, no attributes


def test_the_keyring_copy_expires_with_the_record(plugin_dir, tmp_path):
    armed, efivars, _record = armed_with_record(tmp_path, created=int(time.time()) - 3500,
                                                lifetime=3600)
    assert plugin_open(plugin_dir, armed.path, efivars).verdict == "ok"
    serial = record_key_serial()
    assert serial is not None
    (listed,) = keyring.proc_keys({serial})
    assert listed.seconds_left is not None
    assert listed.seconds_left <= 100


def test_a_variable_that_cannot_be_deleted_is_not_used(plugin_dir, tmp_path):
    armed, efivars, _record = armed_with_record(tmp_path)
    opened = plugin_open(plugin_dir, armed.path, efivars, readonly_efivars=True)
    assert opened.returncode != 0
    assert "cannot delete the EFI variable: record not used" in opened.log
    assert opened.verdict != "ok"
    assert (efivars / VARIABLE).exists()
    assert record_key_serial() is None  # published, then invalidated


def test_a_keyring_copy_not_ours_is_not_read(plugin_dir, tmp_path):
    """A record key with other permissions (anyone could have made it) is ignored."""
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        with armed.key:
            blob = seal([armed.entry()], rk)
    cache = PassphraseCache()
    serial = keyring.add("user", names.RECORD_BLOB_KEY, Secret(bytearray(blob)), keyring.THREAD)
    try:
        keyring.set_perm(serial, 0x3F3F0000)
        keyring.set_timeout(serial, 60)
        keyring.link(serial, cache.keyring_serial)
    finally:
        keyring.unlink(serial, keyring.THREAD)
    (tmp_path / "efivars").mkdir()
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars")
    assert opened.verdict == "none", opened.log
    keyring.invalidate(serial)


def test_the_dump_never_shows_the_record_key(plugin_dir, tmp_path):
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        armed.key.wipe()
    script = 'mount --bind "$1" "$2" && exec cryptsetup luksDump "$3"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", str(plugin_dir), TOKEN_DIR, str(armed.path)],
                          capture_output=True, text=True, check=True)
    assert armed.slot.binding in proc.stdout  # our dump ran
    assert armed.slot.record_key_b64 not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the kexec file


def kexec_file(tmp_path: Path, blob: bytes, mode: int = 0o600) -> Path:
    """The record as the initramfs leaves it: /run/keyhandoff/kexec-record, here scratch."""
    directory = tmp_path / "run-keyhandoff"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "kexec-record"
    path.write_bytes(blob)
    path.chmod(mode)
    return path


def kexec_armed(tmp_path: Path, channel: record.RecordChannel = record.RecordChannel.KEXEC
                ) -> tuple[Armed, Path, bytes]:
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "img", rk)
        with armed.key:
            blob = seal([armed.entry()], rk, channel=channel)
    (tmp_path / "efivars").mkdir()
    return armed, kexec_file(tmp_path, blob), blob


def test_a_kexec_record_opens_its_keyslot_and_is_taken(plugin_dir, tmp_path):
    armed, path, blob = kexec_armed(tmp_path)
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars", kexec_record=path)
    assert opened.verdict == "ok", opened.log
    assert "record taken from the kexec segment's file" in opened.log
    assert not path.exists()  # removed before it was answered from
    serial = record_key_serial()
    assert serial is not None  # published for the next volume and for restore
    assert keyring.describe(serial).perm == names.KEY_PERM
    with keyring.read(serial) as payload:
        assert bytes(payload.view()) == blob


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_kexec_file_others_could_read_or_write_is_not_used(plugin_dir, tmp_path, mode):
    armed, path, _blob = kexec_armed(tmp_path)
    path.chmod(mode)
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars", kexec_record=path)
    assert opened.returncode != 0
    assert "kexec record refused: not root's private file of a record's size" in opened.log
    assert path.exists()  # left for someone to look at
    assert record_key_serial() is None


def test_a_link_in_place_of_the_kexec_file_is_not_followed(plugin_dir, tmp_path):
    armed, path, _blob = kexec_armed(tmp_path)
    link = path.with_name("link")
    link.symlink_to(path)
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars", kexec_record=link)
    assert opened.returncode != 0
    assert "kexec record refused: it cannot be opened (a link?)" in opened.log
    assert path.exists()


def test_an_efi_record_in_the_kexec_file_is_refused_and_left(plugin_dir, tmp_path):
    armed, path, _blob = kexec_armed(tmp_path, channel=record.RecordChannel.EFI)
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars", kexec_record=path)
    assert opened.returncode != 0
    assert any(line.startswith("kexec record refused: not a kexec record") for line in opened.log)
    assert path.exists()
    assert record_key_serial() is None


def test_a_kexec_file_that_cannot_be_removed_is_not_used(plugin_dir, tmp_path):
    armed, path, _blob = kexec_armed(tmp_path)
    opened = plugin_open(plugin_dir, armed.path, tmp_path / "efivars", kexec_record=path,
                         readonly_kexec_dir=True)
    assert opened.returncode != 0
    assert "cannot remove the kexec record file: record not used" in opened.log
    assert path.exists()
    assert record_key_serial() is None  # published, then invalidated


def test_two_volumes_of_one_kexec_record_take_it_once(plugin_dir, tmp_path):
    with record.new_record_key() as rk:
        first = arm_image(tmp_path / "a", rk)
        second = arm_image(tmp_path / "b", rk)
        with first.key, second.key:
            blob = seal([first.entry(), second.entry()], rk, channel=record.RecordChannel.KEXEC)
    (tmp_path / "efivars").mkdir()
    path = kexec_file(tmp_path, blob)
    assert plugin_open(plugin_dir, first.path, tmp_path / "efivars",
                       kexec_record=path).verdict == "ok"
    again = plugin_open(plugin_dir, second.path, tmp_path / "efivars", kexec_record=path)
    assert again.verdict == "ok", again.log
    assert "record from the keyring" in again.log
