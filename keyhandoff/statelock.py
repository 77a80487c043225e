"""One state change at a time: the lock every arm, rearm, disarm, restore and finish holds.

Two runners arming at once, or a runner arming while the shutdown unit re-arms, would each
read the other's half-written state and undo it.  Every state change of the runner API
holds an exclusive ``flock`` on ``/run/keyhandoff/lock`` (the directory root's, mode 0700;
/run is a tmpfs, so a lock never outlives the machine's power).  The kernel drops the lock
when the holder's descriptor closes, including when it is killed: a crash cannot leave a
stale lock behind.

A caller that finds the lock taken waits, bounded (``wait`` seconds, default
:data:`DEFAULT_WAIT`), and says so through ``progress``; after the bound it gets
:class:`Busy`.  Waiting rather than failing at once: the holders are short (a few PBKDFs
and header writes; ``arm`` asks for passphrases *before* it takes the lock), and a boot step
that failed because a runner happened to be arming would leave a chain half-handled.

The lock is re-entrant within one process (``finish`` disarms under the lock it holds);
threads of one process are serialised too.  The holder's pid and step are written into the
lock file for the message a waiter shows (nothing secret).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Final

from keyhandoff import names
from keyhandoff.errors import (
    Busy,
    UnsafeLock,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["DEFAULT_WAIT", "LOCK_DIR", "Busy", "UnsafeLock", "held"]

#: Where the lock lives (tests may point it at a directory of their own).
LOCK_DIR = names.RUN_DIR
LOCK_NAME: Final = "lock"
#: Seconds a state change waits for another one to finish before it gives up.
DEFAULT_WAIT: Final = 60.0
_POLL: Final = 0.05


_guard = threading.RLock()
_depth = 0
_fd = -1


def _lock_dir(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UnsafeLock(
            f"{path} is not a directory of uid {os.geteuid()} with mode 0700; "
            "remove it (it holds nothing but a lock) and try again",
        )


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("ascii", "replace").strip()
        if text:
            return text
    return "unknown"


def _acquire(what: str, wait: float, progress: Callable[[str], None]) -> int:
    directory = LOCK_DIR
    _lock_dir(directory)
    fd = os.open(os.path.join(directory, LOCK_NAME),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if time.monotonic() >= deadline:
                    raise Busy(
                        f"another keyhandoff state change ({holder}) is still running after "
                        f"{wait:g} s; {what} did nothing.  Try again once it has finished",
                    ) from None
                if not told:
                    progress(f"waiting up to {wait:g} s for another keyhandoff state change "
                             f"({holder}) to finish")
                    told = True
                time.sleep(_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {what}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def held(
    what: str, *, wait: float = DEFAULT_WAIT, progress: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the state lock for the ``with`` body (``what`` names the step for waiters)."""
    global _depth, _fd  # noqa: PLW0603  # one lock per process, by design
    say = progress or (lambda _msg: None)
    if not _guard.acquire(timeout=wait):
        raise Busy(f"another thread of this process holds the keyhandoff state lock; "
                   f"{what} did nothing")
    try:
        if _depth == 0:
            _fd = _acquire(what, wait, say)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(_fd, 0)
                os.close(_fd)  # closing the descriptor releases the flock
                _fd = -1
    finally:
        _guard.release()
