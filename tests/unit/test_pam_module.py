"""The payload parsers of pam_keyhandoff.so (csrc/kh_payload.c) under ASan and UBSan.

fuzz/pam_payload_fuzz.c is built with the driver (fuzz/driver.c, no libFuzzer needed): it
runs the known answers that used to be this file's Python cases (last entry: trailing NULs,
empty, NUL only; padded: good, bad padding, too long), then a fixed number of inputs from a
seeded PRNG, each checked against an independent statement of the rules (output inside the
input, 1..2048 bytes, no NUL, exact padded rules).  Options, one-shot and keep run against
the real module under Linux-PAM in tests/integration/test_pam.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.parts import require_binary

REPO = Path(__file__).resolve().parents[2]
INPUTS = 20_000


def _build(tmp_path: Path) -> Path:
    cc = require_binary("cc", "apt-get install gcc")
    exe = tmp_path / "pam_payload_fuzz"
    proc = subprocess.run(
        [cc, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-DKH_FUZZ_DRIVER",
         f"-I{REPO / 'csrc'}", "-o", str(exe),
         str(REPO / "fuzz" / "pam_payload_fuzz.c"), str(REPO / "fuzz" / "driver.c"),
         str(REPO / "csrc" / "kh_payload.c")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False,
                          timeout=300, env=env)


def test_payload_parsers_hold_their_invariants(tmp_path):
    exe = _build(tmp_path)
    for seed in ("1", "20261201"):
        proc = _run(exe, str(INPUTS), seed)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"{INPUTS} inputs, seed {seed}: all invariants held" in proc.stdout


def test_the_harness_catches_a_broken_parser(tmp_path):
    """A parser that accepts a non-zero padding byte must make the harness abort."""
    broken = tmp_path / "kh_payload_broken.c"
    source = (REPO / "csrc" / "kh_payload.c").read_text()
    needle = "        if (payload[i] != 0)\n            return -1;"
    assert needle in source
    # kh_payload.h: found through -I csrc below, although the copy is elsewhere
    broken.write_text(source.replace(needle, "        (void)payload[i];"))
    cc = require_binary("cc", "apt-get install gcc")
    exe = tmp_path / "fuzz_broken"
    subprocess.run(
        [cc, "-std=gnu11", "-O1", "-fsanitize=address,undefined", "-DKH_FUZZ_DRIVER",
         f"-I{REPO / 'csrc'}", "-o", str(exe), str(REPO / "fuzz" / "pam_payload_fuzz.c"),
         str(REPO / "fuzz" / "driver.c"), str(broken)],
        check=True, capture_output=True,
    )
    proc = _run(exe, str(INPUTS), "1")
    assert proc.returncode != 0
    assert "invariant failed" in proc.stderr
