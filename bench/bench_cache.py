"""Put+get round trips per second: PassphraseCache against the keyctl command line, in the
same run.  Run as root: .venv/bin/python bench/bench_cache.py [--seconds 5]

Also the cost of padding (every secret payload stored as 4096 bytes so /proc/key-users
shows no length): the same put+get through ``put_key``/``get_key`` with ``padded=False``,
interleaved with the padded runs so that machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid

from keyhandoff import keyring
from keyhandoff.cache import PassphraseCache
from keyhandoff.secret import Secret


def ours(seconds: float) -> tuple[int, float]:
    cache = PassphraseCache()
    volume = str(uuid.uuid4())
    pw = Secret.passphrase(b"bench-" + uuid.uuid4().hex.encode())
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cache.put(volume, pw, timeout=60)
        cache.get(volume).wipe()
        n += 1
    dt = time.perf_counter() - t0
    cache.forget(volume)
    return n, dt


def unpadded(seconds: float) -> tuple[int, float]:
    """The same round trip, stored unpadded (as the non-secret chain state is)."""
    cache = PassphraseCache()
    desc = f"keyhandoff:luks:{uuid.uuid4()}"
    pw = Secret.passphrase(b"bench-" + uuid.uuid4().hex.encode())
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cache.put_key(desc, pw, timeout=60, padded=False)
        got = cache.get_key(desc, padded=False)
        assert got is not None  # noqa: S101
        got.wipe()
        n += 1
    dt = time.perf_counter() - t0
    cache.forget_key(desc)
    return n, dt


def keyctl(seconds: float) -> tuple[int, float]:
    ring = keyring.get_keyring_id(keyring.SESSION)
    desc = f"kh-bench-{uuid.uuid4().hex[:8]}"
    n = 0
    t0 = time.perf_counter()
    serial = ""
    while time.perf_counter() - t0 < seconds:
        # the same work through the CLI: add (payload on stdin), set timeout, read back
        serial = subprocess.run(["keyctl", "padd", "user", desc, str(ring)], input=b"bench",
                                capture_output=True, check=True).stdout.strip().decode()
        subprocess.run(["keyctl", "timeout", serial, "60"], check=True)
        subprocess.run(["keyctl", "pipe", serial], capture_output=True, check=True)
        n += 1
    dt = time.perf_counter() - t0
    subprocess.run(["keyctl", "unlink", serial, str(ring)], check=False, capture_output=True)
    return n, dt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    keyring.join_session_keyring()
    keyring.link(keyring.get_keyring_id(keyring.USER, create=True), keyring.SESSION)
    rounds = 3
    padded_rates, unpadded_rates = [], []
    for _ in range(rounds):
        p_n, p_dt = ours(args.seconds / rounds)
        u_n, u_dt = unpadded(args.seconds / rounds)
        padded_rates.append(p_n / p_dt)
        unpadded_rates.append(u_n / u_dt)
    a = statistics.median(padded_rates)
    u = statistics.median(unpadded_rates)
    b_n, b_dt = keyctl(args.seconds)
    b = b_n / b_dt
    print(f"put+get round trips per second: PassphraseCache {a:,.0f}/s, "
          f"keyctl CLI {b:,.0f}/s ({a / b:,.0f}x)")
    print(f"  per round trip: PassphraseCache {1e6 / a:.1f} us, keyctl {b_dt / b_n * 1e3:.2f} ms")
    print(f"  padding: unpadded {u:,.0f}/s ({1e6 / u:.1f} us), padded {a:,.0f}/s "
          f"({1e6 / a:.1f} us): {100 * (1 - a / u):.0f}% slower")

if __name__ == "__main__":
    main()
