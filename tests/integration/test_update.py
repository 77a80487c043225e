"""The runner API on the host: the keyring channel end to end, the efi channel on a scratch
efivarfs directory, disarm, refusals.  What only firmware and a real reboot show is in
tests/vm.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from support.agent_process import AgentProcess, ask, finish
from support.luks_images import format_image, metadata, opens, uuid_of
from support.pam_stack import pamtester
from support.passphrases import make
from support.scratch_efi import run_in_scratch_efivars

from keyhandoff import update
from keyhandoff.cache import SystemdCache
from keyhandoff.login import LOGIN_KEY
from keyhandoff.secret import Secret

#: the ``cache`` fixture (tests/conftest.py) disarms after each test here
pytestmark = pytest.mark.arms


def _login_key() -> bytes | None:
    from keyhandoff import keyring  # noqa: PLC0415
    from keyhandoff.cache import KEY_PERM  # noqa: PLC0415
    from keyhandoff.errors import KeyUnavailable  # noqa: PLC0415
    from keyhandoff.keys import unpad  # noqa: PLC0415

    # an invalidated key reads as revoked until the kernel's GC unlinks it: gone either way
    try:
        serial = keyring.find_trusted("user", LOGIN_KEY, perm=KEY_PERM, within=keyring.USER)
        with keyring.read(serial) as raw, unpad(raw) as s:  # stored padded
            return bytes(s.view())
    except KeyUnavailable:
        return None


def test_keyring_channel_end_to_end(tmp_path, cache):
    pw = make("soft")
    img = format_image(tmp_path / "root.img", pw)
    vid = uuid_of(img)
    cache.put(vid, Secret.passphrase(pw), timeout=60)  # captured at boot, verified
    report = update.arm(reboot="soft", boots=1, ttl=timedelta(minutes=5), login=True,
                        volumes=[str(img)], ask=None)
    assert report.channel == "keyring"
    assert [v.armed for v in report.volumes] == [True]
    assert "keyring" in report.summary()
    assert update.status()["armed"]
    # --- soft reboot: userspace starts again (a fresh agent; the kernel keyring stays)
    assert update.restore(volumes=[str(img)]).restored == (vid,)
    # the unit running again in the same userspace does not count a second boot
    assert update.restore(volumes=[str(img)]).restored == ()
    assert update.status()["boots_left"] == 0
    with AgentProcess(tmp_path):
        rc, out = finish(ask(f"--id=cryptsetup:{img}", "--accept-cached"))
        assert (rc, out) == (0, pw + b"\n")
    result = update.finish(login_timeout=30)
    assert result.login == "handed to the login path"
    last = SystemdCache().last()
    assert last is not None
    with last:
        assert bytes(last.view()) == pw
    assert _login_key() == pw
    # the chain is over: nothing of it is left
    assert not update.status()["armed"]
    assert cache.entries() == []


def test_login_handoff_reaches_pam_gdm_and_our_module(tmp_path, cache, pam_gdm, pam_module,
                                                       checker):
    """The runner flow's last step, read by the real pam_gdm.so and by pam_keyhandoff.so."""
    pw = make("login")
    img = format_image(tmp_path / "root.img", pw)
    cache.put(uuid_of(img), Secret.passphrase(pw), timeout=60)
    update.arm(reboot="soft", ttl=timedelta(minutes=5), login=True, volumes=[str(img)],
               ask=None)
    update.restore(volumes=[str(img)])
    assert update.finish(login_timeout=30).login == "handed to the login path"
    # gdm's autologin stack: pam_gdm sets PAM_AUTHTOK from systemd's "cryptsetup" key
    r = pamtester(f"auth optional {pam_gdm}", checker.line())
    assert r.succeeded, r.stderr
    assert checker.token() == pw
    # a display manager without pam_gdm: our module, one shot
    r = pamtester(f"auth requisite {pam_module}", checker.line())
    assert r.succeeded, r.stderr
    assert checker.token() == pw
    assert _login_key() is None  # invalidated after use
    r = pamtester(f"auth requisite {pam_module}", checker.line())
    assert not r.succeeded
    assert checker.token() is None


def test_nothing_cached_gives_no_token(pam_gdm, pam_module, checker, cache):
    SystemdCache().clear()
    r = pamtester(f"auth optional {pam_gdm}", f"auth optional {pam_module}", checker.line())
    assert checker.token() in {None, b""}
    _ = r


def test_arm_refuses_a_wrong_cached_passphrase(tmp_path, cache):
    img = format_image(tmp_path / "v.img", make("right"))
    cache.put(uuid_of(img), Secret.passphrase(make("wrong")), timeout=60)
    with pytest.raises(update.ArmRefused, match="does not open"):
        update.arm(reboot="soft", ttl=timedelta(minutes=5), volumes=[str(img)], ask=None)
    assert not update.status()["armed"]
    assert cache.entries() == []


def test_arm_without_passphrase_and_without_asking_is_refused(tmp_path, cache):
    img = format_image(tmp_path / "v.img", make("x"))
    with pytest.raises(update.ArmRefused, match="no cached passphrase"):
        update.arm(reboot="soft", ttl=timedelta(minutes=5), volumes=[str(img)], ask=None)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"reboot": "warm"}, "reboot"),
    ({"boots": 0}, "boots"),
    ({"ttl": timedelta(seconds=5)}, "ttl"),
    ({"ttl": timedelta(days=2)}, "ttl"),
])
def test_arm_validates_its_arguments(kwargs, match, cache):
    args = {"reboot": "soft", "ttl": timedelta(minutes=5), "volumes": [], "ask": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        update.arm(**args)


def test_rearm_without_a_chain(cache):
    with pytest.raises(update.NotArmed):
        update.rearm()


# --- the efi channel on a scratch efivarfs directory ----------------------------------------

SCRIPT = """
import json, os, sys, uuid
from datetime import timedelta
from keyhandoff import keyring, update, efi
from keyhandoff.host import Host
from keyhandoff.cache import PassphraseCache
from keyhandoff.secret import Secret

img, pw_file, state = sys.argv[1], sys.argv[2], sys.argv[3]
boot_file = os.path.join(state, "boot_id")
host = Host(boot_id_path=boot_file)   # a "reboot" on one kernel: a new boot id (see module doc)
cache = PassphraseCache()

def reboot():
    # a full reboot: RAM is gone, so is everything in the kernel keyring
    cache.forget_all()
    with open(boot_file, "w") as f:
        f.write(str(uuid.uuid4()))

def onetime_slots():
    from keyhandoff.luks import LuksHeader
    from keyhandoff import onetime
    with LuksHeader.open(img) as h:
        return [s.keyslot for s in onetime.slots(h)]

out = {}
reboot()
with open(pw_file, "rb") as f:
    pw = Secret.passphrase(f.read())
vol = update.targets([img], host=host)[0].uuid
cache.put(vol, pw, timeout=120)
r = update.arm(host=host, reboot="full", boots=2, ttl=timedelta(minutes=10), login=True,
               volumes=[img], ask=None)
out["armed"] = [r.channel, [v.armed for v in r.volumes], onetime_slots()]
record_file = os.environ["EFIVARFS_PATH"] + efi.RECORD_NAME + "-" + efi.VENDOR_GUID
out["record_mode"] = oct(os.stat(record_file).st_mode & 0o777)
reboot()
rr = update.restore(host=host, volumes=[img])
out["restore1"] = [rr.channel, len(rr.restored), rr.refused]
out["record_after_restore1"] = efi.RECORD_VARIABLE.exists()
with cache.get_onetime(vol) as key:
    open(os.path.join(state, "onetime1"), "wb").write(bytes(key.view()))
f1 = update.finish(host=host)
out["finish1"] = [f1.keyslots_destroyed, f1.login, onetime_slots()]
r2 = update.rearm(host=host)
out["rearm"] = [r2.channel, onetime_slots()]
reboot()
rr = update.restore(host=host, volumes=[img])
out["restore2"] = [rr.channel, len(rr.restored), rr.refused]
with cache.get_onetime(vol) as key:
    open(os.path.join(state, "onetime2"), "wb").write(bytes(key.view()))
f2 = update.finish(host=host, login_timeout=30)
out["finish2"] = [f2.keyslots_destroyed, f2.login, onetime_slots()]
from keyhandoff.cache import SystemdCache
last = SystemdCache().last()
out["login_is_passphrase"] = last is not None and last == pw
out["armed_after"] = update.status(host=host)["armed"]
reboot()
rr = update.restore(host=host, volumes=[img])
out["restore3"] = [rr.channel, len(rr.restored)]
print(json.dumps(out))
"""


def test_efi_chain_of_two_boots_with_login(tmp_path, cache):
    pw = make("full")
    img = format_image(tmp_path / "data.img", pw)
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(pw)
    state = tmp_path / "state"
    state.mkdir()
    try:
        out, proc, efivars = run_in_scratch_efivars(SCRIPT, tmp_path, img, pw_file, state)
    finally:
        pw_file.unlink()
    assert out["armed"][0] == "efi"
    assert out["armed"][1] == [True]
    assert len(out["armed"][2]) == 1  # one one-time keyslot
    assert out["record_mode"] == "0o600"
    assert out["restore1"] == ["efi", 1, None]
    assert out["record_after_restore1"] is False  # read and deleted
    assert out["finish1"][0] == 1  # the used keyslot is destroyed once the volume is open
    assert out["finish1"][2] == []
    assert out["rearm"][0] == "efi"
    assert len(out["rearm"][1]) == 1  # a fresh one-time keyslot for boot 2
    assert out["restore2"] == ["efi", 1, None]
    assert out["finish2"][:3] == [1, "handed to the login path", []]
    assert out["login_is_passphrase"] is True
    assert out["armed_after"] is False
    assert out["restore3"] == [None, 0]  # nothing left for a later boot
    # the one-time keys opened the volume in their boot, and open nothing now
    for name in ("onetime1", "onetime2"):
        key = (state / name).read_bytes()
        assert len(key) == 64
        assert not opens(img, key)
    # no token of ours left; the person's keyslot still there
    meta = metadata(img)
    assert not any(t.get("type") == "keyhandoff-onetime" for t in meta["tokens"].values())
    assert opens(img, pw)
    # neither the passphrase nor a one-time key in anything written (stdout, stderr, efivars)
    blobs = [proc.stdout, proc.stderr] + [p.read_bytes() for p in efivars.iterdir()]
    for blob in blobs:
        assert pw not in blob
    for p in state.iterdir():
        p.unlink()


def test_efi_refuses_luks1(tmp_path, cache):
    pw = make("l1")
    img = format_image(tmp_path / "l1.img", pw, luks="luks1")
    code = """
    import sys, json
    from datetime import timedelta
    from keyhandoff import update
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.secret import Secret
    img, pw_file = sys.argv[1], sys.argv[2]
    vol = update.targets([img])[0].uuid
    PassphraseCache().put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=60)
    try:
        update.arm(reboot="full", ttl=timedelta(minutes=5), volumes=[img], ask=None)
        print(json.dumps({"refused": None}))
    except update.ArmRefused as exc:
        print(json.dumps({"refused": str(exc), "efi": update.status()["armed"]}))
    finally:
        PassphraseCache().forget_all()
    """
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(pw)
    out, _proc, efivars = run_in_scratch_efivars(code, tmp_path, img, pw_file)
    assert "LUKS1" in out["refused"]
    assert out["efi"] is False
    assert list(efivars.iterdir()) == []


def test_efi_unavailable_is_refused(tmp_path, cache):
    pw = make("noefi")
    img = format_image(tmp_path / "v.img", pw)
    cache.put(uuid_of(img), Secret.passphrase(pw), timeout=60)
    # this host has no EFI runtime variables at all
    with pytest.raises(update.ChannelUnavailable):
        update.arm(reboot="full", ttl=timedelta(minutes=5), volumes=[str(img)], ask=None)
    assert not update.status()["armed"]


def test_disarm_leaves_nothing(tmp_path, cache):
    pw = make("dis")
    img = format_image(tmp_path / "v.img", pw)
    vid, before = uuid_of(img), metadata(img)
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    update.arm(reboot="soft", ttl=timedelta(minutes=5), volumes=[str(img)], ask=None)
    counts = update.disarm(volumes=[str(img)])
    assert counts["keys"] >= 2
    assert not update.status()["armed"]
    assert cache.entries() == []
    # volume untouched: the same identity, keyslots and tokens as before the arm
    after = metadata(img)
    assert uuid_of(img) == vid
    assert (after["keyslots"], after["tokens"]) == (before["keyslots"], before["tokens"])
    assert opens(img, pw)


def test_efi_arm_costs_one_pbkdf_of_the_persons_keyslot(tmp_path, cache):
    """Counted in libcryptsetup's debug log, not timed: one open of the person's keyslot."""
    pw = make("cost")
    img = format_image(tmp_path / "cost.img", pw)
    code = """
    import json, sys
    from datetime import timedelta
    from keyhandoff import update
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.luks import _debug_log
    from keyhandoff.secret import Secret
    img, pw_file = sys.argv[1], sys.argv[2]
    cache = PassphraseCache()
    vol = update.targets([img])[0].uuid
    cache.put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=60)
    with _debug_log() as log:
        update.arm(reboot="full", ttl=timedelta(minutes=5), volumes=[img], ask=None)
    update.disarm(quiet=True, volumes=[img])
    cache.forget_all()
    print(json.dumps({
        "opened": [m for m in log if m.startswith("Trying to open LUKS2 keyslot")],
        "derivations": log.count("Running keyslot key derivation."),
    }))
    """
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(pw)
    out, _proc, _efivars = run_in_scratch_efivars(code, tmp_path, img, pw_file)
    pw_file.unlink()
    assert out["opened"] == ["Trying to open LUKS2 keyslot 0."]
    assert out["derivations"] == 2  # the person's keyslot, and the new cheap one-time slot
