"""The default ``arm`` (no volume named) over a real crypttab in a scratch Host.

Entries that are ``noauto``, of another type than LUKS, without a LUKS header, or not
plugged in (also ``nofail`` ones) are skipped with one line each and do not stop the
others; ``header=`` is honoured (the detached header is where the UUID is read, the
passphrase verified and the keyring channel's checks made).  Real LUKS2 image files.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from support.luks_images import MIB, format_image, uuid_of
from support.passphrases import make

from keyhandoff import update
from keyhandoff.host import Host
from keyhandoff.secret import Secret

pytestmark = pytest.mark.arms


def test_default_arm_skips_what_it_cannot_arm_and_honours_header(tmp_path, cache):
    pw = make("crypttab")
    good = format_image(tmp_path / "good.img", pw)
    later = format_image(tmp_path / "later.img", pw)
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MIB))
    header = tmp_path / "detached.hdr"
    data = format_image(tmp_path / "data.img", pw, options=("--header", str(header)),
                        size=32 * MIB)
    gone = str(uuid.uuid4())
    tab = tmp_path / "crypttab"
    tab.write_text(
        f"good {good} none luks\n"
        f"later {later} none luks,noauto\n"
        f"zeros {zeros} none luks\n"
        f"plainvol {zeros} none plain,cipher=aes-xts-plain64,size=256\n"
        f"gone UUID={gone} none luks,nofail\n"
        f"detached {data} none luks,header={header}\n"
    )
    host = Host(crypttab_path=str(tab))
    for image in (good, header):
        cache.put(uuid_of(image), Secret.passphrase(pw), timeout=120)
    said: list[str] = []
    report = update.arm(reboot="soft", ttl=timedelta(minutes=5), ask=None, host=host,
                        progress=said.append)
    by_name = {v.name: v for v in report.volumes}
    assert [v.name for v in report.volumes if v.armed] == ["good", "detached"]
    assert by_name["detached"].uuid == uuid_of(header).lower()
    assert [s for s in said if s.startswith("skipping ")] == [
        "skipping later: noauto: the boot does not open it",
        f"skipping zeros: not LUKS: {zeros} has no LUKS header",
        "skipping plainvol: not LUKS (plain)",
        f"skipping gone: not plugged in (nofail): /dev/disk/by-uuid/{gone} does not exist",
    ]
    assert [(v.name, v.armed) for v in report.volumes if not v.armed] == [
        ("later", False), ("zeros", False), ("plainvol", False), ("gone", False)]
    assert "  gone: skipped: not plugged in (nofail)" in report.summary()
    # by name, the detached header is what --volume resolves to
    target = update.resolve_volume("detached", need_header=True, host=host)
    assert (target.uuid, target.path) == (uuid_of(header).lower(), str(header))


def test_default_arm_with_every_entry_skipped_says_so(tmp_path, cache):
    tab = tmp_path / "crypttab"
    tab.write_text(f"gone UUID={uuid.uuid4()} none luks\n")
    with pytest.raises(update.ArmRefused, match=r"skipped: gone\)$"):
        update.arm(reboot="soft", ttl=timedelta(minutes=5), ask=None,
                   host=Host(crypttab_path=str(tab)))
