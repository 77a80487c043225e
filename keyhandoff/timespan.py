"""systemd-style time spans (``30min``, ``1h 30min``, ``8h``, ``90``) for the config file.

:func:`parse_usec` follows ``parse_time()`` of systemd's ``src/basic/time-util.c`` (what
``systemd-analyze timespan`` and every ``*Sec=`` unit setting use), with seconds as the unit
of a bare number: a sum of numbers, each with an optional decimal fraction and an optional
unit, separated by optional whitespace (``1h30min`` = ``1h 30min`` = ``1.5h``).  Units:
``usec us μs µs``, ``msec ms``, ``seconds second sec s``, ``minutes minute min m``,
``hours hour hr h``, ``days day d``, ``weeks week w``, ``months month M`` (30.44 days),
``years year y`` (365.25 days); a unit is matched as a prefix, longest spelling first, as
systemd does.  ``infinity`` is refused: every span here is a bound.

It accepts a subset of what systemd accepts (no vertical tab or form feed before a number)
and gives the same microseconds for everything it accepts; tests/unit/test_timespan.py
compares it with the real ``systemd-analyze timespan``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["USEC_PER_SEC", "parse_seconds", "parse_usec"]

USEC_PER_SEC: Final = 1_000_000
_MINUTE: Final = 60 * USEC_PER_SEC
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR
#: systemd's (usec_t) -1, its "infinity": every sum must stay below it
_USEC_INFINITY: Final = 2**64 - 1
_LLONG_MAX: Final = 2**63 - 1
_WHITESPACE: Final = " \t\n\r"
_DIGITS: Final = "0123456789"

# In systemd's order: the first spelling that is a prefix of the rest wins ("msec" before "m",
# "months" and "M" before "m"...).
_UNITS: Final[tuple[tuple[str, int], ...]] = (
    ("seconds", USEC_PER_SEC), ("second", USEC_PER_SEC), ("sec", USEC_PER_SEC),
    ("s", USEC_PER_SEC),
    ("minutes", _MINUTE), ("minute", _MINUTE), ("min", _MINUTE),
    ("months", 2_629_800 * USEC_PER_SEC), ("month", 2_629_800 * USEC_PER_SEC),
    ("M", 2_629_800 * USEC_PER_SEC),
    ("msec", 1000), ("ms", 1000),
    ("m", _MINUTE),
    ("hours", _HOUR), ("hour", _HOUR), ("hr", _HOUR), ("h", _HOUR),
    ("days", _DAY), ("day", _DAY), ("d", _DAY),
    ("weeks", 7 * _DAY), ("week", 7 * _DAY), ("w", 7 * _DAY),
    ("years", 31_557_600 * USEC_PER_SEC), ("year", 31_557_600 * USEC_PER_SEC),
    ("y", 31_557_600 * USEC_PER_SEC),
    ("usec", 1), ("us", 1), ("μs", 1), ("µs", 1),
)


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _unit(text: str, i: int) -> tuple[int, int | None]:
    """(index after the unit, its microseconds) or (i, None) when no unit starts at i."""
    for name, usec in _UNITS:
        if text.startswith(name, i):
            return i + len(name), usec
    return i, None


def _number(text: str, i: int) -> tuple[int, str | None, int]:
    """strtoll() at ``i`` and an optional ``.digits``: (whole, fraction or None, index after)."""
    if text[i] == "-":
        raise ValueError(f"{text!r}: a time span is never negative")
    j = i + 1 if text[i] == "+" else i  # strtoll: an optional '+', then digits
    end = _skip(text, j, _DIGITS)
    if end == j:
        end = i  # no conversion: strtoll leaves its end pointer at the start
    whole = int(text[j:end]) if end > i else 0
    if whole > _LLONG_MAX:
        raise ValueError(f"{text!r} is out of range")
    if end < len(text) and text[end] == ".":
        after = _skip(text, end + 1, _DIGITS)
        return whole, text[end + 1 : after], after
    if end == i:
        raise ValueError(f"{text!r} is not a time span")
    return whole, None, end


def _term(text: str, i: int, default_unit: int) -> tuple[int, int]:
    """One number with its unit at ``i``: (microseconds, index after it)."""
    whole, fraction, i = _number(text, i)
    after_unit, usec = _unit(text, _skip(text, i, _WHITESPACE))
    if usec is None and after_unit == i and i != len(text):
        raise ValueError(f"{text!r} is not a time span")  # "12.34.56", "5x"
    multiplier = default_unit if usec is None else usec
    if whole >= _USEC_INFINITY // multiplier:
        raise ValueError(f"{text!r} is out of range")
    value = whole * multiplier
    if fraction is not None:
        if not fraction:
            raise ValueError(f"{text!r}: a decimal point needs digits after it")
        m = multiplier // 10
        for digit in fraction:
            value += int(digit) * m
            m //= 10
    return value, after_unit


def parse_usec(text: str, *, default_unit: int = USEC_PER_SEC) -> int:
    """Microseconds of a time span; :class:`ValueError` when systemd would refuse it too."""
    i = _skip(text, 0, _WHITESPACE)
    if text.startswith("infinity", i):
        raise ValueError(f"{text!r}: infinity is not a bound")
    total = 0
    something = False
    while True:
        i = _skip(text, i, _WHITESPACE)
        if i == len(text):
            if not something:
                raise ValueError(f"{text!r} is not a time span")
            return total
        value, i = _term(text, i, default_unit)
        total += value
        if total >= _USEC_INFINITY:
            raise ValueError(f"{text!r} is out of range")
        something = True


def parse_seconds(value: str | int) -> int:
    """Whole seconds of a span (``"8h"``) or of a plain integer of seconds (``28800``)."""
    if isinstance(value, bool):
        raise TypeError("a time span is a string or an integer of seconds")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value}: a time span is never negative")
        return value
    usec = parse_usec(value)
    if usec % USEC_PER_SEC:
        raise ValueError(f"{value!r} is not a whole number of seconds")
    return usec // USEC_PER_SEC
