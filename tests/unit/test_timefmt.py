"""Times and spans as systemd shows them: against the real ``systemd-analyze`` of this host."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from support.parts import require_binary

from keyhandoff import timefmt

SPANS = [1, 59, 60, 61, 90, 3599, 3600, 5400, 5410, 86399, 86400, 90061, 604800, 2629800,
         31557600, 31557600 + 2629800 + 86400 * 3 + 7]
#: seconds from now: every branch of format_timestamp_relative()
RELATIVE = [30, 125, 400, 3 * 3600 + 610, 7 * 3600 + 60, 26 * 3600, 3 * 86400 + 60,
            10 * 86400 + 60, 40 * 86400 + 60, 800 * 86400, -300, -7200]


def analyze(*args: str) -> str:
    binary = require_binary("systemd-analyze", "apt-get install systemd")
    return subprocess.run([binary, *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


@pytest.mark.parametrize("seconds", SPANS)
def test_span_reads_as_systemd_analyze_timespan_says(seconds):
    human = re.search(r"Human: (.*)", analyze("timespan", f"{seconds}s"))
    assert human
    assert timefmt.span(seconds) == human.group(1).strip()


@pytest.mark.parametrize("offset", RELATIVE)
def test_timestamp_reads_as_systemd_analyze_timestamp_says(offset):
    # half a second into a second, so the microseconds systemd-analyze counts do not round
    while time.time() % 1 > 0.3:
        time.sleep(0.05)
    now = int(time.time())
    out = analyze("timestamp", f"@{now + offset}")
    normalized = re.search(r"Normalized form: (.*)", out)
    relative = re.search(r"From now: (.*)", out)
    assert normalized
    assert relative
    ours = timefmt.timestamp(now + offset, now=now)
    assert ours.split("; ")[0] == normalized.group(1).strip()
    # systemd's now is a fraction of a second later: a "left" is then one second less
    expected = {timefmt.left(offset), timefmt.left(offset - 1), timefmt.left(offset + 1)}
    assert relative.group(1).strip() in expected
    assert ours.split("; ")[1] == timefmt.left(offset)


def test_iso_and_usec_are_utc_and_microseconds():
    assert timefmt.iso(1796179905) == "2026-12-02T02:51:45Z"
    assert timefmt.usec(1796179905) == 1796179905_000000


def test_span_options_take_systemd_spans_within_bounds():
    assert timefmt.parse_span_seconds("1h 30min", most=86400) == 5400
    assert timefmt.parse_span_seconds("90", most=86400) == 90
    assert timefmt.parse_span("1.5s", most=60) == 1.5
    for bad in ("", "5x", "-5", "2d", "1.5s", "infinity"):
        with pytest.raises(ValueError, match=r"\S"):
            timefmt.parse_span_seconds(bad, most=86400)
