"""Every unit file passes the real ``systemd-analyze verify`` with no warning at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.parts import require_binary

UNITS = sorted((Path(__file__).resolve().parents[2] / "units").glob("*.service"))


def verify(unit: Path, tmp_path: Path) -> str:
    """Warnings and errors of systemd-analyze verify (ExecStart pointed at our build)."""
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    # the console script beside us (venv), or the Debian-stack build's (debian-stack-test)
    stack = os.environ.get("KEYHANDOFF_TEST_STACK_DIR")
    exe = str(Path(stack, "bin") if stack else Path(sys.executable).parent) + "/keyhandoff"
    assert Path(exe).exists(), "keyhandoff is not installed in this environment"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/bin/keyhandoff", exe))
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "SYSTEMD_LOG_LEVEL": "notice"})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"exit {proc.returncode}"]
    return "\n".join(lines)


def test_units_exist():
    assert {u.name for u in UNITS} >= {
        "keyhandoff-agent.service", "keyhandoff-restore.service", "keyhandoff-finish.service",
        "keyhandoff-login.service", "keyhandoff-rearm.service",
    }


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies_cleanly(unit, tmp_path):
    assert verify(unit, tmp_path) == ""


def test_the_check_sees_a_broken_unit(tmp_path):
    broken = tmp_path / "src" / "keyhandoff-broken.service"
    broken.parent.mkdir()
    broken.write_text(UNITS[0].read_text().replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in verify(broken, tmp_path)
