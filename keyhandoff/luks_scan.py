"""Every LUKS header on this machine: what the one-time keyslot sweeps look at.

A one-time keyslot must be found and destroyed on whatever volume it was added to, also
when that volume is in no ``/etc/crypttab`` and the chain state that named it is gone.  So
the sweeps (:mod:`keyhandoff.update`) take the union of

* the paths they were given (crypttab sources, the chain's volumes, image files),
* the LUKS block devices in udev's database (:func:`keyhandoff.volumes.enumerate_luks`),
* every block device the kernel lists in ``/sys/class/block`` whose first bytes carry the
  LUKS magic, or whose LUKS2 secondary header is where libcryptsetup would look for it.

The sysfs probe is there because udev's database is not always there: early in boot,
in containers and on this project's build machines udevd does not run, and
:func:`~keyhandoff.volumes.enumerate_luks` then finds nothing.  The probe reads at most ten
6-byte blocks per device (O_NONBLOCK, read-only), skips empty devices (size 0: an
unattached loop device, a drive without a medium) and suspended device-mapper devices
(a read would hang).  Paths that name one device or file twice are given once.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING, Final

from keyhandoff.errors import KeyhandoffError
from keyhandoff.volumes import enumerate_luks

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["LUKS_MAGIC", "block_devices", "has_luks_magic", "luks_paths", "unique_paths"]

LUKS_MAGIC: Final = b"LUKS\xba\xbe"
#: A LUKS2 secondary header's magic; it sits at the primary header's size (16 KiB..4 MiB).
LUKS2_SECONDARY_MAGIC: Final = b"SKUL\xba\xbe"
_SECONDARY_OFFSETS: Final = tuple(0x4000 << n for n in range(9))

SYS_BLOCK: Final = "/sys/class/block"
DEV: Final = "/dev"


def has_luks_magic(path: str) -> bool:
    """Whether ``path`` starts with a LUKS header (or has a LUKS2 secondary one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        if os.pread(fd, len(LUKS_MAGIC), 0) == LUKS_MAGIC:
            return True
        return any(os.pread(fd, len(LUKS2_SECONDARY_MAGIC), offset) == LUKS2_SECONDARY_MAGIC
                   for offset in _SECONDARY_OFFSETS)
    except OSError:
        return False
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


def _devnode(sys_dir: str, dev_dir: str) -> str | None:
    """The /dev node of one /sys/class/block entry, checked against its device number."""
    try:
        number = _read(os.path.join(sys_dir, "dev"))
        if _read(os.path.join(sys_dir, "size")) == "0":
            return None
        with contextlib.suppress(FileNotFoundError):
            if _read(os.path.join(sys_dir, "dm", "suspended")) == "1":
                return None
        name = ""
        for line in _read(os.path.join(sys_dir, "uevent")).splitlines():
            key, _, value = line.partition("=")
            if key == "DEVNAME":
                name = value
        if not name or ".." in name.split("/"):
            return None
        node = os.path.join(dev_dir, name)
        st = os.stat(node)
        major, _, minor = number.partition(":")
    except (OSError, ValueError):
        return None
    if not stat.S_ISBLK(st.st_mode) or f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != \
            f"{int(major)}:{int(minor)}":
        return None
    return node


def block_devices(sys_block: str = SYS_BLOCK, dev_dir: str = DEV) -> list[str]:
    """Device nodes of every block device (partitions too) that carries a LUKS header."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    found = []
    for name in names:
        node = _devnode(os.path.join(sys_block, name), dev_dir)
        if node is not None and has_luks_magic(node):
            found.append(node)
    return found


#: udev's database; without it there is nothing to enumerate (and no need to load libudev).
UDEV_DATA: Final = "/run/udev/data"


def _udev_devices() -> list[str]:
    if not os.path.isdir(UDEV_DATA):
        return []
    try:
        return [v.devnode for v in enumerate_luks()]
    except (KeyhandoffError, ImportError, OSError):
        return []


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def unique_paths(paths: Iterable[str]) -> list[str]:
    """``paths`` in order, without a second path to a device or file already named.

    A path that does not exist is kept once (opening it will fail and be skipped).
    """
    seen: set[object] = set()
    out = []
    for path in paths:
        try:
            key: object = _identity(path)
        except (OSError, ValueError):
            key = ("missing", path)
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def luks_paths(extra: Iterable[str] = ()) -> list[str]:
    """``extra``, then every LUKS block device of the machine (udev's, then the probe's)."""
    return unique_paths([*extra, *_udev_devices(), *block_devices()])
