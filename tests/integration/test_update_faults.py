"""Faults around the efi channel (on a scratch efivarfs directory): each ends with a normal
prompt for the person (nothing cached), a clear refusal, and nothing stale left behind.

A full reboot cannot happen on the test host; the script gives the "next boot" a new boot
id and moves the clock (a keyhandoff.host.Host of its own) where a fault needs it: the
only stand-ins here, and they replace what the kernel and the RTC would report.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
from support.luks_images import cryptsetup, format_image, metadata, opens
from support.passphrases import make
from support.scratch_efi import run_in_scratch_efivars, run_with_efivars, tiny_tmpfs

SCRIPT = """
import json, os, sys, time, uuid
from datetime import timedelta
from keyhandoff import update, efi, keyring, onetime
from keyhandoff.host import Host
from keyhandoff.cache import PassphraseCache
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

img, pw_file, state, fault = sys.argv[1:5]
boot_file = os.path.join(state, "boot_id")
shift = [0]  # seconds the clock is moved (a fault's RTC)
host = Host(boot_id_path=boot_file,
            clock=lambda: time.time() + shift[0])
cache = PassphraseCache()
record_file = os.environ["EFIVARFS_PATH"] + efi.RECORD_NAME + "-" + efi.VENDOR_GUID

def new_boot():
    keyring.clear(cache.keyring_serial)  # RAM is gone: every key of ours, chain state too
    with open(boot_file, "w") as f:
        f.write(str(uuid.uuid4()))

def slots():
    with LuksHeader.open(img) as h:
        return [s.keyslot for s in onetime.slots(h)]

new_boot()
vol = update.targets([img], host=host)[0].uuid
cache.put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=120)
update.arm(host=host, reboot="full", ttl=timedelta(minutes=10), volumes=[img], ask=None)
armed_slots = slots()
if fault != "same-boot":
    new_boot()
else:
    # With its chain state, restore in the arming boot leaves the record for the next boot
    # (test_update_runner.py).  Without it (expired, or forgotten), a record made in this
    # boot is refused: what arm cached is not the question here, what restore adds is.
    keyring.clear(cache.keyring_serial)
if fault == "late":            # powered off past the deadline, then booted
    shift[0] = 3600
elif fault == "clock-back":    # the RTC was reset to before the arming time
    shift[0] = -86400
elif fault == "tampered":      # one byte of the record flipped in NVRAM
    data = bytearray(open(record_file, "rb").read())
    data[4 + 20] ^= 0x01       # a byte of the header (after the 4 attribute bytes)
    os.remove(record_file)
    open(record_file, "wb").write(bytes(data))
elif fault == "foreign":       # a record whose keyslots are not on this machine's volumes
    with LuksHeader.open(img) as h:
        for s in onetime.slots(h):
            h.remove_token(s.token)
r1 = update.restore(host=host, volumes=[img])
cached = [e.volume for e in [*cache.entries(), *cache.onetime_entries()]]
r2 = update.restore(host=host, volumes=[img]) if fault == "twice" else None
update.disarm(host=host, quiet=True, volumes=[img])
cache.forget_all()
print(json.dumps({
    "armed_slots": armed_slots, "refused": r1.refused, "restored": list(r1.restored),
    "destroyed": r1.keyslots_destroyed, "slots_after": slots(), "cached": cached,
    "record_left": os.path.exists(record_file),
    "second": None if r2 is None else [r2.channel, list(r2.restored)],
}))
"""


def run(tmp_path, img, pw, fault):
    state = tmp_path / "state"
    state.mkdir()
    pw_file = state / "pw"
    pw_file.write_bytes(pw)
    try:
        out, proc, _efivars = run_in_scratch_efivars(SCRIPT, tmp_path, img, pw_file, state, fault)
    finally:
        pw_file.unlink()
    log = proc.stderr.decode(errors="replace")
    assert pw not in proc.stdout + proc.stderr
    return out, log


@pytest.mark.parametrize(("fault", "reason"), [
    ("late", "deadline passed"),
    ("clock-back", "before the arming time"),
    ("tampered", "authentication failed"),
    ("same-boot", "boot"),
    ("foreign", "no one-time keyslot"),
])
def test_refused_record_is_wiped_and_the_person_is_asked(tmp_path, fault, reason):
    pw = make(fault)
    img = format_image(tmp_path / "v.img", pw)
    out, log = run(tmp_path, img, pw, fault)
    assert len(out["armed_slots"]) == 1 or fault == "foreign"
    assert out["refused"] is not None
    assert reason in out["refused"]
    assert "RECORD_REFUSED" in log
    assert out["restored"] == []
    assert out["cached"] == []  # nothing to answer with: systemd asks the person
    assert out["record_left"] is False  # read and deleted before it was judged
    assert out["slots_after"] == []  # the one-time keyslot is gone too
    assert opens(img, pw)  # the person's passphrase still opens the volume


def test_a_record_is_restored_once(tmp_path):
    pw = make("twice")
    img = format_image(tmp_path / "v.img", pw)
    out, _log = run(tmp_path, img, pw, "twice")
    assert out["refused"] is None
    assert len(out["restored"]) == 1
    assert out["second"] == [None, []]


def test_a_forged_token_cannot_destroy_the_persons_keyslot(tmp_path):
    """A token naming the person's keyslot loses the token, never the keyslot."""
    pw = make("forged")
    img = tmp_path / "v.img"
    format_image(img, pw, pbkdf=("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1001"))
    token = json.dumps({"type": "keyhandoff-onetime", "keyslots": ["0"], "not_after": 1,
                        "boot_id": "x", "record_key": ""})
    cryptsetup("token", "import", "--json-file=-", str(img), stdin=token.encode())
    code = (
        "import sys\nfrom keyhandoff import update\n"
        "r = update.restore(volumes=[sys.argv[1]])\nprint(r.keyslots_destroyed)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBEFIVAR", "EFIVARFS"))}
    proc = subprocess.run([sys.executable, "-c", code, str(img)], capture_output=True,
                          text=True, env=env, timeout=60, check=True)
    assert proc.stdout.strip() == "0"
    assert opens(img, pw)
    assert not any(t.get("type") == "keyhandoff-onetime"
                   for t in metadata(img)["tokens"].values())


def test_full_efi_store_refuses_to_arm_and_leaves_nothing(tmp_path):
    """ENOSPC for real: the efivarfs stand-in is a tmpfs with no room left."""
    pw = make("enospc")
    img = format_image(tmp_path / "v.img", pw)
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(pw)
    code = """
    import json, sys
    from datetime import timedelta
    from keyhandoff import update
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.secret import Secret
    img, pw_file = sys.argv[1], sys.argv[2]
    cache = PassphraseCache()
    vol = update.targets([img])[0].uuid
    cache.put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=60)
    try:
        update.arm(reboot="full", ttl=timedelta(minutes=5), volumes=[img], ask=None)
        out = {"refused": None}
    except update.ChannelUnavailable as exc:
        out = {"refused": str(exc), "armed": update.status()["armed"],
               "still_cached": vol in [e.volume for e in cache.entries()]}
    cache.forget_all()
    print(json.dumps(out))
    """
    with tiny_tmpfs(tmp_path / "efivars") as efivars:
        with contextlib.suppress(OSError), (efivars / "filler").open("wb") as f:
            f.write(bytes(64 * 1024))
        out, _proc = run_with_efivars(code, efivars, img, pw_file)
        assert [p.name for p in efivars.iterdir()] == ["filler"]
    pw_file.unlink()
    assert "EfiStoreFull" in out["refused"]
    assert out["armed"] is False
    assert out["still_cached"] is True  # what the person typed at boot is not thrown away
    assert not any(t.get("type") == "keyhandoff-onetime" for t in metadata(img)["tokens"].values())


def test_a_malformed_token_of_ours_is_removed_at_boot(tmp_path):
    pw = make("malformed")
    img = format_image(tmp_path / "v.img", pw)
    cryptsetup("token", "import", "--json-file=-", str(img),
               stdin=b'{"type": "keyhandoff-onetime", "keyslots": [], "boot_id": 7}')
    assert any(t.get("type") == "keyhandoff-onetime" for t in metadata(img)["tokens"].values())
    code = "import sys\nfrom keyhandoff import update\nupdate.restore(volumes=[sys.argv[1]])\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBEFIVAR", "EFIVARFS"))}
    subprocess.run([sys.executable, "-c", code, str(img)], env=env, timeout=60, check=True,
                   capture_output=True)
    assert not any(t.get("type") == "keyhandoff-onetime"
                   for t in metadata(img)["tokens"].values())
    assert opens(img, pw)
