"""Times and spans as systemd shows them, and the command line's span options.

:func:`timestamp` is ``Tue 2026-12-01 14:41:18 UTC; 9min left`` (systemd's
``format_timestamp()`` in local time, then ``format_timestamp_relative()``), :func:`span`
is ``1h 30min`` (``format_timespan()`` to the second).  ``systemd-analyze timestamp`` and
``systemd-analyze timespan`` print the same (tests/unit/test_timefmt.py compares them).
:func:`iso` and :func:`usec` are the machine forms the JSON output carries beside them.

The parser is :mod:`keyhandoff.timespan` (systemd's ``parse_time()``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Final

from keyhandoff.timespan import USEC_PER_SEC, parse_seconds, parse_usec

__all__ = ["iso", "left", "parse_span", "parse_span_seconds", "span", "timestamp", "usec"]

_MINUTE: Final = 60
_HOUR: Final = 3600
_DAY: Final = 86400
_WEEK: Final = 7 * _DAY
_MONTH: Final = 2_629_800
_YEAR: Final = 31_557_600

#: format_timespan()'s table, to the second
_SPAN_UNITS: Final = (("y", _YEAR), ("month", _MONTH), ("w", _WEEK), ("d", _DAY),
                      ("h", _HOUR), ("min", _MINUTE), ("s", 1))


def span(seconds: int) -> str:
    """``5400`` -> ``1h 30min``: systemd's ``format_timespan()`` at one-second accuracy."""
    if seconds <= 0:
        return "0"
    parts = []
    for suffix, size in _SPAN_UNITS:
        if seconds >= size:
            parts.append(f"{seconds // size}{suffix}")
            seconds %= size
    return " ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def left(seconds: int) -> str:
    """``540`` -> ``9min left``, ``-300`` -> ``5min ago``: ``format_timestamp_relative()``."""
    if seconds == 0:
        return "now"
    return f"{_relative(abs(seconds))} {'left' if seconds > 0 else 'ago'}"


def _relative(d: int) -> str:
    if d >= _YEAR:
        text = f"{_plural(d // _YEAR, 'year')} {_plural(d % _YEAR // _MONTH, 'month')}"
    elif d >= _MONTH:
        text = f"{_plural(d // _MONTH, 'month')} {_plural(d % _MONTH // _DAY, 'day')}"
    elif d >= _WEEK:
        text = f"{_plural(d // _WEEK, 'week')} {_plural(d % _WEEK // _DAY, 'day')}"
    elif d >= 2 * _DAY:
        text = _plural(d // _DAY, "day")
    elif d >= 25 * _HOUR:
        text = f"{_plural(d // _DAY, 'day')} {(d - _DAY) // _HOUR}h"
    elif d >= 6 * _HOUR:
        text = f"{d // _HOUR}h"
    elif d >= _HOUR:
        text = f"{d // _HOUR}h {d % _HOUR // _MINUTE}min"
    elif d >= 5 * _MINUTE:
        text = f"{d // _MINUTE}min"
    elif d >= _MINUTE:
        text = f"{d // _MINUTE}min {d % _MINUTE}s"
    else:
        text = f"{d}s"
    return text


def timestamp(unix: int, now: float | None = None) -> str:
    """``Tue 2026-12-01 14:41:18 UTC; 9min left`` (local time, as systemctl status shows)."""
    moment = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(unix))
    current = int(time.time() if now is None else now)
    return f"{moment}; {left(unix - current)}"


def iso(unix: int) -> str:
    """``2026-12-01T14:41:18Z``: ISO 8601 in UTC, for JSON."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usec(unix: int) -> int:
    """Microseconds since the epoch, as systemd's JSON carries realtime timestamps."""
    return unix * USEC_PER_SEC


def _within(text: str, value: float, least: float, most: float) -> None:
    if not least <= value <= most:
        raise ValueError(f"{text!r} is out of range ({span(int(least)) if least else '0'} "
                         f"to {span(int(most))})")


def parse_span(text: str, *, least: float = 0, most: float) -> float:
    """Seconds of a systemd time span (``90``, ``30min``, ``1h 30min``), within bounds.

    :class:`ValueError` with a sentence when it is not a span or out of bounds.
    """
    value = parse_usec(text) / USEC_PER_SEC
    _within(text, value, least, most)
    return value


def parse_span_seconds(text: str, *, least: int = 0, most: int) -> int:
    """:func:`parse_span` in whole seconds (``1.5s`` is refused, as the config refuses it)."""
    value = parse_seconds(text)
    _within(text, value, least, most)
    return value
