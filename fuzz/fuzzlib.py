"""What the Python fuzzers in fuzz/ share: their command line and their closing report.

Not a fuzzer.  ``fuzz_record.py`` and ``fuzz_token.py`` import it from beside them (a
script's own folder is the first entry of ``sys.path``; not under ``python -P``);
tests/support/fuzzers.py loads it by path before it loads a fuzzer.
"""

from __future__ import annotations

import argparse
import os
import time


def arguments(doc: str, argv: list[str] | None) -> tuple[int, int]:
    """``--runs`` and ``--seed`` (a random one when not given) from ``argv``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    return args.runs, seed


def report(seed: int, runs: int, started: float, findings: list[str], *figures: str) -> int:
    """Print the run's figures and the first findings; the exit status (1: a finding)."""
    elapsed = time.monotonic() - started
    print(f"seed={seed} runs={runs} seconds={elapsed:.1f} rate={runs / elapsed:.0f}/s")
    for line in figures:
        print(line)
    print(f"findings: {len(findings)}")
    for finding in findings[:5]:
        print(finding)
    return 1 if findings else 0
