r"""Replying to a querier of systemd's password-agent protocol: the datagrams and the socket.

:func:`reply_datagram` and :func:`cancel_datagram` are pure; :func:`send_reply` is the only
function that touches a socket.  The ask file it answers is read by :mod:`keyhandoff.askpass`.

What systemd does, as read in its sources and checked against the v252 binaries
(``tests/integration/test_askpass_systemd.py``):

* **The reply** is one datagram.  The querier reads it into ``char passphrase[LINE_MAX+1]``
  (2049 bytes) with ``recvmsg`` and accepts it only if the kernel-attached credentials say
  uid 0 (v257+: or its own uid).  ``+`` followed by the passwords is split at NUL with
  ``strv_parse_nulstr``: a trailing NUL ends the last password and adds none, so
  ``+pw`` and ``+pw\0`` mean the same; ``+a\0b`` is two passwords; ``+`` alone is one
  empty password.  ``-`` cancels (``ECANCELED``).  v252 does not check ``MSG_TRUNC``: a
  longer datagram is cut to 2049 bytes.  v257+ ignores a truncated datagram entirely, so
  systemd's own agent, which appends a NUL, cannot deliver a 2048-byte passphrase there.
  :func:`reply_datagram` therefore sends ``+`` and the passphrase **without** a NUL: at
  most 2049 bytes for the longest passphrase :class:`~keyhandoff.secret.Secret` allows,
  read identically by every version.
* **The socket** is ``sck.<hex>`` in the ask directory, AF_UNIX SOCK_DGRAM, owned by root.

Residual races, stated: the ``PID`` check cannot rule out PID reuse (a new process with
the old PID makes a dead query look alive; the socket checks still apply).  The socket
itself is pinned: we open it with ``O_PATH|O_NOFOLLOW``, check that very inode, and send
to ``/proc/self/fd/N``, so a rename between check and send cannot redirect the datagram.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Final

from keyhandoff.askpass import check_name, open_dir, same_inode
from keyhandoff.errors import Refused, ReplyFailed
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from keyhandoff.askpass import AskRequest

__all__ = [
    "CANCEL",
    "Refused",
    "ReplyFailed",
    "cancel_datagram",
    "reply_datagram",
    "send_reply",
]

#: The cancel datagram.
CANCEL: Final = b"-"


def reply_datagram(secret: Secret) -> Secret:
    r"""The answer datagram ``+<passphrase>`` as a new :class:`Secret` (wipe it after use).

    No trailing NUL: systemd reads ``+pw`` and ``+pw\0`` alike, and without it the
    longest passphrase (2048 bytes) still fits the querier's 2049-byte buffer, which
    v257+ requires (it drops truncated datagrams).  ``secret`` is left untouched.
    """
    secret.check_passphrase()
    view = secret.view()
    buf = bytearray(len(view) + 1)
    buf[0] = ord("+")
    buf[1:] = view
    view.release()
    return Secret(buf)


def cancel_datagram() -> bytes:
    """The cancel datagram ``-``: the querier fails with ECANCELED."""
    return CANCEL


def _check_ask_file(dir_fd: int, dir_info: os.stat_result, ask_path: str) -> None:
    parent, name = os.path.split(ask_path)
    check_name(name, "ask.")
    if parent:
        try:
            parent_fd = open_dir(parent)
        except OSError:
            raise Refused("ask file's directory cannot be opened") from None
        try:
            if not same_inode(os.fstat(parent_fd), dir_info):
                raise Refused("ask file is not in the ask directory")
        finally:
            os.close(parent_fd)
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Refused("ask file is gone (query answered or cancelled)") from None
    if not stat.S_ISREG(info.st_mode):
        raise Refused("ask file is not a regular file")
    if info.st_uid != 0:
        raise Refused("ask file is not owned by root")


def _check_alive(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise Refused("the querier's PID is not alive") from None
    except PermissionError:
        pass  # EPERM: the process exists; we just may not signal it


def _check_deadline(not_after: int) -> None:
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    if not_after and now_us >= not_after:
        raise Refused("the query's NotAfter= has passed")


def _check_socket_inode(info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise Refused("Socket= is a symlink")
    if not stat.S_ISSOCK(info.st_mode):
        raise Refused("Socket= is not a socket")
    if info.st_uid != 0:
        # Only root's querier owns its socket; another user's socket in the directory
        # is someone fishing for passphrases.
        raise Refused("Socket= is not owned by root")


def _pin_socket(dir_fd: int, dir_info: os.stat_result, path: str) -> int:
    """An O_PATH fd on the checked socket inode; the caller closes it."""
    parent, name = os.path.split(path)
    check_name(name, "sck.")
    if not os.path.isabs(path) or not parent:
        raise Refused("Socket= is not an absolute path")
    # Same inode, not same string: catches "..", symlinked parents and v257's "//".
    try:
        parent_fd = open_dir(parent)
    except OSError:
        raise Refused("Socket= directory cannot be opened") from None
    try:
        if not same_inode(os.fstat(parent_fd), dir_info):
            raise Refused("Socket= is outside the ask directory")
    finally:
        os.close(parent_fd)
    try:
        # O_PATH|O_NOFOLLOW opens a symlink itself (no ELOOP): fstat below then sees
        # S_IFLNK and refuses, so a symlink can never redirect the passphrase.
        sock_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Refused("Socket= does not exist") from None
    try:
        _check_socket_inode(os.fstat(sock_fd))
    except BaseException:
        os.close(sock_fd)
        raise
    return sock_fd


def _payload(datagram: Secret | bytes) -> Secret | bytes:
    if isinstance(datagram, Secret):
        if len(datagram) == 0 or datagram.view()[0] != ord("+"):
            # A bare passphrase would reach the querier as an "invalid packet", or as
            # a cancel if it starts with "-": only reply_datagram() output goes out.
            raise Refused("datagram is not a reply_datagram()")
        return datagram
    if datagram != CANCEL:
        raise Refused("bytes datagrams are only for cancel; passphrases travel as Secret")
    return datagram


def _send(sock_fd: int, payload: Secret | bytes) -> None:
    """Send to the socket inode behind ``sock_fd`` (an O_PATH fd), never to a path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
        data = payload.view() if isinstance(payload, Secret) else payload
        try:
            # /proc/self/fd/N resolves to the pinned inode, whatever the path names now.
            sender.sendto(data, socket.MSG_DONTWAIT, f"/proc/self/fd/{sock_fd}")
        except OSError as exc:
            code = exc.errno or 0
            raise ReplyFailed(
                f"sending to the querier failed ({errno.errorcode.get(code, code)})", code
            ) from None
        finally:
            if isinstance(data, memoryview):
                data.release()


def send_reply(
    ask_dir: str | os.PathLike[str],
    ask_path: str | os.PathLike[str],
    request: AskRequest,
    datagram: Secret | bytes,
) -> None:
    """Send ``datagram`` to ``request.socket`` after checking that it is safe to.

    ``ask_path`` is the ask file the request was read from (a name in ``ask_dir`` or a
    path whose directory is ``ask_dir``); ``datagram`` is :func:`reply_datagram` output
    (a :class:`Secret`, not consumed: the caller wipes it) or :func:`cancel_datagram`.

    Checks, each refusing with :class:`Refused` and sending nothing: the ask file is
    still a root-owned regular file (not a symlink) directly in ``ask_dir``; the PID
    is alive (EPERM counts as alive); ``NotAfter`` is 0 or in the future; ``Socket=``
    names ``sck.*`` in the same directory inode as ``ask_dir``, is a socket (not a
    symlink) owned by uid 0.  The send is non-blocking; a kernel error (ECONNREFUSED:
    nobody reads; EAGAIN: queue full) raises :class:`ReplyFailed`.
    """
    payload = _payload(datagram)
    dir_fd = open_dir(ask_dir)
    try:
        dir_info = os.fstat(dir_fd)
        _check_ask_file(dir_fd, dir_info, os.fspath(ask_path))
        _check_alive(request.pid)
        _check_deadline(request.not_after)
        sock_fd = _pin_socket(dir_fd, dir_info, request.socket)
    finally:
        os.close(dir_fd)
    try:
        _send(sock_fd, payload)
    finally:
        os.close(sock_fd)

