"""The ``kexec`` channel on the host: its refusals, a failed load undone, and the restore
side of the record the initramfs moves to /run/keyhandoff (here a scratch path, through the
``Host``).  Loading a kernel and booting it is the VM's ``kexec`` scenario: this host's
kernel has no kexec; the channel contract (test_channel_contract.py) runs the channel's
round trip on a bench kernel.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from support.luks_images import format_image, metadata, uuid_of
from support.onetime_images import arm_image, seal
from support.passphrases import make

from keyhandoff import channels, kexec, keyring, names, onetime, record, update
from keyhandoff.cache import PassphraseCache
from keyhandoff.chain import Chain
from keyhandoff.chain import load as load_chain
from keyhandoff.errors import ChannelUnavailable, InvalidArgument, KexecError
from keyhandoff.host import Host
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

pytestmark = pytest.mark.arms


def _host(tmp_path: Path) -> Host:
    (tmp_path / "boot_id").write_text(str(uuid.uuid4()))
    return Host(boot_id_path=str(tmp_path / "boot_id"),
                kexec_record_path=str(tmp_path / "run" / "kexec-record"),
                kexec_mark_path=str(tmp_path / "run" / "kexec-loaded"))


def _onetime_slots(img: Path) -> int:
    with LuksHeader.open(str(img)) as header:
        return len(onetime.slots(header))


def _never_ask(*_args: object) -> None:
    raise AssertionError("asked for a passphrase")


def test_the_registry_restores_kexec_records_through_efis_restore():
    assert channels.for_reboot("kexec").name == "kexec"
    assert [c.name for c in channels.cold()] == ["efi"]


def test_arming_where_kexec_is_impossible_is_refused_before_asking(tmp_path, cache):
    img = format_image(tmp_path / "v.img", make("kexec-refused"))
    state = kexec.state()
    if state.possible:  # a host with kexec refuses only for a missing kernel image
        pytest.skip("this host can kexec: the refusal is shown by a scratch root in "
                    "tests/unit/test_kexec.py")
    with pytest.raises(ChannelUnavailable) as info:
        update.arm(reboot="kexec", ttl=timedelta(minutes=5), volumes=[str(img)],
                   ask=_never_ask)
    assert str(info.value) == f"cannot carry a record across kexec: {state.reason}"
    assert _onetime_slots(img) == 0
    assert update.channel_availability()["kexec"] == {
        "reboot": "kexec", "available": False, "detail": state.reason}


def test_a_kernel_is_named_for_kexec_only(tmp_path, cache):
    image = tmp_path / "vmlinuz-x"
    image.write_bytes(b"MZ")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd")
    kernel = kexec.named_kernel(str(image), str(initrd), "ro")
    with pytest.raises(InvalidArgument, match="only for"):
        update.arm(reboot="full", ttl=timedelta(minutes=5), kernel=kernel, ask=None)


def test_a_failed_load_leaves_no_keyslot_no_chain_and_nothing_loaded(tmp_path, cache):
    """The real kexec_file_load fails here (no kexec on this host, or no kernel in "MZ")."""
    pw = make("kexec-failed-load")
    img = format_image(tmp_path / "v.img", pw)
    before = metadata(img)["keyslots"]
    vol = uuid_of(img)
    image = tmp_path / "vmlinuz-x"
    image.write_bytes(b"MZ not a kernel")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd")
    host = _host(tmp_path)
    work = channels.Work(cache, host, lambda _msg: None,
                         kexec.named_kernel(str(image), str(initrd), "ro"))
    target = update.targets([str(img)], host=host)[0]
    chain = Chain(channel="kexec", reboot="kexec", not_after=host.now() + 300,
                         boots_left=1, login=False, volumes=(target,))
    channel = channels.REGISTRY["kexec"]
    with pytest.raises(KexecError):
        channel.arm(work, chain, [target], {vol: (Secret.passphrase(pw), "cache")})
    assert metadata(img)["keyslots"] == before  # the one-time keyslot made is destroyed again
    assert _onetime_slots(img) == 0
    assert load_chain(cache) is None
    assert not os.path.exists(host.kexec_mark_path)


# --- restore: the record the initramfs moved out of the loaded segment -----------------------


def _armed_record(tmp_path: Path, channel: record.RecordChannel = record.RecordChannel.KEXEC,
                  mode: int = 0o400) -> tuple[Host, Path, str]:
    host = _host(tmp_path)
    with record.new_record_key() as rk:
        armed = arm_image(tmp_path / "v.img", rk)
        with armed.key:
            blob = seal([armed.entry()], rk, channel=channel)
    path = Path(host.kexec_record_path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(blob)
    path.chmod(mode)
    return host, armed.path, str(armed.volume)


def test_a_kexec_record_is_taken_restored_and_finished(tmp_path, cache):
    host, img, vol = _armed_record(tmp_path)
    report = update.restore(volumes=[str(img)], host=host)
    assert (report.channel, report.restored, report.refused) == ("kexec", (vol,), None)
    assert not os.path.exists(host.kexec_record_path)  # removed before it was opened
    chain = load_chain(cache)
    assert chain is not None
    assert (chain.channel, chain.reboot, chain.boots_left) == ("kexec", "kexec", 0)
    assert [e.volume for e in cache.onetime_entries()] == [vol]  # what the agent answers
    assert update.finish(host=host).keyslots_destroyed == 1
    assert _onetime_slots(img) == 0
    assert update.status(host=host) == {"armed": False}


def test_a_kexec_record_the_plugin_published_is_restored_as_kexec(tmp_path, cache):
    host, img, vol = _armed_record(tmp_path)
    path = Path(host.kexec_record_path)
    blob = path.read_bytes()
    path.unlink()  # the token plugin took it: published in our keyring, then unlinked
    serial = keyring.add("user", names.RECORD_BLOB_KEY, Secret(bytearray(blob)), keyring.THREAD)
    try:
        keyring.set_perm(serial, names.KEY_PERM)
        keyring.set_timeout(serial, 60)
        keyring.link(serial, cache.keyring_serial)
    finally:
        keyring.unlink(serial, keyring.THREAD)
    report = update.restore(volumes=[str(img)], host=host)
    assert (report.channel, report.restored) == ("kexec", (vol,))
    update.finish(host=host)


@pytest.mark.parametrize("mode", [0o440, 0o404, 0o600 | 0o020])
def test_a_kexec_record_others_could_touch_is_refused_and_left(tmp_path, cache, mode):
    host, img, _vol = _armed_record(tmp_path, mode=mode)
    report = update.restore(volumes=[str(img)], host=host)
    assert report.restored == ()
    assert report.refused is not None
    assert "is not root's private file of a record's size" in report.refused
    assert os.path.exists(host.kexec_record_path)  # left for someone to look at
    assert _onetime_slots(img) == 0  # no valid record claims the keyslot: swept


def test_a_link_in_place_of_the_kexec_record_is_not_followed(tmp_path, cache):
    host, img, _vol = _armed_record(tmp_path)
    real = Path(host.kexec_record_path)
    moved = real.with_name("elsewhere")
    real.rename(moved)
    real.symlink_to(moved)
    report = update.restore(volumes=[str(img)], host=host)
    assert report.restored == ()
    assert report.refused is not None
    assert "cannot be opened, so it is not used" in report.refused
    assert moved.exists()


def test_an_efi_record_in_the_kexec_file_is_refused_as_foreign(tmp_path, cache):
    host, img, _vol = _armed_record(tmp_path, channel=record.RecordChannel.EFI)
    report = update.restore(volumes=[str(img)], host=host)
    assert report.restored == ()
    assert report.channel == "kexec"
    assert report.refused is not None
    assert "sealed for channel EFI, found where only KEXEC records go" in report.refused
    assert not os.path.exists(host.kexec_record_path)  # taken, so never tried twice
    assert _onetime_slots(img) == 0
    assert PassphraseCache().onetime_entries() == []
