r"""systemd's password-agent protocol: read ask files and say what each prompt asks for.

This module is the protocol's ask side, not the daemon: :func:`parse_ask_file` and
:func:`classify_id` are pure (bytes in, values out); :func:`read_ask_file` and
:func:`list_ask_files` are the only functions that touch the file system.  Replying to a
querier is :mod:`keyhandoff.reply`; systemd's C escapes are :mod:`keyhandoff.cescape`.  The
agent (``keyhandoff.agent``) wires them to inotify; it never parses or sends anything itself.

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
  token PIN prompts pass no Id.  The source is undone with
  :func:`~keyhandoff.cescape.cunescape` (systemd's, strictly); it is bytes, and
  :class:`CryptsetupPrompt` holds it as ``os.fsdecode`` text, so
  ``os.fsencode(prompt.source)`` gives the bytes back.
* **The socket** (``Socket=``) is ``sck.<hex>`` in the ask directory; the ask file and its
  socket are checked before a reply by :func:`keyhandoff.reply.send_reply`, with the
  helpers :func:`check_name`, :func:`open_dir` and :func:`same_inode` shared from here.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import names
from keyhandoff.cescape import cunescape
from keyhandoff.errors import (
    AskPasswordError,
    HostileAskFile,
    InvalidEscape,
    Refused,
    ReplyFailed,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "ASK_DIR",
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
    "check_name",
    "classify_id",
    "list_ask_files",
    "open_dir",
    "parse_ask_file",
    "read_ask_file",
    "same_inode",
]


#: The system ask directory (v257+ adds per-user ones; not supported yet).
ASK_DIR: Final = names.ASK_DIR

#: Larger ask files are refused unread: systemd's are a few hundred bytes, and a cap keeps
#: a hostile writer from making the agent read without bound.
MAX_ASK_FILE: Final = 64 * 1024

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


def check_name(name: str, prefix: str) -> None:
    """Refuse (:class:`Refused`) a name that is not ``prefix`` + something, in one directory."""
    if "/" in name or "\x00" in name or not name.startswith(prefix) or name == prefix:
        raise Refused(f"not an {prefix}* name")


def open_dir(path: str | os.PathLike[str]) -> int:
    """An ``O_PATH`` descriptor on the directory ``path``; the caller closes it."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two ``stat`` results are of the same inode (device and inode number)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_ask_file(ask_dir: str | os.PathLike[str], name: str) -> AskRequest:
    """Read and parse ``ask_dir/name`` without following a symlink or blocking on a FIFO.

    Raises :class:`HostileAskFile` for a symlink, a non-regular file, an oversized or
    malformed file; ``FileNotFoundError`` when it is gone (the query ended: not an error).
    """
    try:
        check_name(name, "ask.")
    except Refused as exc:
        raise HostileAskFile(exc.reason) from None
    dir_fd = open_dir(ask_dir)
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


