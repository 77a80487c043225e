"""A writer of cpio "newc" archives, the format the kernel unpacks from an initramfs.

The kexec channel appends a small archive of its own to the distribution's initrd; the
kernel unpacks both into the initramfs root.  The format is the kernel's
``Documentation/driver-api/early-userspace/buffer-format.rst``: per entry a 110-byte
header of ASCII fields (magic ``070701``, then 13 fields of 8 hex digits: inode, mode,
uid, gid, nlink, mtime, file size, device and rdev major/minor, name size, check), the
NUL-terminated name, zeros to a multiple of 4 (header and name together), the data, zeros
to a multiple of 4; a ``TRAILER!!!`` entry ends the archive.

Only regular files and directories, owned by root (uid and gid 0), mtime 0, so the same
input gives the same bytes.  What the kernel's unpacker (``init/initramfs.c``) does with
them decides what is refused here, with an :class:`~keyhandoff.errors.InvalidArchiveEntry`
that names the entry:

* absolute names, ``..`` / ``.`` / empty components: names are relative to the initramfs
  root and canonical, so no entry lands outside its directory or twice under two spellings;
* a NUL in a name (it would end the name early) and the name ``TRAILER!!!`` (it would end
  the archive early);
* a name of more than PATH_MAX - 1 bytes: ``do_header()`` skips such an entry silently;
  a component of more than NAME_MAX bytes, which no file system creates;
* a size that does not fit 8 hex digits.

The data of a file may be a :class:`~keyhandoff.secret.Secret`: :meth:`Archive.write`
passes a view of the Secret's own buffer straight to ``write(2)`` on a descriptor (a
memfd), so no immutable ``bytes`` copy of it is ever made; :meth:`Archive.to_bytes` refuses
an archive holding one.  The :class:`Archive` keeps references to the Secrets it was given;
their owner still wipes them.

Behaviour of the kernel's unpacker worth knowing when appending to another archive
(``do_name()``): a regular file replaces a file of the same name unpacked before it; a
directory entry makes the kernel chown and chmod an existing directory of that name, so an
implied parent ``tmp`` would reset the distribution's ``/tmp`` from 1777 to 0755.  Put
extra files under a directory of your own, or pass ``parents=False`` when the earlier
archive creates the directories.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from keyhandoff.errors import InvalidArchiveEntry
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["FIELD_MAX", "MAGIC", "NAME_MAX", "PATH_MAX", "TRAILER", "Archive",
           "InvalidArchiveEntry"]

#: The "newc" magic (no checksum; "070702" would be the "crc" variant).
MAGIC: Final = b"070701"
#: The largest value of a header field: 8 hex digits.
FIELD_MAX: Final = 0xFFFF_FFFF
#: The kernel's PATH_MAX: ``do_header()`` skips an entry whose name and NUL exceed it.
PATH_MAX: Final = 4096
#: The longest name component a Linux file system creates.
NAME_MAX: Final = 255
#: The name of the end-of-archive entry.
TRAILER: Final = "TRAILER!!!"

_HEADER_SIZE: Final = 110
_REFUSED_COMPONENTS: Final = (
    ("..", "has a '..' component"),
    (".", "has a '.' component: give the canonical name"),
    ("", "has an empty component (a doubled or trailing '/')"),
)
_DIR_MODE: Final = stat.S_IFDIR | 0o755


@dataclass(frozen=True, slots=True)
class _Entry:
    name: bytes
    mode: int
    data: bytes | Secret = field(repr=False)


def _shown(name: str) -> str:
    """The name for a message: quoted, cut to a readable length."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _encoded_name(name: object) -> bytes:
    """The name's bytes after every check a name must pass, else the refusal."""
    if not isinstance(name, str):
        raise TypeError(f"an archive entry name is a str, not {type(name).__name__}")
    if "\0" in name:
        raise InvalidArchiveEntry(f"entry name {_shown(name)} contains a NUL byte")
    if not name:
        raise InvalidArchiveEntry("an archive entry name is empty")
    if name.startswith("/"):
        raise InvalidArchiveEntry(
            f"entry name {_shown(name)} is absolute: names are relative to the initramfs root")
    parts = name.split("/")
    for part, why in _REFUSED_COMPONENTS:
        if part in parts:
            raise InvalidArchiveEntry(f"entry name {_shown(name)} {why}")
    if name == TRAILER:
        raise InvalidArchiveEntry(f"entry name {_shown(name)} is the end-of-archive marker")
    encoded = name.encode("utf-8", "surrogateescape")  # os.fsencode, without the locale
    if len(encoded) + 1 > PATH_MAX:
        raise InvalidArchiveEntry(
            f"entry name {_shown(name)} is {len(encoded)} bytes long: the kernel skips names "
            f"longer than {PATH_MAX - 1} bytes")
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in parts):
        raise InvalidArchiveEntry(
            f"entry name {_shown(name)} has a component longer than {NAME_MAX} bytes")
    return encoded


def _entry_mode(name: str, mode: object, data: object) -> int:
    """The header's mode for ``name``: a regular file's or a directory's, else the refusal."""
    if not isinstance(mode, int) or isinstance(mode, bool) or mode < 0:
        raise InvalidArchiveEntry(f"entry {_shown(name)}: the mode is not a file mode")
    kind, perms = mode & ~0o7777, mode & 0o7777
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InvalidArchiveEntry(
            f"entry {_shown(name)}: only regular files and directories (mode {mode:#o})")
    if not isinstance(data, (bytes, Secret)):
        raise TypeError(f"entry {_shown(name)}: the data is bytes or a Secret, "
                        f"not {type(data).__name__}")
    if kind == stat.S_IFDIR:
        if isinstance(data, Secret) or data:
            raise InvalidArchiveEntry(f"entry {_shown(name)}: a directory has no data")
        return mode
    if len(data) > FIELD_MAX:  # no size in the text: the length of a Secret is its business
        raise InvalidArchiveEntry(
            f"entry {_shown(name)}: the data does not fit a newc size field ({FIELD_MAX} bytes)")
    return stat.S_IFREG | perms


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> bytes:
    """Header, name, NUL and the zeros that bring the three to a multiple of 4."""
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    head = MAGIC + b"".join(b"%08x" % value for value in fields) + name + b"\0"
    return head + bytes(-len(head) % 4)


def _write_all(fd: int, data: bytes | memoryview) -> int:
    """``write(2)`` until all of ``data`` went out; slices are views, never copies."""
    with memoryview(data) as view:
        rest = view
        while rest:
            n = os.write(fd, rest)
            if n == 0:
                raise OSError(errno.EIO, "write returned 0")
            rest = rest[n:]
        return len(view)


class Archive:
    """A validated newc archive of regular files and directories.

    ``files`` maps each name to ``(mode, data)``.  A mode without a file type (``0o600``)
    or with ``S_IFREG`` is a regular file; ``S_IFDIR`` with empty data is a directory.
    The parents a name needs are added as directories ``0755`` unless ``parents=False``
    or ``files`` lists them.  Entries are written in byte order of their names (a parent
    always before what is in it), numbered from inode 1.  Files have nlink 1, so the
    kernel never hard-links one of ours to an entry of another archive (``maybe_link()``
    only looks for nlink >= 2).
    """

    __slots__ = ("_entries",)

    def __init__(self, files: Mapping[str, tuple[int, bytes | Secret]], *,
                 parents: bool = True) -> None:
        entries: dict[bytes, _Entry] = {}
        kinds: dict[str, int] = {}
        for name, value in files.items():
            encoded = _encoded_name(name)
            mode, data = value
            mode = _entry_mode(name, mode, data)
            entries[encoded] = _Entry(encoded, mode, data)
            kinds[name] = stat.S_IFMT(mode)
        for name in list(kinds):
            parts = name.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent not in kinds:
                    if parents:
                        encoded = _encoded_name(parent)
                        entries[encoded] = _Entry(encoded, _DIR_MODE, b"")
                        kinds[parent] = stat.S_IFDIR
                elif kinds[parent] != stat.S_IFDIR:
                    raise InvalidArchiveEntry(
                        f"entry {_shown(name)} is inside {_shown(parent)}, which is a file")
        self._entries = tuple(entries[key] for key in sorted(entries))

    @property
    def names(self) -> tuple[str, ...]:
        """The entry names in archive order (without the trailer)."""
        return tuple(e.name.decode("utf-8", "surrogateescape") for e in self._entries)

    @property
    def holds_secret(self) -> bool:
        """Whether a file's data is a Secret (then only :meth:`write` is allowed)."""
        return any(isinstance(e.data, Secret) for e in self._entries)

    @property
    def size(self) -> int:
        """The archive's length in bytes, trailer included (a multiple of 4)."""
        total = _HEADER_SIZE + len(TRAILER) + 1
        total += -total % 4
        for e in self._entries:
            head = _HEADER_SIZE + len(e.name) + 1
            total += head + (-head % 4) + len(e.data) + (-len(e.data) % 4)
        return total

    def _emit(self, out: Callable[[bytes | memoryview], int]) -> int:
        written = 0
        for ino, e in enumerate(self._entries, start=1):
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            # Secret.view() is the Secret's own buffer, read-only: nothing is copied.  It
            # raises for a wiped Secret, before a header could promise an empty file.
            with e.data.view() if isinstance(e.data, Secret) else memoryview(e.data) as view:
                written += out(_header(ino, e.mode, nlink, len(view), e.name))
                if view:
                    written += out(view)
                    written += out(bytes(-len(view) % 4))
        return written + out(_header(0, 0, 1, 0, TRAILER.encode()))

    def write(self, fd: int) -> int:
        """Write the archive to ``fd`` at its current offset; return the bytes written."""
        return self._emit(lambda data: _write_all(fd, data))

    def to_bytes(self) -> bytes:
        """The archive as bytes, for archives without Secrets (tests, VM images)."""
        if self.holds_secret:
            raise TypeError("an archive holding a Secret is only written to a descriptor")
        parts: list[bytes] = []

        def out(data: bytes | memoryview) -> int:
            parts.append(bytes(data))
            return len(data)

        self._emit(out)
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"<newc.Archive {len(self._entries)} entries, {self.size} bytes>"
