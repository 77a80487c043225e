"""keyhandoff.volumes: source resolution on image files and loop devices, udev discovery.

This machine has no udevd: no /dev/disk/by-uuid links, no /dev/block links, an empty udev
database.  The udev-dependent tests check both outcomes so they run (and can fail)
either way; the positive udev paths only run where udevd does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid as _uuid
from pathlib import Path

import pytest
from conftest import require, require_binary
from luks_images import format_image, uuid_of
from passphrases import make

from keyhandoff.luks import NoSuchDevice, NotLuks
from keyhandoff.volumes import (
    UdevUnavailable,
    Volume,
    enumerate_luks,
    monitor,
    resolve_source,
)

UDEV_RUNNING = Path("/run/udev/control").exists()


@pytest.fixture
def image(tmp_path):
    return format_image(tmp_path / "luks2.img", make("person"))


@pytest.fixture
def loop_device(image):
    """The image attached to a free loop device (root and /dev/loop-control needed)."""
    losetup = require_binary("losetup", "apt-get install mount")
    require(
        os.geteuid() == 0 and Path("/dev/loop-control").exists(),
        "root with loop devices",
        "run the tests as root on a kernel with CONFIG_BLK_DEV_LOOP",
    )
    node = subprocess.run(
        [losetup, "--find", "--show", "--read-only", str(image)],
        capture_output=True, check=True, text=True,
    ).stdout.strip()
    try:
        yield node
    finally:
        subprocess.run([losetup, "--detach", node], check=False)


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


def test_resolve_device_node_and_block_number(loop_device, image):
    expected = uuid_of(image).lower()
    assert resolve_source(loop_device) == expected
    st = os.stat(loop_device)
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


def test_enumerate_luks(loop_device, image):
    volumes = enumerate_luks()
    assert isinstance(volumes, list)
    assert all(isinstance(v, Volume) for v in volumes)
    ours = [v for v in volumes if v.devnode == loop_device]
    if UDEV_RUNNING:
        # udevd probes a new loop device asynchronously; give it a moment to settle.
        with contextlib.suppress(FileNotFoundError, subprocess.CalledProcessError):
            subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)
        ours = [v for v in enumerate_luks() if v.devnode == loop_device]
        assert [v.uuid for v in ours] == [uuid_of(image).lower()]
    else:
        assert ours == []  # no udev database: nothing probed, and no crash


def test_monitor_needs_udevd():
    if UDEV_RUNNING:
        mon = monitor()
        assert mon.fileno() >= 0
        assert mon.poll(timeout=0) is None or mon.poll(timeout=0).subsystem == "block"
    else:
        with pytest.raises(UdevUnavailable, match="/run/udev/control"):
            monitor()
