"""The configuration file: defaults, the retention policy for automatic arming, refusals."""

from __future__ import annotations

import pytest

from keyhandoff import config
from keyhandoff.errors import ConfigError


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "keyhandoff.conf"
    path.write_text(text)
    return config.load(str(path))


def test_missing_file_is_the_defaults(tmp_path):
    conf = config.load(str(tmp_path / "absent.conf"))
    assert conf == config.Config()
    assert (conf.retain, conf.auto_arm, conf.wait_for_update) == (600, True, 8 * 3600)
    # captured passphrases wait for an update: the longer of the two
    assert conf.capture_timeout == 8 * 3600


def test_the_shipped_example_is_the_defaults():
    from pathlib import Path  # noqa: PLC0415

    shipped = Path(__file__).resolve().parents[2] / "units" / "keyhandoff.conf"
    assert config.load(str(shipped)) == config.Config()


@pytest.mark.parametrize(("value", "seconds"), [
    ('"8h"', 28800), ('"30min"', 1800), ('"1h 30min"', 5400), ("7200", 7200), ('"90"', 90),
    ('"24h"', 86400), ("0", 0), ('"0"', 0),
])
def test_wait_for_update_spans(tmp_path, value, seconds):
    conf = load(tmp_path, f"[capture]\nwait_for_update = {value}\n")
    assert conf.wait_for_update == seconds


@pytest.mark.parametrize(("value", "match"), [
    ('"25h"', "0..24h"), ("86401", "0..24h"), ('"1.5s"', "whole number"), ('"8 hours!"', "not a"),
    ('"infinity"', "infinity"), ("true", "time span"), ("-1", "negative"), ("1.5", "time span"),
])
def test_wait_for_update_refusals(tmp_path, value, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, f"[capture]\nwait_for_update = {value}\n")


def test_capture_timeout_is_the_longer_with_auto_arm(tmp_path):
    conf = load(tmp_path, '[capture]\nretain = 900\nwait_for_update = "2h"\n')
    assert conf.capture_timeout == 7200
    conf = load(tmp_path, '[capture]\nretain = 900\nwait_for_update = "5min"\n')
    assert conf.capture_timeout == 900


def test_capture_timeout_without_auto_arm_is_retain(tmp_path):
    conf = load(tmp_path, "[capture]\nretain = 900\n[update]\nauto_arm = false\n")
    assert conf.capture_timeout == 900


def test_capture_off_stays_off(tmp_path):
    conf = load(tmp_path, '[capture]\nretain = 0\nwait_for_update = "8h"\n')
    assert conf.capture_timeout == 0


@pytest.mark.parametrize(("text", "match"), [
    ("[update]\nauto_arm = 1\n", "must be bool"),
    ("[update]\nauto_armed = true\n", "unknown setting update.auto_armed"),
    ("update = 1\n", "must be a table"),
])
def test_update_section_refusals(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, text)
