"""keyhandoff.volumes: source resolution on image files and loop devices, udev discovery.

This machine has no udevd: no /dev/disk/by-uuid links, no /dev/block links, an empty udev
database.  The udev-dependent tests check both outcomes so they run (and can fail)
either way; the positive udev paths only run where udevd does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import uuid as _uuid
from pathlib import Path

import pytest
from support.luks_headers import set_header_uuid
from support.luks_images import MIB, format_image, loop_device, uuid_of
from support.passphrases import make

from keyhandoff.luks import LuksError, LuksHeader, NoSuchDevice, NotLuks
from keyhandoff.volumes import (
    LuksIdentity,
    UdevUnavailable,
    Volume,
    enumerate_luks,
    luks_identity,
    monitor,
    parse_luks_identity,
    prompt_volume,
    resolve_source,
)

UDEV_RUNNING = Path("/run/udev/control").exists()


@pytest.fixture
def loop_node(image):
    """``image`` (support.luks_images) attached read-only to a free loop device."""
    with loop_device(image, read_only=True) as node:
        yield node


def test_resolve_image_file(image):
    assert resolve_source(str(image)) == uuid_of(image).lower()


def test_resolve_missing_by_uuid_link_uses_the_name(image):
    # Upper case on purpose: the result is canonical lower case.
    source = "/dev/disk/by-uuid/" + uuid_of(image).upper()
    if os.path.lexists(source):
        pytest.skip("a real device has this UUID")  # cannot happen for a fresh random UUID
    assert resolve_source(source) == uuid_of(image).lower()
    assert resolve_source("UUID=" + uuid_of(image)) == uuid_of(image).lower()
    with pytest.raises(NoSuchDevice):
        resolve_source(source, require_header=True)


def test_resolve_by_uuid_name_must_be_a_uuid():
    with pytest.raises(NoSuchDevice) as info:
        resolve_source("/dev/disk/by-uuid/not-a-uuid")
    assert info.value.errno == errno.EINVAL


def test_resolve_device_node_and_block_number(loop_node, image):
    expected = uuid_of(image).lower()
    assert resolve_source(loop_node) == expected
    st = os.stat(loop_node)
    # /dev/block/MAJ:MIN is a udev link; without udev the kernel's name is used.
    assert resolve_source(f"/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}") == expected


def test_resolve_not_luks(tmp_path):
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1024 * 1024))
    with pytest.raises(NotLuks):
        resolve_source(str(plain))


def test_resolve_missing_or_odd_paths(tmp_path):
    with pytest.raises(NoSuchDevice):
        resolve_source(str(tmp_path / "absent"))
    with pytest.raises(NoSuchDevice):
        resolve_source(str(tmp_path))  # a directory
    with pytest.raises(NoSuchDevice):
        resolve_source("/dev/block/4095:1048575")  # no such device number
    with pytest.raises(NoSuchDevice):
        resolve_source("/dev/disk/by-uuid/" + str(_uuid.uuid4()), require_header=True)


def test_enumerate_luks(loop_node, image):
    volumes = enumerate_luks()
    assert isinstance(volumes, list)
    assert all(isinstance(v, Volume) for v in volumes)
    ours = [v for v in volumes if v.devnode == loop_node]
    if UDEV_RUNNING:
        # udevd probes a new loop device asynchronously; give it a moment to settle.
        with contextlib.suppress(FileNotFoundError, subprocess.CalledProcessError):
            subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)
        ours = [v for v in enumerate_luks() if v.devnode == loop_node]
        assert [v.uuid for v in ours] == [uuid_of(image).lower()]
    else:
        assert ours == []  # no udev database: nothing probed, and no crash


def test_monitor_needs_udevd():
    if UDEV_RUNNING:
        mon = monitor()
        # pyudev's fileno() is an int whatever happened: the check is that it is a socket
        assert stat.S_ISSOCK(os.fstat(mon.fileno()).st_mode)
        event = mon.poll(timeout=0)  # polled once: a second poll would read the next event
        assert event is None or event.subsystem == "block"
    else:
        with pytest.raises(UdevUnavailable, match="/run/udev/control"):
            monitor()


# --- the hand-written identity reader against libcryptsetup ---------------------------------

#: name -> (LUKS version, further luksFormat options)
FORMATS = {
    "luks1": ("luks1", ()),
    "luks2": ("luks2", ()),
    "luks2-64k-metadata": ("luks2", ("--luks2-metadata-size", "64k",
                                     "--luks2-keyslots-size", "4m")),
    "luks2-1m-metadata": ("luks2", ("--luks2-metadata-size", "1m",
                                    "--luks2-keyslots-size", "4m")),
    "luks2-label-4k-sectors": ("luks2", ("--label", "kh-data", "--subsystem", "kh",
                                         "--sector-size", "4096")),
    "luks2-given-upper-uuid": ("luks2", ("--uuid", "0F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F0")),
    "luks1-given-uuid": ("luks1", ("--uuid", "00000000-0000-4000-8000-000000000001")),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_identity_reader_agrees_with_libcryptsetup(tmp_path, name):
    luks, options = FORMATS[name]
    image = format_image(tmp_path / f"{name}.img", make("fmt"), luks=luks, options=options,
                         size=32 * MIB)
    with LuksHeader.open(image) as header:
        expected = LuksIdentity(header.luks_version, header.uuid)
    assert luks_identity(str(image)) == expected
    assert prompt_volume(str(image)) == expected.uuid == uuid_of(image).lower()
    assert resolve_source(str(image)) == expected.uuid


def test_identity_reader_on_a_detached_header_and_a_loop_device(tmp_path, loop_node, image):
    header_file = tmp_path / "detached.hdr"
    data = format_image(tmp_path / "data.img", make("fmt"), options=("--header", str(header_file)),
                        size=32 * MIB)
    with LuksHeader.open(header_file) as header:
        assert luks_identity(str(header_file)) == LuksIdentity(2, header.uuid)
    with pytest.raises(NotLuks):
        luks_identity(str(data))  # the data device of a detached header holds none
    with LuksHeader.open(loop_node) as header:
        assert luks_identity(loop_node) == LuksIdentity(2, header.uuid)
    assert prompt_volume(loop_node) == uuid_of(image).lower()


@pytest.mark.parametrize("luks", ["luks1", "luks2"])
@pytest.mark.parametrize("raw", [b"NOT-A-UUID", b"\xff\xfe" + b"a" * 34,
                                 b"{12345678-1234-1234-1234-123456789a}",
                                 b"12345678123412341234123456789abc",
                                 b"12345678-1234-1234-1234-123456789abc\0\0\0x",
                                 b"12345678-1234-1234-1234-123456789ab\xc3\xa9",
                                 b""])
def test_malformed_uuids_are_refused_where_libcryptsetup_hands_them_out(tmp_path, luks, raw):
    image = format_image(tmp_path / "bad.img", make("bad"), luks=luks)
    set_header_uuid(image, raw)
    c_string = raw.split(b"\0")[0]
    # libcryptsetup loads it; LuksHeader.uuid refuses what is not a canonical UUID
    with LuksHeader.open(image) as header:
        if c_string == b"12345678-1234-1234-1234-123456789abc":
            assert header.uuid == c_string.decode()
        else:
            with pytest.raises(LuksError, match="UUID"):
                header.uuid  # noqa: B018
    with pytest.raises(NotLuks, match="malformed UUID"):
        luks_identity(str(image))
    if c_string == b"12345678-1234-1234-1234-123456789abc":
        # libcryptsetup reads the field as a C string: bytes after the NUL go unseen
        assert resolve_source(str(image)) == c_string.decode()
    else:
        with pytest.raises(NotLuks):
            resolve_source(str(image))  # the libcryptsetup path refuses it too, no crash


def test_luks2_headers_naming_two_uuids_are_refused(tmp_path):
    image = format_image(tmp_path / "split.img", make("split"))
    set_header_uuid(image, str(_uuid.uuid4()).encode(), secondary=False)
    with pytest.raises(NotLuks, match="different UUIDs"):
        luks_identity(str(image))


def test_identity_parser_refusals():
    good = bytearray(512)
    good[:6] = b"LUKS\xba\xbe"
    good[6:8] = (2).to_bytes(2, "big")
    good[168:204] = b"12345678-1234-1234-1234-123456789abc"
    assert parse_luks_identity(bytes(good)) == LuksIdentity(
        2, "12345678-1234-1234-1234-123456789abc")
    for version in (0, 3, 0x100, 0xFFFF):
        bad = bytearray(good)
        bad[6:8] = version.to_bytes(2, "big")
        with pytest.raises(NotLuks, match="version"):
            parse_luks_identity(bytes(bad))
    with pytest.raises(NotLuks):
        parse_luks_identity(bytes(good[:200]))  # too short to hold the UUID
    with pytest.raises(NotLuks):
        parse_luks_identity(b"SKUL\xba\xbe" + bytes(good[6:]))  # secondary magic as primary
    secondary = b"SKUL\xba\xbe" + bytes(good[6:])
    assert parse_luks_identity(secondary, magic=b"SKUL\xba\xbe").uuid == good[168:204].decode()
    v1 = bytearray(secondary)
    v1[6:8] = (1).to_bytes(2, "big")
    with pytest.raises(NotLuks, match="version"):
        parse_luks_identity(bytes(v1), magic=b"SKUL\xba\xbe")


def test_prompt_volume_needs_an_existing_block_device_or_file(tmp_path, image):
    vid = uuid_of(image)
    for source in (f"UUID={vid}", f"/dev/disk/by-uuid/{vid}", vid, str(tmp_path),
                   "/dev/null", str(tmp_path / "absent.img")):
        with pytest.raises(NoSuchDevice):
            prompt_volume(source)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NoSuchDevice, match="not a block device"):
        prompt_volume(str(fifo))  # refused before it is opened: no hang
    link = tmp_path / "link"
    link.symlink_to(image)
    assert prompt_volume(str(link)) == vid.lower()  # a by-uuid link is a symlink
