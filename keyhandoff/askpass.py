r"""systemd's password-agent protocol: read ask files, classify prompts, reply, cancel.

This module is the protocol, not the daemon: :func:`parse_ask_file`, :func:`classify_id`,
:func:`cunescape`, :func:`reply_datagram` and :func:`cancel_datagram` are pure (bytes in,
values out); :func:`read_ask_file`, :func:`list_ask_files` and :func:`send_reply` are the
only functions that touch the file system or a socket.  The agent (``keyhandoff.agent``)
wires them to inotify; it never parses or sends anything itself.

What systemd does, as read in its sources and checked against the v252 binaries
(``tests/integration/test_askpass_systemd.py``):

* **The ask file** (``src/shared/ask-password-api.c``, ``ask_password_agent``) is written
  with ``fprintf``: ``[Ask]``, then ``PID=``, ``Socket=``, ``AcceptCached=``, ``Echo=``,
  ``NotAfter=``, ``Silent=`` always, then ``Message=``, ``Icon=``, ``Id=`` when set.  Values
  are not escaped, so a newline in a message could inject a second ``Socket=``: because the
  always-written keys come first, any injected known key is a *duplicate*, which we refuse.
  systemd's own reader (``config_parse``) also ends lines at ``\r`` and NUL, strips
  whitespace around keys and values, and joins lines ending in a backslash; we refuse NUL,
  ``\r`` and whitespace around keys, so no line can mean one thing to systemd and another
  to us, and we do not join lines (systemd never writes a trailing backslash; a
  ``Message=`` ending in one stays a value).  Only one section exists: the first line must
  be ``[Ask]`` and any further section header is refused (it can only be an injection).
* **The Id** of systemd-cryptsetup (``src/cryptsetup/cryptsetup.c``, ``get_password``):
  ``disk_path = cescape(src); id = strjoina("cryptsetup:", disk_path)``, and
  ``"cryptsetup-verification:"`` with the same ``disk_path`` for the verification prompt;
  token PIN prompts pass no Id.  ``cescape`` (``src/basic/escape.c``) writes ``\a \b \f
  \n \r \t \v \\ \" \'`` for those bytes, ``\ooo`` (three octal digits) for every
  other byte below 0x20 or from 0x7f up, and every other byte as is: its output is
  printable ASCII.  :func:`cunescape` is systemd's ``cunescape`` with no flags: it also
  takes ``\s`` (space), ``\xNN``, ``\uXXXX`` and ``\UXXXXXXXX`` (code points, written as
  UTF-8; ``\U`` must be a valid code point), refuses any escape that decodes to NUL, an
  octal value above 255, a trailing backslash and anything else (``\?`` included:
  systemd neither writes nor reads it).  The source is bytes; :class:`CryptsetupPrompt`
  holds it as ``os.fsdecode`` text, so ``os.fsencode(prompt.source)`` gives the bytes back.
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
import re
import socket
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import names
from keyhandoff.errors import (
    AskPasswordError,
    HostileAskFile,
    InvalidEscape,
    Refused,
    ReplyFailed,
)
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "ASK_DIR",
    "CANCEL",
    "MAX_ASK_FILE",
    "AskPasswordError",
    "AskRequest",
    "CryptsetupPrompt",
    "HostileAskFile",
    "InvalidEscape",
    "NoIdPrompt",
    "OtherPrompt",
    "Prompt",
    "Refused",
    "ReplyFailed",
    "VerificationPrompt",
    "cancel_datagram",
    "cescape",
    "classify_id",
    "cunescape",
    "list_ask_files",
    "parse_ask_file",
    "read_ask_file",
    "reply_datagram",
    "send_reply",
]

#: The system ask directory (v257+ adds per-user ones; not supported yet).
ASK_DIR: Final = names.ASK_DIR

#: Larger ask files are refused unread: systemd's are a few hundred bytes, and a cap keeps
#: a hostile writer from making the agent read without bound.
MAX_ASK_FILE: Final = 64 * 1024

#: The cancel datagram.
CANCEL: Final = b"-"

#: PID_MAX_LIMIT on 64-bit Linux: no process can have a larger PID.
_PID_MAX: Final = 4 * 1024 * 1024
_UINT64_MAX: Final = 2**64 - 1

_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_KEY = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_TRUE: Final = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE: Final = frozenset({"0", "no", "n", "false", "f", "off"})
_KNOWN_KEYS: Final = frozenset(
    {"PID", "Socket", "AcceptCached", "Echo", "NotAfter", "Silent", "Message", "Icon", "Id"}
)

_CRYPTSETUP: Final = "cryptsetup:"
_VERIFICATION: Final = "cryptsetup-verification:"


# --- prompts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CryptsetupPrompt:
    """systemd-cryptsetup asks for a volume's passphrase; the only kind we may answer.

    ``source`` is the unescaped crypttab source (``/dev/disk/by-uuid/<uuid>`` and the like)
    as ``os.fsdecode`` text.
    """

    source: str


@dataclass(frozen=True, slots=True)
class VerificationPrompt:
    """systemd-cryptsetup asks to repeat a new passphrase: never answered."""

    source: str


@dataclass(frozen=True, slots=True)
class NoIdPrompt:
    """No ``Id=`` (token PIN prompts, ad-hoc queriers): never answered."""


@dataclass(frozen=True, slots=True)
class OtherPrompt:
    """Some other querier's ``Id=``: never answered."""

    id: str


#: What a query asks for, by its ``Id=``.
Prompt = CryptsetupPrompt | VerificationPrompt | NoIdPrompt | OtherPrompt


def classify_id(id_: str | None) -> Prompt:
    """Say what a query with this ``Id=`` asks for.

    Raises :class:`InvalidEscape` when a ``cryptsetup:`` or ``cryptsetup-verification:``
    source is not what ``cescape`` writes or is empty: such an Id names no volume, and
    guessing one would let a crafted Id steer a passphrase to the wrong prompt.
    """
    if id_ is None:
        return NoIdPrompt()
    for prefix, kind in ((_CRYPTSETUP, CryptsetupPrompt), (_VERIFICATION, VerificationPrompt)):
        if id_.startswith(prefix):
            raw = cunescape(id_[len(prefix) :])
            if not raw:
                raise InvalidEscape("Id names an empty cryptsetup source")
            return kind(os.fsdecode(raw))
    return OtherPrompt(id_)


# --- C escapes -----------------------------------------------------------------------------

_CESCAPE_SHORT: Final = {
    0x07: b"\\a",
    0x08: b"\\b",
    0x0C: b"\\f",
    0x0A: b"\\n",
    0x0D: b"\\r",
    0x09: b"\\t",
    0x0B: b"\\v",
    0x5C: b"\\\\",
    0x22: b'\\"',
    0x27: b"\\'",
}
_CUNESCAPE_SHORT: Final = {
    ord("a"): 0x07,
    ord("b"): 0x08,
    ord("f"): 0x0C,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
    ord("v"): 0x0B,
    ord("\\"): 0x5C,
    ord('"'): 0x22,
    ord("'"): 0x27,
    ord("s"): 0x20,  # systemd's extension (XDG syntax); cescape never writes it
}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_OCT: Final = frozenset(b"01234567")


def cescape(data: bytes) -> str:
    """Escape like systemd's ``cescape``: the inverse of :func:`cunescape` for NUL-free bytes."""
    out: list[str] = []
    for byte in data:
        short = _CESCAPE_SHORT.get(byte)
        if short is not None:
            out.append(short.decode())
        elif byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:03o}")
        else:
            out.append(chr(byte))
    return "".join(out)


def _unichar_is_valid(code: int) -> bool:
    # systemd's unichar_is_valid (src/basic/utf8.c), applied to \U only, as systemd does.
    return not (
        code >= 0x110000
        or (code & 0xFFFFF800) == 0xD800
        or 0xFDD0 <= code <= 0xFDEF
        or (code & 0xFFFE) == 0xFFFE
    )


def _digits(src: bytes, start: int, count: int, allowed: frozenset[int], base: int) -> int:
    chunk = src[start : start + count]
    if len(chunk) != count or not all(c in allowed for c in chunk):
        raise InvalidEscape("malformed numeric escape")
    value = int(chunk, base)
    if value == 0:
        raise InvalidEscape("escape decodes to NUL")
    return value


def _unescape_one(src: bytes, i: int) -> tuple[bytes, int]:
    """Decode the escape whose backslash is at ``src[i]``: (bytes, next index)."""
    if i + 1 >= len(src):
        raise InvalidEscape("trailing backslash")
    kind = src[i + 1]
    short = _CUNESCAPE_SHORT.get(kind)
    if short is not None:
        return bytes((short,)), i + 2
    if kind == ord("x"):
        return bytes((_digits(src, i + 2, 2, _HEX, 16),)), i + 4
    if kind == ord("u"):
        # systemd does not check \u against unichar_is_valid: surrogates pass as
        # 3-byte sequences, which "surrogatepass" reproduces byte for byte.
        code = _digits(src, i + 2, 4, _HEX, 16)
        return chr(code).encode("utf-8", "surrogatepass"), i + 6
    if kind == ord("U"):
        code = _digits(src, i + 2, 8, _HEX, 16)
        if not _unichar_is_valid(code):
            raise InvalidEscape("escape is not a valid code point")
        return chr(code).encode("utf-8"), i + 10
    if kind in _OCT:
        value = _digits(src, i + 1, 3, _OCT, 8)
        if value > 0xFF:
            raise InvalidEscape("octal escape above 255")
        return bytes((value,)), i + 4
    raise InvalidEscape("unknown escape")


def cunescape(text: str | bytes) -> bytes:
    r"""Undo C escapes exactly as systemd's ``cunescape(s, 0)`` does, strictly.

    Returns bytes (``\ooo`` and ``\xNN`` give raw bytes, ``\u``/``\U`` give UTF-8).
    Raises :class:`InvalidEscape` where systemd returns ``-EINVAL``, and for a literal
    NUL (which a C string cannot hold).
    """
    src = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    if b"\x00" in src:
        # C would stop at the NUL and decode a prefix: refuse instead of guessing.
        raise InvalidEscape("NUL byte in escaped text")
    out = bytearray()
    i = 0
    while i < len(src):
        backslash = src.find(b"\\", i)
        if backslash < 0:
            out += src[i:]
            break
        out += src[i:backslash]
        piece, i = _unescape_one(src, backslash)
        out += piece
    return bytes(out)


# --- ask files -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AskRequest:
    """One parsed ask file.  Holds no secret; safe to log field by field.

    ``not_after`` is CLOCK_MONOTONIC in microseconds, 0 for no deadline.  ``id``,
    ``message`` and ``icon`` are ``None`` when the file omits them.
    """

    socket: str
    pid: int
    not_after: int = 0
    accept_cached: bool = False
    echo: bool = False
    silent: bool = False
    message: str | None = None
    icon: str | None = None
    id: str | None = None

    @property
    def prompt(self) -> Prompt:
        """What this query asks for (see :func:`classify_id`)."""
        return classify_id(self.id)


def _parse_bool(key: str, value: str) -> bool:
    # systemd's parse_boolean: ASCII, case-insensitive (strcaseeq).  isascii() first:
    # str.lower() maps a few non-ASCII letters onto ASCII (U+212A KELVIN SIGN -> "k");
    # none of today's words has such a letter, so this only keeps it that way.
    if value.isascii():
        folded = value.lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
    raise HostileAskFile(f"{key}= is not a boolean")


def _parse_uint(key: str, value: str, maximum: int) -> int:
    # int() alone would take "+5", " 5", "5_0" and non-ASCII digits: systemd writes none.
    if not _DIGITS.fullmatch(value) or len(value) > 20:
        raise HostileAskFile(f"{key}= is not a decimal number")
    number = int(value)
    if number > maximum:
        raise HostileAskFile(f"{key}= is out of range")
    return number


def _lines(data: bytes) -> list[str]:
    if len(data) > MAX_ASK_FILE:
        raise HostileAskFile(f"ask file is larger than {MAX_ASK_FILE} bytes")
    # NUL and CR end a line for systemd's reader but not for ours: refuse them rather
    # than let the two readers see different lines.
    if b"\x00" in data:
        raise HostileAskFile("ask file contains a NUL byte")
    if b"\r" in data:
        raise HostileAskFile("ask file contains a carriage return")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HostileAskFile("ask file is not valid UTF-8") from None
    # split("\n"), not splitlines(): the latter also breaks at \v, \f, \x1c-\x1e, \x85,
    # U+2028/2029, which systemd does not.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start one
    return lines


def _key_values(data: bytes) -> dict[str, str]:
    lines = _lines(data)
    if not lines or lines[0] != "[Ask]":
        raise HostileAskFile("ask file does not start with [Ask]")
    seen: dict[str, str] = {}
    for line in lines[1:]:
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            raise HostileAskFile("ask file has a second section")
        key, sep, value = line.partition("=")
        if not sep:
            raise HostileAskFile("ask file has a line without '='")
        if not _KEY.fullmatch(key):
            raise HostileAskFile("ask file has a malformed key")
        if key in seen:
            # systemd writes each key once; a second one is an injection through an
            # unescaped value, and the reference agent would take the *last* Socket=.
            name = key if key in _KNOWN_KEYS else "a key"
            raise HostileAskFile(f"duplicated {name}= in ask file")
        seen[key] = value
    return seen


def parse_ask_file(data: bytes) -> AskRequest:
    """Parse the bytes of an ask file strictly, or raise :class:`HostileAskFile`.

    The rules (systemd writes nothing they refuse): at most :data:`MAX_ASK_FILE` bytes,
    UTF-8, no NUL or CR; first line exactly ``[Ask]`` and no other section; ``key=value``
    split at the first ``=``, case-sensitive keys; blank lines and lines starting with
    ``#`` or ``;`` skipped; unknown keys ignored; any duplicated key refused; ``Socket=``
    (absolute) and ``PID=`` (1..PID_MAX_LIMIT) required; ``NotAfter=`` a u64; booleans as
    systemd's ``parse_boolean``; an ``Id=`` that :func:`classify_id` refuses refused.
    """
    fields = _key_values(data)
    sock = fields.get("Socket")
    if not sock:
        raise HostileAskFile("ask file has no Socket=")
    if not sock.startswith("/"):
        raise HostileAskFile("Socket= is not an absolute path")
    pid = fields.get("PID")
    if pid is None:
        raise HostileAskFile("ask file has no PID=")
    pid_number = _parse_uint("PID", pid, _PID_MAX)
    if pid_number == 0:
        # kill(0, 0) probes our own process group and always succeeds: PID=0 would
        # pass the liveness check for a query nobody waits on.
        raise HostileAskFile("PID= is 0")

    def flag(key: str) -> bool:
        value = fields.get(key)
        return False if value is None else _parse_bool(key, value)

    request = AskRequest(
        socket=sock,
        pid=pid_number,
        not_after=_parse_uint("NotAfter", fields.get("NotAfter", "0"), _UINT64_MAX),
        accept_cached=flag("AcceptCached"),
        echo=flag("Echo"),
        silent=flag("Silent"),
        message=fields.get("Message"),
        icon=fields.get("Icon"),
        id=fields.get("Id"),
    )
    classify_id(request.id)  # refuse a malformed cryptsetup Id now, not at answer time
    return request


# --- datagrams -----------------------------------------------------------------------------


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


# --- I/O edge ------------------------------------------------------------------------------


def list_ask_files(ask_dir: str | os.PathLike[str] = ASK_DIR) -> Iterator[str]:
    """Names (not paths) of the ask files in ``ask_dir``, sorted; none if it is missing.

    Matches the ``ask.`` prefix only: the suffix is 6 alphanumerics up to v256 and a
    decimal number from v257.  Says nothing about the entries' type: :func:`read_ask_file`
    checks that.
    """
    try:
        with os.scandir(ask_dir) as entries:
            names = sorted(e.name for e in entries if e.name.startswith("ask."))
    except FileNotFoundError:
        return iter(())
    return iter(names)


def _check_name(name: str, prefix: str) -> None:
    if "/" in name or "\x00" in name or not name.startswith(prefix) or name == prefix:
        raise Refused(f"not an {prefix}* name")


def _open_dir(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_ask_file(ask_dir: str | os.PathLike[str], name: str) -> AskRequest:
    """Read and parse ``ask_dir/name`` without following a symlink or blocking on a FIFO.

    Raises :class:`HostileAskFile` for a symlink, a non-regular file, an oversized or
    malformed file; ``FileNotFoundError`` when it is gone (the query ended: not an error).
    """
    try:
        _check_name(name, "ask.")
    except Refused as exc:
        raise HostileAskFile(exc.reason) from None
    dir_fd = _open_dir(ask_dir)
    try:
        try:
            # O_NOFOLLOW: a symlink could point the agent at any file root can read.
            # O_NONBLOCK: a FIFO planted under an ask.* name must not hang the agent.
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HostileAskFile("ask file is a symlink") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HostileAskFile("ask file is not a regular file")
        if info.st_size > MAX_ASK_FILE:
            raise HostileAskFile(f"ask file is larger than {MAX_ASK_FILE} bytes")
        chunks = []
        remaining = MAX_ASK_FILE + 1  # one byte more shows a file that grew past the cap
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    return parse_ask_file(b"".join(chunks))


def _check_ask_file(dir_fd: int, dir_info: os.stat_result, ask_path: str) -> None:
    parent, name = os.path.split(ask_path)
    _check_name(name, "ask.")
    if parent:
        try:
            parent_fd = _open_dir(parent)
        except OSError:
            raise Refused("ask file's directory cannot be opened") from None
        try:
            if not _same_inode(os.fstat(parent_fd), dir_info):
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
    _check_name(name, "sck.")
    if not os.path.isabs(path) or not parent:
        raise Refused("Socket= is not an absolute path")
    # Same inode, not same string: catches "..", symlinked parents and v257's "//".
    try:
        parent_fd = _open_dir(parent)
    except OSError:
        raise Refused("Socket= directory cannot be opened") from None
    try:
        if not _same_inode(os.fstat(parent_fd), dir_info):
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
    dir_fd = _open_dir(ask_dir)
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
