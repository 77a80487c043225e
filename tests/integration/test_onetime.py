"""One-time keyslots on real LUKS2 headers: which keyslot is ours, hostile tokens, and
volumes found without crypttab or chain state.

* Finding 4: a stale or forged ``keyhandoff-onetime`` token must never destroy a keyslot
  that is not the one its token was made for, even one with pbkdf2 and 1000 iterations
  (cryptsetup's minimum, and what systemd-cryptenroll gives recovery, TPM2, FIDO2 and
  PKCS#11 keyslots).
* Finding 6: token text is untrusted: restore and disarm never fail on it, and still
  destroy what is really ours.
* Finding 3: restore, finish and disarm find a one-time keyslot on a block device that is
  in no crypttab, after the chain state that named it expired or was removed.

The boot steps run in a fresh interpreter on a scratch efivarfs directory
(tests/support/scratch_efi.py), as in production.  Keyslots are made by
keyhandoff.onetime.add (what ``arm`` does) or by the cryptsetup binary.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid

import pytest
from support.luks_images import (
    add_key,
    cryptsetup,
    export_token,
    format_image,
    import_token,
    kill_slot,
    loop_device,
    metadata,
    opens,
)
from support.passphrases import make
from support.scratch_efi import run_in_scratch_efivars

from keyhandoff import luks_scan, onetime
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

SWEEP = """
import json, sys
from keyhandoff import update
step, paths = sys.argv[1], sys.argv[2:]
if step == "restore":
    destroyed = update.restore(volumes=paths).keyslots_destroyed
elif step == "disarm":
    destroyed = update.disarm(quiet=True, volumes=paths)["keyslots"]
else:
    destroyed = update.finish().keyslots_destroyed
print(json.dumps({"destroyed": destroyed}))
"""


def sweep(tmp_path, step, *paths):
    """Run one boot step (or disarm) in a fresh interpreter; what it destroyed, its log."""
    out, proc, _efivars = run_in_scratch_efivars(SWEEP, tmp_path, step, *paths)
    return out["destroyed"], proc.stderr.decode(errors="replace")


def add_onetime(img, passphrase, *, boot_id=None, not_after=None):
    """A genuine one-time keyslot and token, made as ``arm`` makes them."""
    with LuksHeader.open(img) as header:
        _slot, vk = header.volume_key(Secret.passphrase(passphrase))
        with vk, Secret(bytearray(os.urandom(32))) as record_key:
            slot, key = onetime.add(
                header, vk, not_after=not_after or int(time.time()) + 600,
                boot_id=boot_id or str(uuid.uuid4()), record_key=record_key,
            )
        key.wipe()
    return slot


def tokens_of_ours(img):
    """Our tokens as cryptsetup dumps them (read leniently: some are not valid UTF-8)."""
    dumped = cryptsetup("luksDump", "--dump-json-metadata", str(img)).stdout
    tokens = json.loads(dumped.decode("utf-8", "replace"))["tokens"]
    return {int(k): v for k, v in tokens.items() if v.get("type") == onetime.TOKEN_TYPE}


def keyslot_kdf(img, keyslot):
    kdf = metadata(img)["keyslots"][str(keyslot)]["kdf"]
    return kdf["type"], kdf.get("iterations")


# --- finding 4: which keyslot is ours ------------------------------------------------------


@pytest.mark.parametrize("step", ["restore", "disarm"])
def test_a_stale_token_does_not_destroy_a_keyslot_reusing_its_number(tmp_path, step):
    """luksKillSlot, then the person's new keyslot in the same number, our old token back.

    The token comes back the way a token backup is restored (``cryptsetup token export``,
    later ``token import``), which assigns it to the keyslot number it names.  The new
    keyslot has pbkdf2 with 1000 iterations, exactly what a one-time keyslot has.
    """
    person, second = make("stale-person"), make("stale-second")
    img = format_image(tmp_path / "v.img", person)
    ours = add_onetime(img, person)
    assert ours.keyslot == 1
    saved = export_token(img, ours.token)
    with LuksHeader.open(img) as header:
        header.remove_token(ours.token)
    kill_slot(img, 1, person)
    add_key(img, person, second)  # the lowest free keyslot: 1 again, pbkdf2/1000
    import_token(img, saved)
    assert keyslot_kdf(img, 1) == ("pbkdf2", 1000)
    assert [t["keyslots"] for t in tokens_of_ours(img).values()] == [["1"]]
    assert opens(img, second, keyslot=1)

    destroyed, log = sweep(tmp_path, step, img)

    assert destroyed == 0
    assert opens(img, second, keyslot=1)  # the person's keyslot is still there
    assert opens(img, person, keyslot=0)
    assert tokens_of_ours(img) == {}  # the stale token is gone
    assert "is not the keyslot token" in log  # and it is said why


def _forged(keyslot, **fields):
    data = {"type": onetime.TOKEN_TYPE, "keyslots": [str(keyslot)], "not_after": 1,
            "boot_id": str(uuid.uuid4()),
            "record_key": base64.b64encode(os.urandom(32)).decode()}
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


@pytest.mark.parametrize("forgery", ["no-binding", "random-binding", "copied-binding"])
def test_a_forged_token_cannot_destroy_a_cryptenroll_like_keyslot(tmp_path, forgery):
    """A recovery-key-like keyslot (pbkdf2, 1000 iterations) named by a forged token."""
    person, recovery = make("forge-person"), make("forge-recovery")
    img = format_image(tmp_path / "v.img", person)
    add_key(img, person, recovery)  # keyslot 1, pbkdf2/1000 like systemd-cryptenroll's
    assert keyslot_kdf(img, 1) == ("pbkdf2", 1000)
    if forgery == "no-binding":
        token = _forged(1)
    elif forgery == "random-binding":
        token = _forged(1, binding=os.urandom(32).hex())
    else:  # a genuine token of ours, for keyslot 1 of another header, copied over
        other = format_image(tmp_path / "other.img", person)
        genuine = add_onetime(other, person)
        assert genuine.keyslot == 1
        token = export_token(other, genuine.token)
    import_token(img, token)
    assert [t["keyslots"] for t in tokens_of_ours(img).values()] == [["1"]]

    for step in ("restore", "disarm"):
        destroyed, _log = sweep(tmp_path, step, img)
        assert destroyed == 0
    assert opens(img, recovery, keyslot=1)
    assert opens(img, person, keyslot=0)
    assert tokens_of_ours(img) == {}


@pytest.mark.parametrize("step", ["restore", "disarm"])
def test_our_own_keyslot_is_still_destroyed(tmp_path, step):
    """The normal path: ours goes, the person's and a recovery keyslot beside it stay."""
    person, recovery = make("own-person"), make("own-recovery")
    img = format_image(tmp_path / "v.img", person)
    add_key(img, person, recovery)
    ours = add_onetime(img, person)
    assert ours.keyslot == 2
    with LuksHeader.open(img) as header:
        assert [s.keyslot for s in onetime.slots(header)] == [2]
        assert ours.binding == onetime.binding(2, header.keyslot_salt(2) or b"")

    destroyed, _log = sweep(tmp_path, step, img)

    assert destroyed == 1
    assert sorted(metadata(img)["keyslots"]) == ["0", "1"]
    assert tokens_of_ours(img) == {}
    assert opens(img, person, keyslot=0)
    assert opens(img, recovery, keyslot=1)


def test_keyslot_salt_is_what_cryptsetup_dumps(tmp_path):
    person = make("salt")
    img = format_image(tmp_path / "v.img", person)
    add_key(img, person, make("salt-second"))
    dumped = metadata(img)["keyslots"]
    with LuksHeader.open(img) as header:
        for n in (0, 1):
            assert header.keyslot_salt(n) == base64.b64decode(dumped[str(n)]["kdf"]["salt"])
        assert header.keyslot_salt(5) is None
    assert dumped["0"]["kdf"]["salt"] != dumped["1"]["kdf"]["salt"]


# --- finding 6: hostile token text -----------------------------------------------------------

_PREFIX = b'{"type":"keyhandoff-onetime","keyslots":["0"],'
HOSTILE = {
    "invalid-utf8": _PREFIX + b'"not_after":1,"boot_id":"\xff\xfe","record_key":"","binding":""}',
    "1e400": _PREFIX + b'"not_after":1e400,"boot_id":"x","record_key":""}',
    "nan": _PREFIX + b'"not_after":NaN,"boot_id":"x","record_key":""}',
    "huge-int": _PREFIX + b'"not_after":' + b"9" * 400 + b',"boot_id":"x"}',
    "float": _PREFIX + b'"not_after":1.5,"boot_id":"x"}',
    "bool": _PREFIX + b'"not_after":true,"boot_id":"x"}',
    "duplicate": _PREFIX + b'"not_after":1,"not_after":2,"boot_id":"x"}',
    "nested": _PREFIX + b'"not_after":{"a":[[[1]]]},"boot_id":["x"]}',
}


@pytest.mark.parametrize("step", ["restore", "disarm"])
@pytest.mark.parametrize("shape", list(HOSTILE))
def test_hostile_token_text_never_stops_the_sweep(tmp_path, shape, step):
    """Written through the real cryptsetup binary; beside it a genuine one-time keyslot."""
    person = make("hostile")
    img = format_image(tmp_path / "v.img", person)
    import_token(img, HOSTILE[shape])
    ours = add_onetime(img, person)
    assert len(tokens_of_ours(img)) == 2

    destroyed, log = sweep(tmp_path, step, img)  # fails on a non-zero exit (a traceback)

    assert destroyed == 1  # ours went, though a hostile token sat beside it
    assert str(ours.keyslot) not in metadata(img)["keyslots"]
    assert tokens_of_ours(img) == {}  # the hostile token is removed as untrusted...
    assert opens(img, person, keyslot=0)  # ...without touching the keyslot it names
    assert "Traceback" not in log


# --- finding 3: volumes not in crypttab, chain state gone ----------------------------------

ARMED = """
import json, os, sys, time, uuid
from datetime import timedelta
from keyhandoff import efi, keyring, onetime, update
from keyhandoff.host import Host
from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import KeyExpired
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

dev, pw_file, state, loss, step = sys.argv[1:6]
boot_file = os.path.join(state, "boot_id")
shift = [0]  # seconds the clock is moved (a fault's RTC)
host = Host(boot_id_path=boot_file,
            clock=lambda: time.time() + shift[0])   # a "reboot" on one kernel: a new boot id
cache = PassphraseCache()
record_file = os.environ["EFIVARFS_PATH"] + efi.RECORD_NAME + "-" + efi.VENDOR_GUID

def new_boot():
    keyring.clear(cache.keyring_serial)  # RAM is gone, so is everything in the kernel keyring
    with open(boot_file, "w") as f:
        f.write(str(uuid.uuid4()))

def slots():
    with LuksHeader.open(dev) as h:
        return [s.keyslot for s in onetime.slots(h)]

def lose_chain():
    if loss == "expired":         # the kernel timeout runs out, for real
        serial = cache._find(update.CHAIN_KEY)
        keyring.set_timeout(serial, 1)
        time.sleep(2.5)
        assert update.status(host=host)["armed"] is False
        try:
            keyring.read(serial)
            raise AssertionError("the chain key did not expire")
        except KeyExpired:
            pass
        # what the kernel's key GC does within minutes (forget_all trips over expired keys)
        keyring.unlink(serial, cache.keyring_serial)
    else:                         # removed (a cache command, a person, a crash)
        cache.forget_key(update.CHAIN_KEY)
    assert update.status(host=host)["armed"] is False

new_boot()
vol = update.targets([dev], host=host)[0].uuid
cache.put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=120)
update.arm(host=host, reboot="full", ttl=timedelta(minutes=10), volumes=[dev], ask=None)
out = {"armed": slots()}
cache.forget(vol)
if step == "disarm":              # chain state lost in the arming boot; `keyhandoff disarm`
    lose_chain()
    out["result"] = update.disarm(host=host, quiet=True)["keyslots"]
elif step == "restore-late":      # chain state lost, powered off past the deadline, booted
    lose_chain()
    new_boot()
    shift[0] = 3600
    out["result"] = update.restore(host=host).keyslots_destroyed
elif step == "restore-finish":    # the record is good: restore finds the volume by itself
    new_boot()
    r = update.restore(host=host)
    out["restored"] = list(r.restored)
    lose_chain()                  # between restore and finish
    cache.forget(vol)
    out["result"] = update.finish(host=host).keyslots_destroyed
elif step == "alias":             # the header reached as the image file and as /dev/loopN
    new_boot()
    backing = open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read().strip()
    r = update.restore(host=host, volumes=[backing])
    out["restored"] = list(r.restored)
    out["kept"] = slots()         # claimed through one path, not destroyed through the other
    out["result"] = update.finish(host=host).keyslots_destroyed
out["after"] = slots()
out["record_left"] = os.path.exists(record_file)
cache.forget_all()
print(json.dumps(out))
"""


@pytest.mark.parametrize(("loss", "step"), [
    ("expired", "disarm"),
    ("forgotten", "disarm"),
    ("forgotten", "restore-late"),
    ("expired", "restore-finish"),
    ("none", "alias"),
])
def test_a_volume_in_no_crypttab_is_swept_without_chain_state(tmp_path, loss, step):
    """Armed with ``--volume /dev/loopN`` (a real block device, in no crypttab)."""
    pw = make("nocrypttab")
    img = format_image(tmp_path / "v.img", pw)
    state = tmp_path / "state"
    state.mkdir()
    pw_file = state / "pw"
    pw_file.write_bytes(pw)
    with loop_device(img) as dev:
        try:
            out, proc, _efivars = run_in_scratch_efivars(ARMED, tmp_path, dev, pw_file, state,
                                                         loss, step)
        finally:
            pw_file.unlink()
        assert pw not in proc.stdout + proc.stderr
        assert len(out["armed"]) == 1
        if step in {"restore-finish", "alias"}:
            assert len(out["restored"]) == 1  # found on the loop device, no path given
        if step == "alias":
            assert out["kept"] == out["armed"]
        assert out["result"] == 1
        assert out["after"] == []
        assert out["record_left"] is False
        assert tokens_of_ours(dev) == {}
        assert opens(dev, pw)


def test_the_scan_finds_luks_block_devices_only(tmp_path):
    """The sysfs + magic probe (udevd does not run on every machine that boots us)."""
    luks_img = format_image(tmp_path / "luks.img", make("scan"))
    plain = tmp_path / "plain.img"
    with plain.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    with loop_device(luks_img) as luks_dev, loop_device(plain) as plain_dev:
        found = luks_scan.block_devices()
        assert luks_dev in found
        assert plain_dev not in found
        assert luks_scan.has_luks_magic(str(luks_img))
        assert not luks_scan.has_luks_magic(str(plain))
        # one device named twice (node and file are different identities: both kept)
        assert luks_scan.unique_paths([luks_dev, luks_dev, str(luks_img), str(luks_img)]) == [
            luks_dev, str(luks_img)]
        assert luks_dev in luks_scan.luks_paths([str(luks_img)])


def test_a_luks2_header_with_a_wiped_primary_is_still_found(tmp_path):
    """libcryptsetup opens a LUKS2 volume from its secondary header: so does the probe."""
    img = format_image(tmp_path / "v.img", make("secondary"))
    with img.open("r+b") as f:
        f.write(bytes(4096))
    assert img.read_bytes()[:6] != luks_scan.LUKS_MAGIC
    assert cryptsetup("isLuks", str(img), check=False).returncode == 0
    assert luks_scan.has_luks_magic(str(img))
