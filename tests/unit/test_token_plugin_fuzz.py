"""The token plugin's parsers (csrc/token_record.c) under ASan and UBSan: the CI smoke runs.

fuzz/token_record_fuzz.c is built twice: with the deterministic driver (cc, fuzz/driver.c, a
fixed number of generated inputs per seed), and as the libFuzzer target (clang
``-fsanitize=fuzzer,address,undefined``) for a short bounded run.  Each input is checked
against an independent statement of record.py's rules; the long run (>= 10 million inputs)
is made outside CI, by hand, with the same libFuzzer build.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.parts import require_binary

REPO = Path(__file__).resolve().parents[2]
INPUTS = 10_000
SOURCES = (REPO / "fuzz" / "token_record_fuzz.c", REPO / "csrc" / "token_record.c",
           REPO / "csrc" / "token_json.c")
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
#: the deterministic build: main() from fuzz/driver.c instead of libFuzzer's
DRIVER = ("-DKH_FUZZ_DRIVER", str(REPO / "fuzz" / "driver.c"))


def _build(compiler: str, exe: Path, *flags: str, record_c: Path = SOURCES[1]) -> None:
    proc = subprocess.run(
        [compiler, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *flags,
         f"-I{REPO / 'csrc'}", "-o", str(exe), str(SOURCES[0]), str(record_c), str(SOURCES[2]),
         "-lcrypto"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          timeout=300, env=env, cwd=cwd)


def test_the_parsers_hold_their_invariants(tmp_path):
    exe = tmp_path / "token_record_fuzz"
    _build(require_binary("cc", "apt-get install gcc"), exe, *SANITIZE, *DRIVER)
    for seed in ("1", "20261201"):
        proc = _run(str(exe), str(INPUTS), seed)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"{INPUTS} inputs, seed {seed}: all invariants held" in proc.stdout


def test_the_libfuzzer_target_runs_clean(tmp_path):
    exe = tmp_path / "token_record_fuzz"
    _build(require_binary("clang", "apt-get install clang"), exe,
           "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = _run(str(exe), "-runs=10000", "-max_len=4096", "-seed=1", str(corpus), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 10000 runs" in proc.stderr


def test_the_harness_catches_a_broken_parser(tmp_path):
    """An entry parser that lets a duplicate entry through must make the harness abort."""
    source = SOURCES[1].read_text()
    needle = "            if (memcmp(pt + starts[i], pt + starts[j], 17) == 0)\n"
    assert needle in source
    broken = tmp_path / "token_record_broken.c"
    broken.write_text(source.replace(needle, "            if (0 && pt == NULL)\n")
                      .replace('#include "token_record.h"',
                               f'#include "{REPO}/csrc/token_record.h"'))
    exe = tmp_path / "fuzz_broken"
    _build(require_binary("cc", "apt-get install gcc"), exe, *SANITIZE, *DRIVER,
           record_c=broken)
    proc = _run(str(exe), str(INPUTS), "1")
    assert proc.returncode != 0
    assert "invariant failed" in proc.stderr
