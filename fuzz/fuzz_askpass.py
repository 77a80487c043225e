# a standalone script, not a package; a seeded PRNG replays runs
"""Fuzz the ask-file parser and the C unescaper (not run in CI).

    .venv/bin/python fuzz/fuzz_askpass.py --runs 1000000 [--seed N] [--crash-dir DIR]

A plain mutation loop (atheris has no wheel for this interpreter): each run takes a seed
ask file or escape string, applies a few random byte-level and line-level mutations (bit
flips, inserted newlines, NULs, CRs, duplicated or swapped lines, spliced escapes, random
UTF-8), and checks the contracts:

* ``parse_ask_file`` returns an ``AskRequest`` or raises ``HostileAskFile``; nothing else;
  an accepted request has a PID in range, an absolute Socket= and an Id that classifies;
* ``cunescape`` returns bytes or raises ``InvalidEscape``; nothing else;
* ``cunescape(cescape(b)) == b`` for NUL-free ``b``; ``cescape`` output is printable ASCII.

Any other outcome is written to the crash directory and counted; the exit status is 1 if
there was any.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keyhandoff.askpass import (
    AskRequest,
    HostileAskFile,
    InvalidEscape,
    classify_id,
    parse_ask_file,
)
from keyhandoff.cescape import cescape, cunescape

ASK_SEEDS = [
    (
        b"[Ask]\nPID=12091\nSocket=/run/systemd/ask-password/sck.a40583849376d20\n"
        b"AcceptCached=1\nEcho=0\nNotAfter=1381672946\nSilent=0\n"
        b"Message=Please enter passphrase for disk foo:\nIcon=drive-harddisk\n"
        b"Id=cryptsetup:/dev/disk/by-uuid/1234\n"
    ),
    (
        b"[Ask]\nPID=1\nSocket=/run/systemd/ask-password/sck.1\nAcceptCached=0\nEcho=1\n"
        b"NotAfter=0\nSilent=1\nId=cryptsetup-verification:/dev/disk/by-label/x\\040y\n"
    ),
    b"[Ask]\nPID=77\nSocket=//run/systemd/ask-password//sck.f\n# comment\n; other\n\nMessage=PIN\n",
    b"[Ask]\nPID=5\nSocket=/s\nId=cryptsetup:\\303\\251\\x41\\u00e9\\U0001F600\\s\\n\n",
]
ESCAPE_SEEDS = [
    b"/dev/disk/by-uuid/1234",
    b"\\a\\b\\f\\n\\r\\t\\v\\\\\\\"\\'\\s",
    b"\\x41\\101\\u00e9\\U0001F600",
    b"\\x00\\000\\u0000\\U00000000\\400\\xg1\\?",
    b"\\",
]
TOKENS = [
    b"\n",
    b"\x00",
    b"\r",
    b"=",
    b"[",
    b"]",
    b"[Ask]",
    b"#",
    b";",
    b"\\",
    b"\\x",
    b"\\u",
    b"\\U",
    b"\\0",
    b"\\377",
    b"Socket=",
    b"PID=",
    b"Id=",
    b"NotAfter=",
    b"AcceptCached=",
    b"cryptsetup:",
    b"cryptsetup-verification:",
    b"\xff",
    b"\xc3",
    b"\xe2\x80\xa8",
    b" ",
    b"\t",
    b"-1",
    b"0",
    b"4194305",
    b"18446744073709551616",
    b"yes",
    b"off",
    b"Y",
    b"\xc4\xb0",
]


class FuzzFailure(Exception):
    """A contract of the code under test did not hold."""


def require(condition: bool, what: str) -> None:
    """Raise :class:`FuzzFailure` unless ``condition`` holds (asserts vanish under -O)."""
    if not condition:
        raise FuzzFailure(what)


def _line_mutation(rng: random.Random, buf: bytearray) -> bytearray:
    lines = bytes(buf).split(b"\n")
    if rng.random() < 0.5:
        lines.insert(rng.randint(0, len(lines)), rng.choice(lines))
    else:
        rng.shuffle(lines)
    return bytearray(b"\n".join(lines))


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Apply 1..6 random mutations to ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.randrange(9)
        pos = rng.randint(0, len(buf))
        if choice == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buf[pos:pos] = rng.choice(TOKENS)
        elif choice == 2 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif choice == 3:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif choice in {4, 5}:
            buf = _line_mutation(rng, buf)
        elif choice == 6:
            buf[pos:pos] = chr(rng.randrange(0x20, 0x110000)).encode("utf-8", "surrogatepass")
        elif choice == 7:
            buf[pos:pos] = rng.choice(ESCAPE_SEEDS)
        elif choice == 8 and rng.random() < 0.01:
            buf += b"M" * rng.randint(60000, 70000)  # around the size cap
    return bytes(buf)


def check_parse(data: bytes) -> bool:
    """``parse_ask_file`` accepts with sane fields or raises ``HostileAskFile``."""
    try:
        request = parse_ask_file(data)
    except HostileAskFile:
        return False
    require(isinstance(request, AskRequest), "not an AskRequest")
    require(0 < request.pid <= 4 * 1024 * 1024, "PID out of range")
    require(request.socket.startswith("/"), "relative Socket=")
    require(0 <= request.not_after < 2**64, "NotAfter out of range")
    classify_id(request.id)  # must not raise for an accepted file
    return True


def check_unescape(data: bytes) -> bool:
    """``cunescape`` gives NUL-free bytes or raises ``InvalidEscape``."""
    try:
        out = cunescape(data)
    except InvalidEscape:
        return False
    require(isinstance(out, bytes), "not bytes")
    require(b"\x00" not in out, "NUL in output")
    return True


def check_round_trip(data: bytes) -> bool:
    """``cescape`` writes printable ASCII that ``cunescape`` reads back exactly."""
    raw = data.replace(b"\x00", b"")
    escaped = cescape(raw)
    require(escaped.isascii() and escaped.isprintable(), "cescape wrote non-printable text")
    require(cunescape(escaped) == raw, "round trip changed the bytes")
    return True


def one(rng: random.Random) -> tuple[str, bytes]:
    """Pick a check and generate its input."""
    roll = rng.random()
    if roll < 0.6:
        return "parse", mutate(rng, rng.choice(ASK_SEEDS))
    if roll < 0.85:
        return "unescape", mutate(rng, rng.choice(ESCAPE_SEEDS))
    if roll < 0.95:
        return "roundtrip", rng.randbytes(rng.randint(0, 64))
    return "parse", rng.randbytes(rng.randint(0, 256))


CHECKS = {"parse": check_parse, "unescape": check_unescape, "roundtrip": check_round_trip}


def main() -> int:
    """Run the loop; exit status 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    default_dir = Path(tempfile.gettempdir()) / "keyhandoff-fuzz-crashes"
    parser.add_argument("--crash-dir", type=Path, default=default_dir)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    crashes = 0
    counts = dict.fromkeys(CHECKS, 0)
    accepted = dict.fromkeys(CHECKS, 0)
    start = time.monotonic()
    for run in range(args.runs):
        kind, data = one(rng)
        counts[kind] += 1
        try:
            accepted[kind] += CHECKS[kind](data)
        except Exception:  # noqa: BLE001  # any other exception is exactly what we look for
            crashes += 1
            args.crash_dir.mkdir(parents=True, exist_ok=True)
            stem = args.crash_dir / f"{kind}-{seed}-{run}"
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(traceback.format_exc())
        if run and run % 200_000 == 0:
            sys.stdout.write(f"{run} runs, {crashes} crashes, {time.monotonic() - start:.0f} s\n")
            sys.stdout.flush()
    elapsed = time.monotonic() - start
    sys.stdout.write(
        f"seed {seed}: {args.runs} runs {counts}, accepted {accepted}, "
        f"in {elapsed:.0f} s, {crashes} crashes\n"
    )
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
