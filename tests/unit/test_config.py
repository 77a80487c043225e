"""The configuration file: defaults, the retention policy for automatic arming, refusals.

The layers, drop-ins, masking and the file:line of every message: test_config_layers.py.
"""

from __future__ import annotations

import pytest

from keyhandoff import config
from keyhandoff.errors import ConfigError


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "keyhandoff.conf"
    path.write_text(text)
    return config.load(str(path))


def test_no_file_at_all_is_the_defaults(tmp_path):
    conf = config.load(root=str(tmp_path))
    assert conf == config.Config()
    assert (conf.retain, conf.auto_arm, conf.wait_for_update) == (600, True, 8 * 3600)
    # captured passphrases wait for an update: the longer of the two
    assert conf.capture_timeout == 8 * 3600


def test_an_explicit_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.conf: No such file or directory"):
        config.load(str(tmp_path / "absent.conf"))


def test_the_shipped_vendor_file_is_the_defaults():
    from pathlib import Path  # noqa: PLC0415

    shipped = Path(__file__).resolve().parents[2] / "units" / "keyhandoff.conf"
    loaded = config.read(str(shipped))
    assert loaded.problems == ()
    assert loaded.config == config.Config()
    assert all(s.path == str(shipped) for s in loaded.settings)  # every default written out


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
    ("[update]\nauto_arm = 1\n", "must be bool, not an integer"),
    ("update = 1\n", "must be a table"),
])
def test_update_section_refusals(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, text)


def test_an_unknown_setting_is_only_a_warning(tmp_path):
    conf = load(tmp_path, "[update]\nauto_armed = false\n")  # a typo: warned, not fatal
    assert conf == config.Config()
    path = tmp_path / "keyhandoff.conf"
    (warning,) = config.read(str(path)).problems
    assert str(warning) == (f"{path}:2: unknown setting update.auto_armed "
                            "(did you mean auto_arm?), ignored")
    assert warning.severity == "warning"
