"""The contract every registered handoff channel keeps, run over ``channels.REGISTRY``.

Each test runs once per channel, the way pyca/cryptography runs its tests over every
backend: a new channel registered in keyhandoff.channels is tested here without a line
added, except its bench below (how its "next boot" looks on one kernel).

The scenario runs in a fresh interpreter (libefivar reads its backend from the environment
when it loads) on a scratch efivarfs directory and real LUKS2 images.  A reboot cannot
happen on the test host; the bench makes the next boot from what the channel says it
survives (``keeps_keyring``): a soft reboot keeps our keyring and the boot id and systemd
counts one more soft reboot; a boot that loses the keyring gets a new boot id and an empty
keyring.  The clock is moved through the ``Host`` for the late and clock-back boots, and
"late" also lets the kernel expire every key of ours for real.  These stand-ins replace
what the kernel and the RTC would report; everything else is real.

The ``kexec`` channel needs one more stand-in, because this host's kernel has no kexec at
all: ``keyhandoff.kexec``'s state, next kernel, load and unload are replaced by a bench
kernel that keeps the initrd the channel built (the real sealed memfd with its appended
archive) and, at the "next boot", unpacks the appended archive with GNU cpio as the new
kernel does and moves the record where the initramfs step moves it.  The VM's ``kexec``
scenario loads and boots a kernel for real.
"""

from __future__ import annotations

import pytest
from support.luks_images import format_image, metadata, opens, uuid_of
from support.passphrases import make
from support.scratch_efi import run_in_scratch_efivars

from keyhandoff import channels, names

pytestmark = pytest.mark.arms

CHANNELS = sorted(channels.REGISTRY)

#: Where each channel keeps a record outside our keyring, relative to the efivarfs dir
#: (``None``: it keeps none, so there is no record to tamper with, replay or misdate).
#: Every registered channel needs an entry: test_every_channel_has_a_bench holds it.
#: ``{efivars}``: the scratch efivarfs directory; ``{state}``: the bench's state directory.
RECORDS: dict[str, str | None] = {
    "keyring": None,
    "efi": f"{{efivars}}{names.EFI_RECORD_NAME}-{names.EFI_VENDOR_GUID}",
    "kexec": "{state}/kexec-record",
}

SCENARIO = """
import json, os, subprocess, sys, tempfile, time, uuid
from datetime import timedelta
from keyhandoff import channels, efi, keyring, onetime, update
from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import KeyUnavailable, WrongPassphrase
from keyhandoff.host import Host
from keyhandoff.luks import LuksHeader, _debug_log
from keyhandoff.secret import Secret

name, state, scenario, record = sys.argv[1:5]
images = sys.argv[5::2]
pw_files = sys.argv[6::2]
channel = channels.REGISTRY[name]
boot_file = os.path.join(state, "boot_id")
shift = [0]
soft = [7]
record_file = (record.format(efivars=os.environ["EFIVARFS_PATH"], state=state)
               if record != "-" else None)
host = Host(boot_id_path=boot_file, clock=lambda: time.time() + shift[0],
            soft_reboot_count=lambda: soft[0],
            kexec_record_path=os.path.join(state, "kexec-record"),
            kexec_mark_path=os.path.join(state, "kexec-loaded"))
cache = PassphraseCache()
loaded = {}                            # the bench kernel's loaded initrd (kexec only)
if name == "kexec":                    # this host has no kexec: the kernel's part, stood in
    from keyhandoff import kexec
    bench_kernel = os.path.join(state, "vmlinuz-bench")
    bench_initrd = os.path.join(state, "initrd.img-bench")
    with open(bench_kernel, "wb") as f:
        f.write(b"MZ bench kernel")
    with open(bench_initrd, "wb") as f:
        f.write(bytes([0x1F, 0x8B]) + b" a distribution initrd, 37 bytes long")
    def bench_load(kernel_fd, initrd_fd, cmdline):
        size = os.fstat(initrd_fd).st_size
        loaded["initrd"] = os.pread(initrd_fd, size, 0)
    kexec.state = lambda root="/": kexec.KexecState(True, "", False, "initrd" in loaded)
    kexec.next_kernel = lambda root="/": kexec.RunningKernel("bench", bench_kernel, bench_initrd,
                                                             "ro")
    kexec.load = bench_load
    kexec.unload = lambda root="/": loaded.pop("initrd", None) is not None

def kexec_into_the_loaded_kernel():
    # the new kernel unpacks the archive after the distribution's (at the next multiple of
    # 4), and the initramfs step moves the record to /run/keyhandoff (here: the state dir)
    data = loaded.pop("initrd")
    start = os.path.getsize(bench_initrd)
    start += -start % 4
    with tempfile.TemporaryDirectory() as root:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                       input=data[start:], cwd=root, check=True)
        os.replace(os.path.join(root, "keyhandoff", "kexec-record"), host.kexec_record_path)

def record_held():
    # where the channel keeps the record outside our keyring: a file, or the loaded image
    return record_file is not None and (os.path.exists(record_file) or "initrd" in loaded)

def new_boot():
    if channel.keeps_keyring:          # a soft reboot: same kernel, one more soft reboot
        soft[0] += 1
    else:                              # RAM is gone, so is our keyring; a new boot id
        keyring.clear(cache.keyring_serial)
        with open(boot_file, "w") as f:
            f.write(str(uuid.uuid4()))
        if loaded:                     # systemctl kexec: /run is new, so is its record
            for path in (host.kexec_mark_path,):
                if os.path.exists(path):
                    os.unlink(path)
            kexec_into_the_loaded_kernel()

def slots():
    out = 0
    for img in images:
        with LuksHeader.open(img) as h:
            out += len(onetime.slots(h))
    return out

def ours():
    # every key left in our keyring that is still readable
    left = []
    for serial in keyring.list_keyring(cache.keyring_serial):
        try:
            d = keyring.describe(serial)
            keyring.read(serial).wipe()
        except (KeyUnavailable, OSError):
            continue
        left.append(d.description)
    return sorted(left)

def opens_with_cache(img, vol):
    # what the agent answers with: the volume's one-time key first, else its passphrase
    for get in (cache.get_onetime, cache.get):
        try:
            with get(vol) as key, LuksHeader.open(img) as h:
                h.verify(key)
                return True
        except KeyUnavailable:
            continue
        except WrongPassphrase:
            return False
    return False

with open(boot_file, "w") as f:
    f.write(str(uuid.uuid4()))
vols = [update.targets([img], host=host)[0].uuid for img in images]
for vol, pw_file in zip(vols, pw_files):
    cache.put(vol, Secret.passphrase(open(pw_file, "rb").read()), timeout=120)
out = {}
with _debug_log() as log:
    r = update.arm(reboot=channel.reboot, ttl=timedelta(minutes=10), volumes=images,
                   ask=None, host=host)
out["opened"] = [m for m in log if m.startswith("Trying to open LUKS2 keyslot")]
out["arm"] = [r.channel, [v.armed for v in r.volumes]]
out["record_armed"] = record_held()

if scenario == "same-boot":            # restore in the arming boot: the unit restarted
    r = update.restore(volumes=images, host=host)
    out["same"] = [list(r.restored), slots(), update.status(host=host)["armed"],
                   record_held()]
    new_boot()                          # and the real next boot still gets the handoff
elif scenario == "disarm":
    out["disarm"] = update.disarm(quiet=True, volumes=images, host=host)
else:
    new_boot()
if scenario == "late":                 # powered off past the deadline
    shift[0] = 3600
    for serial in keyring.list_keyring(cache.keyring_serial):
        keyring.set_timeout(serial, 1)  # the deadline passes in the kernel too
    time.sleep(2.5)
    for serial in keyring.list_keyring(cache.keyring_serial):
        try:
            keyring.read(serial).wipe()
        except KeyUnavailable:          # expired: what the kernel's key GC does within minutes
            keyring.unlink(serial, cache.keyring_serial)
elif scenario == "clock-back":         # the RTC reset to before the arming
    shift[0] = -86400
elif scenario == "tampered":           # one header byte of the record flipped
    data = bytearray(open(record_file, "rb").read())
    data[4 + 20] ^= 0x01
    os.remove(record_file)
    open(record_file, "wb").write(bytes(data))
    os.chmod(record_file, 0o600)
elif scenario == "foreign":            # another machine's record, under a key of its own
    from keyhandoff import record as record_format
    now = int(time.time())
    other = record_format.HandoffRecord(
        channel=record_format.RecordChannel[channel.record_channel], created=now,
        not_after=now + 600,
        boots_left=1, boot_id=uuid.uuid4(), entries=(record_format.Entry(
            uuid.UUID(vols[0]), record_format.EntryKind.ONETIME_KEY,
            Secret(bytearray(os.urandom(32)))),))
    with record_format.new_record_key() as key:
        blob = record_format.seal(other, key)
    attributes = open(record_file, "rb").read()[:4] if name == "efi" else b""
    os.remove(record_file)
    open(record_file, "wb").write(attributes + blob)
    os.chmod(record_file, 0o600)

if scenario != "disarm":
    r = update.restore(volumes=images, host=host)
    out["restore"] = {"channel": r.channel, "restored": sorted(r.restored),
                      "refused": r.refused is not None,
                      "opens": [opens_with_cache(i, v) for i, v in zip(images, vols)],
                      "slots": slots()}
    f = update.finish(host=host)
    out["finish"] = {"login": f.login, "slots": slots(),
                     "cached": [opens_with_cache(i, v) for i, v in zip(images, vols)]}
out["after"] = {"armed": update.status(host=host)["armed"], "slots": slots(), "keys": ours(),
                "record": record_held()}
update.disarm(quiet=True, volumes=images, host=host)
cache.forget_all()
print(json.dumps(out))
"""


def _run(tmp_path, name: str, scenario: str, count: int = 1) -> tuple[dict, list, list]:
    args: list[object] = [name, tmp_path, scenario, RECORDS[name] or "-"]
    images, passphrases = [], []
    for i in range(count):
        pw = make(f"contract-{name}-{i}")
        img = format_image(tmp_path / f"v{i}.img", pw)
        pw_file = tmp_path / f"pw{i}"
        pw_file.write_bytes(pw)
        args += [img, pw_file]
        images.append(img)
        passphrases.append(pw)
    before = [metadata(img)["keyslots"] for img in images]
    out, _proc, _efivars = run_in_scratch_efivars(SCENARIO, tmp_path, *args)
    for i in range(count):
        (tmp_path / f"pw{i}").unlink()
    # whatever happened, every volume is as it was: same keyslots, the person's passphrase opens
    assert [metadata(img)["keyslots"] for img in images] == before
    assert all(opens(img, pw) for img, pw in zip(images, passphrases, strict=True))
    return out, images, passphrases


def _nothing_left(out: dict) -> None:
    assert out["after"] == {"armed": False, "slots": 0, "keys": [], "record": False}


def test_every_channel_has_a_bench():
    assert set(RECORDS) == set(channels.REGISTRY)
    for name, channel in channels.REGISTRY.items():
        assert channel.name == name
        assert channel.reboot in ("soft", "full", "kexec")
    assert len({c.reboot for c in channels.REGISTRY.values()}) == len(channels.REGISTRY)


@pytest.mark.parametrize("name", CHANNELS)
def test_arm_restore_finish_round_trip(tmp_path, cache, name):
    out, images, _pws = _run(tmp_path, name, "round-trip", count=2)
    vols = sorted(uuid_of(i) for i in images)
    assert out["arm"] == [name, [True, True]]
    assert out["record_armed"] is (RECORDS[name] is not None)
    assert out["restore"]["channel"] == name
    assert out["restore"]["restored"] == vols
    assert out["restore"]["refused"] is False
    assert out["restore"]["opens"] == [True, True]  # what the agent will answer opens each
    assert out["finish"]["cached"] == [False, False]  # used, then gone
    _nothing_left(out)


@pytest.mark.parametrize("name", CHANNELS)
def test_arming_costs_one_pbkdf_per_volume(tmp_path, cache, name):
    out, _images, _pws = _run(tmp_path, name, "round-trip", count=2)
    # the person's keyslot of each volume opened once (both are keyslot 0), nothing else
    assert out["opened"] == ["Trying to open LUKS2 keyslot 0."] * 2


@pytest.mark.parametrize("name", CHANNELS)
def test_a_restore_in_the_arming_boot_leaves_the_handoff_for_the_next(tmp_path, cache, name):
    out, images, _pws = _run(tmp_path, name, "same-boot")
    restored, slots, armed, record = out["same"]
    assert restored == []
    assert armed is True
    assert record is (RECORDS[name] is not None)
    assert slots == (0 if RECORDS[name] is None else 1)  # its keyslot waits for the next boot
    assert out["restore"]["restored"] == [uuid_of(images[0])]  # the next boot still has it
    assert out["restore"]["opens"] == [True]
    _nothing_left(out)


@pytest.mark.parametrize("name", CHANNELS)
def test_a_late_boot_gets_nothing_and_nothing_stays(tmp_path, cache, name):
    out, _images, _pws = _run(tmp_path, name, "late")
    assert out["restore"]["restored"] == []
    assert out["restore"]["opens"] == [False]  # the person types the passphrase
    assert out["restore"]["slots"] == 0        # every one-time keyslot destroyed at once
    _nothing_left(out)


@pytest.mark.parametrize("name", CHANNELS)
def test_disarm_leaves_nothing(tmp_path, cache, name):
    out, _images, _pws = _run(tmp_path, name, "disarm")
    assert out["disarm"]["keyslots"] == (0 if RECORDS[name] is None else 1)
    assert out["disarm"]["records"] == (0 if RECORDS[name] is None else 1)
    _nothing_left(out)


RECORD_CHANNELS = [n for n in CHANNELS if RECORDS[n] is not None]


@pytest.mark.parametrize("fault", ["clock-back", "tampered", "foreign"])
@pytest.mark.parametrize("name", RECORD_CHANNELS)
def test_a_bad_record_is_refused_and_wiped(tmp_path, cache, name, fault):
    out, _images, _pws = _run(tmp_path, name, fault)
    assert out["restore"]["refused"] is True
    assert out["restore"]["restored"] == []
    assert out["restore"]["opens"] == [False]
    assert out["restore"]["slots"] == 0
    _nothing_left(out)


def test_the_record_channels_are_the_ones_that_lose_the_keyring():
    # A channel whose reboot keeps our keyring needs no record; one that loses it must
    # keep one somewhere, or nothing could reach the next boot.
    for name, channel in channels.REGISTRY.items():
        assert (RECORDS[name] is None) is channel.keeps_keyring, name
