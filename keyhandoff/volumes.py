"""LUKS volumes on this machine: discovery and monitoring through udev, source resolution.

Discovery and monitoring read udev's database and event stream (pyudev), so they see
what udevd has probed: with no udevd running (containers, this project's build machines)
:func:`enumerate_luks` finds nothing and :func:`monitor` refuses with
:class:`UdevUnavailable` instead of returning a socket that would never fire.

:func:`resolve_source` maps a crypttab source to the volume's LUKS UUID.  Whenever a
device or file is there it reads the LUKS header itself (libcryptsetup, header only, no
PBKDF), so a ``by-uuid`` link that points at something else cannot mislead it.

:func:`prompt_volume` is the agent's stricter form for the source in an ask file's
``Id=``: the path must exist, be a block device or an image file, and its LUKS header's
UUID is the volume's identity; nothing is taken from the name.  It reads the header with
:func:`luks_identity`, a hand-written reader of the few bytes that carry the identity (see
there why not libcryptsetup).
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

from keyhandoff.errors import (
    NoSuchDevice,
    NotLuks,
    UdevUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pyudev

# pyudev and libcryptsetup are imported where they are used: the agent imports this module
# at start-up, and an idle agent on a machine without udevd should not carry either.

__all__ = [
    "LuksIdentity",
    "UdevUnavailable",
    "Volume",
    "enumerate_luks",
    "luks_identity",
    "monitor",
    "parse_luks_identity",
    "prompt_volume",
    "resolve_source",
]

BY_UUID: Final = "/dev/disk/by-uuid/"

# libudev only delivers udev (post-rule) events when udevd runs; it checks this path too.
_UDEV_CONTROL: Final = Path("/run/udev/control")

_MAJ_MIN: Final = re.compile(r"/dev/block/(\d+):(\d+)")

#: A LUKS UUID as cryptsetup writes it (libuuid's uuid_unparse: lower case); upper case is
#: accepted and folded, as :class:`keyhandoff.luks.LuksHeader` does.  Nothing else is: no
#: braces, no ``urn:uuid:``, no missing dashes, ASCII only.
_UUID_TEXT: Final = re.compile(
    rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
)


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
        import pyudev  # see the module's imports

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
        import pyudev  # see the module's imports

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
    from keyhandoff.luks import LuksError, LuksHeader  # see the module's imports

    with LuksHeader.open(path) as header:
        try:
            # canonical lower case; LuksError(EINVAL) for what is not a UUID (libcryptsetup
            # hands out whatever the header holds), so no caller keys a cache entry or a
            # keyslot decision on it, and none crashes on it
            return header.uuid
        except LuksError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise NotLuks(errno.EINVAL, f"LUKS header of {path} has a malformed UUID") from None


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


# --- the volume's identity without libcryptsetup -------------------------------------------
#
# Why hand-written: the agent answers a prompt once it knows which volume the prompt's
# device holds, and that is all it needs from the header.  libcryptsetup (with OpenSSL,
# libdevmapper, json-c, libargon2 and libblkid behind it) grows a long-lived agent by
# several MiB for the rest of its life (issue #10, finding 18); verification, which does
# need it, runs in a short-lived child (keyhandoff.verifier).  The on-disk layout read here
# is the part both LUKS versions share (cryptsetup's docs/on-disk-format*.pdf, and
# libblkid's crypto_LUKS probe, which is what names /dev/disk/by-uuid/): magic
# ``LUKS\xba\xbe``, a big-endian u16 version at offset 6, the UUID as 40 NUL-padded
# bytes at offset 168.  LUKS2 also keeps a secondary binary header (magic
# ``SKUL\xba\xbe``) at the offset given by the primary's big-endian u64 ``hdr_size`` at
# offset 8.  Checksums are not verified (blkid does not either): a header that does not
# say one clear UUID is refused, and a person types.  tests/integration/test_volumes.py
# checks this reader against libcryptsetup on real LUKS1 and LUKS2 images.

LUKS_MAGIC: Final = b"LUKS\xba\xbe"
LUKS2_SECONDARY_MAGIC: Final = b"SKUL\xba\xbe"
_VERSION_AT: Final = 6
_HDR_SIZE_AT: Final = 8
_UUID_AT: Final = 168
_UUID_FIELD: Final = 40
_HEADER_READ: Final = 512  # the binary header's fields all lie in its first 512 bytes
#: The LUKS2 header area sizes cryptsetup allows (16 KiB .. 4 MiB, powers of two).
_LUKS2_HDR_SIZES: Final = frozenset(16384 << k for k in range(9))


@dataclass(frozen=True, slots=True)
class LuksIdentity:
    """What a LUKS binary header says it is: version (1 or 2) and UUID (lower case)."""

    version: int
    uuid: str


def parse_luks_identity(data: bytes, *, magic: bytes = LUKS_MAGIC) -> LuksIdentity:
    """Read version and UUID from the first bytes of a LUKS binary header (pure).

    Raises :class:`~keyhandoff.errors.NotLuks` for anything but magic ``magic``, version
    1 or 2 (2 only for the LUKS2 secondary magic) and a UUID of exactly 36 ASCII
    characters ``8-4-4-4-12`` hex digits followed by NUL bytes only.
    """
    if len(data) < _UUID_AT + _UUID_FIELD or data[: len(magic)] != magic:
        raise NotLuks(errno.EINVAL, "no LUKS header")
    version = int.from_bytes(data[_VERSION_AT : _VERSION_AT + 2], "big")
    if version not in ((2,) if magic == LUKS2_SECONDARY_MAGIC else (1, 2)):
        raise NotLuks(errno.EINVAL, f"unknown LUKS version {version}")
    field = data[_UUID_AT : _UUID_AT + _UUID_FIELD]
    text, padding = field[:36], field[36:]
    if padding.strip(b"\0") or not _UUID_TEXT.fullmatch(text):
        raise NotLuks(errno.EINVAL, "LUKS header has a malformed UUID")
    return LuksIdentity(version, text.decode("ascii").lower())


def _read_at(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) < size:
        raise NotLuks(errno.EINVAL, "too short for a LUKS header")
    return data


def luks_identity(path: str) -> LuksIdentity:
    """The identity in the LUKS header of the block device or image file at ``path``.

    Follows symlinks (``/dev/disk/by-uuid/`` links are), opens nothing but block devices
    and regular files (checked before and after the open, on the same inode), reads two
    sectors at most.  A LUKS2 header whose secondary copy names another UUID is refused.
    Raises :class:`~keyhandoff.errors.NoSuchDevice` or :class:`~keyhandoff.errors.NotLuks`.
    """
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise NoSuchDevice(errno.ENOENT, f"{path} does not exist") from None
    if not (stat.S_ISBLK(before.st_mode) or stat.S_ISREG(before.st_mode)):
        # checked before opening: opening a FIFO or a tty can block or have side effects
        raise NoSuchDevice(errno.ENOTBLK, f"{path} is not a block device or image file")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino, after.st_mode, after.st_rdev) != (
            before.st_dev, before.st_ino, before.st_mode, before.st_rdev,
        ):
            raise NoSuchDevice(errno.ENODEV, f"{path} changed while it was opened")
        primary = _read_at(fd, _HEADER_READ, 0)
        identity = parse_luks_identity(primary)
        if identity.version == 2:
            hdr_size = int.from_bytes(primary[_HDR_SIZE_AT : _HDR_SIZE_AT + 8], "big")
            if hdr_size not in _LUKS2_HDR_SIZES:
                raise NotLuks(errno.EINVAL, "LUKS2 header has an invalid header size")
            secondary = os.pread(fd, _HEADER_READ, hdr_size)
            if secondary[: len(LUKS2_SECONDARY_MAGIC)] == LUKS2_SECONDARY_MAGIC:
                other = parse_luks_identity(secondary, magic=LUKS2_SECONDARY_MAGIC)
                if other.uuid != identity.uuid:
                    raise NotLuks(errno.EINVAL, "LUKS2 primary and secondary headers name "
                                  "different UUIDs")
    finally:
        os.close(fd)
    return identity


def prompt_volume(source: str) -> str:
    """The LUKS UUID of the volume at ``source``, proved by the header found there.

    For the source of a ``cryptsetup:`` prompt, which systemd-cryptsetup has already
    opened: an absolute path to an existing block device or LUKS image file.  ``UUID=``
    and a ``/dev/disk/by-uuid/`` (or any) path that does not exist are refused with
    :class:`~keyhandoff.errors.NoSuchDevice`, whatever the name says (issue #10, finding
    9: a name proves nothing).  Raises :class:`~keyhandoff.errors.NotLuks` for a header
    that is not LUKS or says no clear UUID.
    """
    if not source.startswith("/"):
        raise NoSuchDevice(errno.ENOENT, "the prompt names no device path")
    return luks_identity(source).uuid
