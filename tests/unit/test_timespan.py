"""The time-span parser against the real ``systemd-analyze timespan`` of this host."""

from __future__ import annotations

import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.parts import require_binary

from keyhandoff.timespan import parse_seconds, parse_usec

# What the config documents, edge cases of systemd's parser, and strings it refuses.
EXAMPLES = [
    "8h", "30min", "1h 30min", "1h30min", "90", "0", "00", "1.5h", ".5h", "5 min",
    "2 h 3 m", "1h 30min 10s", "1d", "1w", "1M", "1y", "10 sec", "3seconds", "1hr",
    "1minute", "2minutes", "1.25 min", "5msec", "100us", "5μs", "5µs", " 8h ", "+5",
    "12.34 .56", "12.34s.56", "5m5", "1 2", "3 days 2h", "1 h30min", "24h", "86400",
    "86401", "1.000001", "0.0000001s",
    # refused by systemd
    "", " ", "h", "5x", "5 x", "1.s", "5.h", "1.2.3", "1h.", "1e3", "01:00", "1,5h", "1h,5m",
    "0x10", "1_000", "1secs", "5 . 5", "-5", "- 5", "+-5", "+.5", "infinity", " infinity ",
    "9223372036854775807", "9223372036854775808", "18446744073709551614us",
]


def systemd_usec(text: str) -> int | None:
    """What systemd-analyze says: microseconds, or None when it refuses the string."""
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    proc = subprocess.run([analyze, "timespan", "--", text], capture_output=True,
                          text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return None
    m = re.search(r"μs: (\d+)", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1))


def ours(text: str) -> int | None:
    try:
        return parse_usec(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text", EXAMPLES)
def test_same_as_systemd(text):
    expected = systemd_usec(text)
    if text.strip() == "infinity":
        assert expected == 2**64 - 1  # systemd's infinity, which we refuse on purpose
        assert ours(text) is None
        return
    assert ours(text) == expected


_PIECE = st.tuples(
    st.sampled_from(["", "+", " ", "  "]),
    st.from_regex(r"[0-9]{0,3}(\.[0-9]{0,3})?", fullmatch=True),
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(["", "s", "sec", "min", "m", "ms", "msec", "h", "hr", "hours", "d",
                     "w", "M", "y", "us", "μs", "x", ".", "secs"]),
)


@settings(max_examples=150)
@given(st.lists(_PIECE, min_size=1, max_size=3))
def test_random_spans_same_as_systemd(pieces):
    text = "".join("".join(p) for p in pieces)
    assert ours(text) == systemd_usec(text), text


def test_seconds():
    assert parse_seconds("8h") == 28800
    assert parse_seconds("1h 30min") == 5400
    assert parse_seconds(600) == 600
    assert parse_seconds("600") == 600
    with pytest.raises(ValueError, match="whole number of seconds"):
        parse_seconds("1.5s")
    with pytest.raises(ValueError, match="negative"):
        parse_seconds(-1)
    with pytest.raises(TypeError):
        parse_seconds(True)  # noqa: FBT003  # TOML true is no span
