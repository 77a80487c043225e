"""Process hygiene for anything that holds secrets, and inotify for the agent's loop.

The only importer of ``keyhandoff._bindings._linux``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff._bindings._linux import ffi, lib

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Inotify", "InotifyEvent", "harden", "is_dumpable"]

IN_CLOSE_WRITE: Final[int] = lib.IN_CLOSE_WRITE
IN_MOVED_TO: Final[int] = lib.IN_MOVED_TO
IN_MOVED_FROM: Final[int] = lib.IN_MOVED_FROM
IN_DELETE: Final[int] = lib.IN_DELETE
IN_ATTRIB: Final[int] = lib.IN_ATTRIB
IN_Q_OVERFLOW: Final[int] = lib.IN_Q_OVERFLOW
IN_IGNORED: Final[int] = lib.IN_IGNORED
IN_ISDIR: Final[int] = lib.IN_ISDIR


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def harden(*, lock_memory: bool = True) -> list[str]:
    """Make this process non-dumpable and lock its memory; return what could not be done.

    Non-dumpable: no core dump, no ptrace by same-uid processes, /proc/<pid>/mem and environ
    closed to others (the attack: another root-started process of the same uid reading our
    memory, or a crash writing the passphrase into a core file).  ``mlockall`` with
    MCL_ONFAULT keeps pages holding secrets out of swap without touching every page now.
    """
    problems = []
    _check(lib.prctl(lib.PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    if lock_memory and lib.mlockall(lib.MCL_CURRENT | lib.MCL_FUTURE | lib.MCL_ONFAULT) < 0:
        problems.append(f"mlockall: {os.strerror(ffi.errno)}")
    return problems


def is_dumpable() -> bool:
    """Whether this process may be dumped/ptraced (PR_GET_DUMPABLE)."""
    return bool(_check(lib.prctl(lib.PR_GET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_GET_DUMPABLE)"))


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    """One inotify event: watch descriptor, mask and the file name (may be empty)."""

    wd: int
    mask: int
    name: str


_EVENT = struct.Struct("iIII")


class Inotify:
    """A non-blocking inotify instance; ``fileno()`` plugs into a selector."""

    def __init__(self) -> None:
        self._fd = _check(lib.inotify_init1(lib.IN_CLOEXEC | lib.IN_NONBLOCK), "inotify_init1")

    def fileno(self) -> int:
        """The descriptor to wait on."""
        return self._fd

    def watch(self, path: str, mask: int) -> int:
        """Watch a directory (not through a symlink); return the watch descriptor."""
        return _check(
            lib.inotify_add_watch(
                self._fd, os.fsencode(path), mask | lib.IN_ONLYDIR | lib.IN_DONT_FOLLOW,
            ),
            f"inotify_add_watch({path})",
        )

    def read(self) -> Iterator[InotifyEvent]:
        """Yield the queued events (none when nothing is pending)."""
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size : pos + _EVENT.size + length]
                pos += _EVENT.size + length
                yield InotifyEvent(wd, mask, os.fsdecode(raw.rstrip(b"\0")))

    def close(self) -> None:
        """Close the descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
