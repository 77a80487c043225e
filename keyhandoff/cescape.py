r"""C escapes exactly as systemd writes and reads them (``src/basic/escape.c``).

systemd-cryptsetup names its prompts ``cryptsetup:`` + ``cescape(source)``
(:mod:`keyhandoff.askpass` reads them back).  ``cescape`` writes ``\a \b \f \n \r \t \v
\\ \" \'`` for those bytes, ``\ooo`` (three octal digits) for every other byte below 0x20 or
from 0x7f up, and every other byte as is: its output is printable ASCII.  :func:`cunescape`
is systemd's ``cunescape`` with no flags: it also takes ``\s`` (space), ``\xNN``, ``\uXXXX``
and ``\UXXXXXXXX`` (code points, written as UTF-8; ``\U`` must be a valid code point),
refuses any escape that decodes to NUL, an octal value above 255, a trailing backslash and
anything else (``\?`` included: systemd neither writes nor reads it).  Both are pure: bytes
in, values out.
"""

from __future__ import annotations

from typing import Final

from keyhandoff.errors import InvalidEscape

__all__ = ["cescape", "cunescape"]

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
