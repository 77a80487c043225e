"""Process hygiene for anything that holds secrets; inotify and sd_notify for the agent's loop.

With :mod:`keyhandoff.kexec` (``kexec_file_load`` only), the one importer of
``keyhandoff._bindings._linux``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff._bindings._linux import ffi, lib

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Inotify", "InotifyEvent", "Notifier", "harden", "is_dumpable"]

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


class Notifier:
    """The ``sd_notify`` protocol over a socket of our own that never blocks.

    libsystemd's ``sd_notify`` sends with a blocking ``sendmsg``: when the reader of
    ``$NOTIFY_SOCKET`` is slow or stopped, the sender sleeps once the datagram queue is
    full (``net.unix.max_dgram_qlen``, 10 by default), and an agent that sends a status
    line after each answer stops answering (issue #10, finding 15).  Here every send is
    ``MSG_DONTWAIT`` on a socket connected to ``$NOTIFY_SOCKET``:

    * ``STATUS=`` lines coalesce: when the queue is full only the newest one is kept, and
      it goes out when the socket becomes writable again (``wants_write`` tells the loop
      to wait for that; a connected AF_UNIX datagram socket polls writable exactly when
      the reader's queue has room);
    * states (``READY=1``) are kept until they went out, sent with the newest status;
    * :meth:`final` (``STOPPING=1``) is tried once and never waited for: the service
      manager sees the process end anyway.

    Paths and abstract (``@``) addresses are supported, as systemd 252 sets them.  Without
    ``$NOTIFY_SOCKET`` (or with a form we do not know) every call does nothing.
    """

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | None = None
        if address and address[0] == "@":
            self._address = "\0" + address[1:]
        elif address and address[0] == "/":
            self._address = address
        self._sock: socket.socket | None = None
        self._states: list[str] = []
        self._status: str | None = None
        #: datagrams dropped or replaced because the reader's queue was full
        self.dropped = 0
        #: counts the sockets made: a new socket may reuse the old one's descriptor number
        self.connections = 0

    @property
    def enabled(self) -> bool:
        """Whether there is a notify socket to talk to."""
        return self._address is not None

    @property
    def wants_write(self) -> bool:
        """Something is waiting for the socket to become writable."""
        return self._sock is not None and bool(self._states or self._status)

    def fileno(self) -> int:
        """The socket (valid while :attr:`wants_write`)."""
        return -1 if self._sock is None else self._sock.fileno()

    def _connect(self) -> socket.socket | None:
        if self._sock is None and self._address is not None:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            )
            try:
                sock.connect(self._address)
            except OSError:
                sock.close()
                return None
            self._sock = sock
            self.connections += 1
        return self._sock

    def notify(self, *, state: str | None = None, status: str | None = None) -> None:
        """Queue ``state`` (kept until sent) and ``status`` (newest wins), then try to send."""
        if self._address is None:
            return
        if state is not None and state not in self._states:
            self._states.append(state)
        if status is not None:
            if self._status is not None:
                self.dropped += 1  # an unsent status line is replaced by a newer one
            self._status = status
        self.flush()

    def flush(self) -> None:
        """Send what is queued, if the socket takes it now; never waits."""
        if not (self._states or self._status):
            return
        lines = [*self._states, *([f"STATUS={self._status}"] if self._status else [])]
        data = "\n".join(lines).encode()
        for _attempt in range(2):  # once more on a fresh socket when the reader went away
            sock = self._connect()
            if sock is None:
                break
            try:
                sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return  # the reader's queue is full: keep it, wait for writable
            except OSError as exc:
                # ECONNREFUSED/ENOTCONN: the reader closed its socket; reconnect once
                self.close()
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET):
                    break
                continue
            self._states.clear()
            self._status = None
            return
        # nobody listens: nothing will ever read this; do not keep it
        self.dropped += 1
        self._states.clear()
        self._status = None

    def final(self, state: str, status: str | None = None) -> None:
        """Try ``state`` (``STOPPING=1``) once with anything still queued, then close."""
        if self._address is None:
            return
        self.notify(state=state, status=status)
        if self._states or self._status:
            self.dropped += 1
        self.close()

    def close(self) -> None:
        """Close the socket (a later notify reconnects)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
