"""Check one passphrase against one LUKS header in a short-lived, hardened child process.

Verifying a passphrase runs the keyslot's PBKDF through libcryptsetup, and libcryptsetup
(with OpenSSL, libdevmapper, json-c, libargon2 and libblkid) would stay in a long-lived
agent's address space for the rest of its life: several MiB of resident memory for a call
made a few times per boot (issue #10, finding 18).  The agent therefore never loads it; it
starts this module as a child for each check:

* **the parent** (:func:`start`) spawns ``python -m keyhandoff.verifier PATH UUID`` with
  ``posix_spawn`` (no fork of the agent's memory, which holds other passphrases), writes
  the candidate into a pipe that is the child's stdin and closes it: the passphrase never
  travels in argv or the environment.  The child's exit is watched through a pidfd that
  plugs into the agent's selector; :meth:`Verification.result` reaps it without blocking.
* **the child** (:func:`main`) hardens itself (non-dumpable, memory locked) before it
  reads a byte, reads at most :data:`~keyhandoff.secret.MAX_PASSPHRASE` + 1 bytes into a
  :class:`~keyhandoff.secret.Secret`, opens the header, checks that it is still the
  volume the parent named, runs one PBKDF and exits with the verdict as its status.  It
  prints nothing; libcryptsetup's messages go to keyhandoff.luks's log callback.

One PBKDF per child, one child at a time (the agent queues them), never a guessing loop.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import time
from typing import Final

from keyhandoff import process
from keyhandoff.errors import KeyhandoffError
from keyhandoff.secret import MAX_PASSPHRASE, Secret

__all__ = ["TIMEOUT", "Verdict", "Verification", "main", "start"]

#: A check that takes longer is killed and counts as "could not verify" (argon2id with
#: cryptsetup's defaults takes about 2 s on the machine that formatted the volume).
TIMEOUT: Final = 120.0


class Verdict(enum.IntEnum):
    """The child's exit status.

    None of them is 0, 1 or 2: an interpreter that fails (an uncaught exception exits 1, a
    usage error 2, a module that is not found 1) must never read as a verdict, least of
    all as "refused", which makes the agent drop a cache entry.
    """

    OPENS = 10
    """The passphrase opens a keyslot of the volume."""
    REFUSED = 11
    """No keyslot accepts it."""
    OTHER_VOLUME = 12
    """The header at the path is not (any more) the volume the parent named."""
    FAILED = 13
    """It could not be checked (no header, I/O error, bad arguments, killed, ...)."""


class Verification:
    """One running check: ``fileno()`` (a pidfd) becomes readable when the child exited."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.deadline = time.monotonic() + TIMEOUT
        #: the child's peak resident memory in KiB (from wait4), once it was reaped
        self.maxrss_kib = 0
        self._verdict: Verdict | None = None

    def fileno(self) -> int:
        """The pidfd to wait on (readable once the child exited)."""
        return self._pidfd

    def kill(self) -> None:
        """End the child (SIGKILL through the pidfd: never another process)."""
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def result(self) -> Verdict:
        """Reap the child (it has exited: call when ``fileno()`` is readable) and say why."""
        if self._verdict is not None:
            return self._verdict
        _pid, status, usage = os.wait4(self.pid, 0)
        os.close(self._pidfd)
        self._pidfd = -1
        self.maxrss_kib = usage.ru_maxrss
        code = os.waitstatus_to_exitcode(status)
        try:
            self._verdict = Verdict(code)
        except ValueError:
            self._verdict = Verdict.FAILED  # killed by a signal (negative), or it crashed
        return self._verdict


def _child_environment() -> dict[str, str]:
    # The agent's own environment minus what is the agent's alone (the child never talks
    # to systemd); nothing secret is in it.
    return {k: v for k, v in os.environ.items()
            if k not in {"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES"}}


def start(path: str, volume: str, candidate: Secret) -> Verification:
    """Spawn a child that checks ``candidate`` against the header at ``path``.

    ``volume`` is the UUID the header must still carry.  ``candidate`` is not consumed
    (the caller wipes it).  Raises ``OSError`` when the child cannot be started.
    """
    candidate.check_passphrase()
    if not path.startswith("/"):
        raise ValueError("the header path must be absolute")
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        # Python's posix_spawn: the child gets our descriptors only where dup2 puts them
        # (every descriptor Python opens is close-on-exec), so just the pipe, as stdin.
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-s", "-m", "keyhandoff.verifier", path, volume],
            _child_environment(),
            file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0)],
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    try:
        pidfd = os.pidfd_open(pid)
    except BaseException:
        os.close(write_end)
        os.kill(pid, signal.SIGKILL)  # our own child, by its PID, just spawned
        os.waitpid(pid, 0)
        raise
    try:
        # At most 2048 bytes into an empty pipe (capacity >= one page): never blocks, and
        # a child that died early gives EPIPE here, not a hang.
        view = candidate.view()
        try:
            os.write(write_end, view)
        finally:
            view.release()
    except OSError:
        pass  # the child exits with FAILED (short read); result() says so
    finally:
        os.close(write_end)
    return Verification(pid, pidfd)


# --- the child ------------------------------------------------------------------------------


def _read_candidate() -> Secret:
    buf = Secret(bytearray(MAX_PASSPHRASE + 1), allow_empty=True)
    with buf:
        view = memoryview(buf.buffer())
        try:
            filled = 0
            while filled < len(view):
                n = os.readv(0, [view[filled:]])
                if n == 0:
                    break
                filled += n
            # exactly the bytes read, in a buffer of their own; the big one is wiped
            return Secret.passphrase(view[:filled])
        finally:
            view.release()


def main(argv: list[str]) -> int:
    """The child: harden, read the candidate from stdin, check it, exit with a Verdict."""
    process.harden()  # before the passphrase arrives; what could not be done is no secret
    if len(argv) != 2 or not argv[0].startswith("/"):  # PATH UUID
        return Verdict.FAILED
    path, volume = argv
    try:
        candidate = _read_candidate()
    except (KeyhandoffError, OSError):
        return Verdict.FAILED
    # lazy on purpose: the agent imports this module, libcryptsetup loads only in the child
    from keyhandoff.luks import LuksHeader, WrongPassphrase  # noqa: PLC0415

    with candidate:
        try:
            with LuksHeader.open(path) as header:
                if header.uuid != volume:
                    return Verdict.OTHER_VOLUME
                header.verify(candidate)
        except WrongPassphrase:
            return Verdict.REFUSED
        except (KeyhandoffError, OSError, UnicodeDecodeError):
            return Verdict.FAILED
    return Verdict.OPENS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
