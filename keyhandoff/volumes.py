"""LUKS volumes on this machine: discovery and monitoring through udev, source resolution.

Discovery and monitoring read udev's database and event stream (pyudev), so they see
what udevd has probed: with no udevd running (containers, this project's build machines)
:func:`enumerate_luks` finds nothing and :func:`monitor` refuses with
:class:`UdevUnavailable` instead of returning a socket that would never fire.

:func:`resolve_source` maps the source path systemd-cryptsetup names in an ask file's
``Id=`` (or a crypttab source) to the volume's LUKS UUID.  Whenever a device or file is
there it reads the LUKS header itself (libcryptsetup, header only, no PBKDF), so a
``by-uuid`` link that points at something else cannot mislead it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from keyhandoff.errors import KeyhandoffError, NoSuchDevice

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pyudev

# pyudev and libcryptsetup are imported where they are used: the agent imports this module
# at start-up, and an idle agent on a machine without udevd should not carry either.

__all__ = [
    "UdevUnavailable",
    "Volume",
    "enumerate_luks",
    "monitor",
    "resolve_source",
]

BY_UUID: Final = "/dev/disk/by-uuid/"

# libudev only delivers udev (post-rule) events when udevd runs; it checks this path too.
_UDEV_CONTROL: Final = Path("/run/udev/control")

_MAJ_MIN: Final = re.compile(r"/dev/block/(\d+):(\d+)")


class UdevUnavailable(KeyhandoffError):
    """libudev cannot be used, or udevd is not running (no device events will come)."""


@dataclass(frozen=True, slots=True)
class Volume:
    """A block device udev identified as LUKS (``ID_FS_TYPE=crypto_LUKS``)."""

    uuid: str
    """The LUKS UUID in lower case."""
    devnode: str
    """The device node, e.g. ``/dev/nvme0n1p3``."""
    by_uuid_links: tuple[str, ...]
    """Its ``/dev/disk/by-uuid/`` symlinks (what systemd-cryptsetup usually names)."""


def _context(context: pyudev.Context | None) -> pyudev.Context:
    if context is not None:
        return context
    try:
        import pyudev  # noqa: PLC0415  # see the module's imports

        return pyudev.Context()
    except ImportError as exc:  # pyudev raises ImportError when libudev cannot be loaded
        raise UdevUnavailable(f"libudev cannot be loaded: {exc}") from exc


def enumerate_luks(context: pyudev.Context | None = None) -> list[Volume]:
    """The LUKS block devices in udev's database, sorted by UUID.

    Empty when udevd never probed the devices (no udev database), which is not an error.
    """
    found: list[Volume] = []
    devices: Iterable[pyudev.Device] = _context(context).list_devices(
        subsystem="block", ID_FS_TYPE="crypto_LUKS"
    )
    for device in devices:
        raw_uuid = device.properties.get("ID_FS_UUID")
        if not raw_uuid or device.device_node is None:
            continue
        links = tuple(sorted(link for link in device.device_links if link.startswith(BY_UUID)))
        found.append(Volume(uuid=raw_uuid.lower(), devnode=device.device_node, by_uuid_links=links))
    return sorted(found, key=lambda volume: (volume.uuid, volume.devnode))


def monitor(context: pyudev.Context | None = None) -> pyudev.Monitor:
    """A started udev monitor for block devices; plug ``fileno()`` into the event loop.

    Read it non-blocking with ``monitor.poll(timeout=0)`` when the fd is readable.  Raises
    :class:`UdevUnavailable` when udevd is not running: libudev would hand out a socket
    that never receives anything, and the agent would wait for devices forever.
    """
    if not _UDEV_CONTROL.exists():
        raise UdevUnavailable(
            f"udevd is not running ({_UDEV_CONTROL} is missing): no block device events"
        )
    ctx = _context(context)
    try:
        import pyudev  # noqa: PLC0415  # see the module's imports

        mon = pyudev.Monitor.from_netlink(ctx)
        mon.filter_by("block")
        mon.start()
    except OSError as exc:
        raise UdevUnavailable(f"cannot listen to udev events: {exc.strerror}") from exc
    return mon


def _parse_uuid(text: str) -> str:
    try:
        return str(_uuid.UUID(text))  # canonical lower-case form
    except ValueError:
        raise NoSuchDevice(errno.EINVAL, f"{text!r} is not a UUID") from None


def _header_uuid(path: str) -> str:
    from keyhandoff.luks import LuksHeader  # noqa: PLC0415  # see the module's imports

    with LuksHeader.open(path) as header:
        return header.uuid


def resolve_source(source: str, *, require_header: bool = False) -> str:
    """The LUKS UUID (lower case) of a crypttab/systemd-cryptsetup source.

    Accepts ``/dev/disk/by-uuid/<UUID>``, ``UUID=<UUID>``, ``/dev/block/MAJ:MIN``, a device
    node, or a LUKS image file.  When the path exists the header is read and its UUID
    returned (:class:`~keyhandoff.luks.NotLuks` if it is not LUKS).

    A ``by-uuid`` path that does not exist (device not there yet, or no udev to make the
    link) and ``UUID=`` resolve to the UUID in the name, unverified: the name is the
    volume's identity as systemd knows it.  ``require_header=True`` refuses that and
    raises :class:`~keyhandoff.luks.NoSuchDevice`.  ``/dev/block/MAJ:MIN`` without the
    udev link falls back to the kernel's name for that number (sysfs).
    """
    if source.startswith("UUID="):
        if require_header:
            raise NoSuchDevice(errno.ENOENT, f"{source}: no device path to read")
        return _parse_uuid(source.removeprefix("UUID="))
    path = source
    if source.startswith(BY_UUID) and not os.path.lexists(source):
        name = source.removeprefix(BY_UUID)
        if require_header:
            raise NoSuchDevice(errno.ENOENT, f"{source} does not exist")
        return _parse_uuid(name)
    match = _MAJ_MIN.fullmatch(source)
    if match and not os.path.lexists(source):
        path = _devnode_of(int(match[1]), int(match[2]))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NoSuchDevice(errno.ENOENT, f"{source} does not exist") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise NoSuchDevice(errno.ENOTBLK, f"{source} is not a block device or image file")
    return _header_uuid(path)


def _devnode_of(major: int, minor: int) -> str:
    """``/dev/<DEVNAME>`` for a block device number, from sysfs (no udev needed)."""
    uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent")
    try:
        text = uevent.read_text()
    except FileNotFoundError:
        raise NoSuchDevice(errno.ENODEV, f"no block device {major}:{minor}") from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value and ".." not in value:
            return f"/dev/{value}"
    raise NoSuchDevice(errno.ENODEV, f"block device {major}:{minor} has no device name")
