
"""Mutation fuzzer for the handoff-record parser (keyhandoff.record.open_record).

Run as a script: ``python fuzz/fuzz_record.py --runs 1000000 [--seed N]``.

Two kinds of input, alternating:

* **forged**: valid sealed records mutated (bit flips, byte writes, truncation, extension,
  splices between records, header-field rewrites, random bytes).  Without the record key
  none of these may ever be accepted: the only input ``open_record`` may return a record for
  is an unmodified seed.
* **authenticated**: random and mutated entry tables sealed *with* the key (a buggy or
  hostile writer holding it).  These may be accepted, but only if what comes back satisfies
  every documented invariant.

Anything other than a :class:`~keyhandoff.record.RecordRefused` is a crash.  Exits 1 on
any finding and prints a reproducer (hex) for the first few.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time
import traceback
import uuid

import fuzzlib

from keyhandoff import record as record_format
from keyhandoff import sealing
from keyhandoff.secret import Secret

NOW = 1_750_000_000
ARMING_BOOT = uuid.UUID(int=1)
THIS_BOOT = uuid.UUID(int=2)


def _seeds(key: Secret) -> list[bytes]:
    vk = Secret(bytearray(os.urandom(64)))
    sealed_pw = sealing.seal_to_volume_key(vk, Secret(b"fuzz-passphrase"), b"ctx")
    seeds = []
    for channel in record_format.RecordChannel:
        for count in (1, 2, 5):
            entries = []
            for i in range(count):
                volume = uuid.UUID(int=i + 10)
                entries.append(
                    record_format.Entry(
                        volume, record_format.EntryKind.ONETIME_KEY, Secret(os.urandom(32))
                    )
                )
                if i % 2:
                    entries.append(
                        record_format.Entry(
                            volume, record_format.EntryKind.SEALED_PASSPHRASE, Secret(sealed_pw)
                        )
                    )
            record = record_format.HandoffRecord(
                channel, NOW, NOW + 3600, 1 + count, ARMING_BOOT, tuple(entries)
            )
            seeds.append(record_format.seal(record, key))
    return seeds


def _entry(rng: random.Random) -> bytes:
    kind = rng.choice([1, 1, 2, 2, 0, 3, 255])
    if rng.random() < 0.7:
        length = 32 if kind == 1 else rng.randint(sealing.SEALED_OVERHEAD + 1, 120)
    else:
        length = rng.choice([0, 1, 31, 33, 45, 46, 2093, 2094, 65535, rng.randint(0, 300)])
    payload = rng.randbytes(min(length, 300) if rng.random() < 0.9 else rng.randint(0, 300))
    volume = uuid.UUID(int=rng.choice([1, 2, 3, rng.getrandbits(128)])).bytes
    return volume + struct.pack(">BH", kind, length) + payload


def _plaintext(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return rng.randbytes(rng.randint(1, 200))
    count = rng.choice([0, 1, 2, 3, 16, 17, 255, rng.randint(0, 20)])
    body = b"".join(_entry(rng) for _ in range(rng.randint(0, 4)))
    if rng.random() < 0.3 and body:
        cut = rng.randint(0, len(body))
        body = body[:cut] if rng.random() < 0.5 else body + rng.randbytes(rng.randint(1, 8))
    return bytes([count % 256]) + body


def _raw_seal(key: Secret, plaintext: bytes, rng: random.Random) -> bytes:
    created = NOW - rng.choice([0, 100, 10**6])
    lifetime = record_format.MAX_LIFETIME
    not_after = created + rng.choice([-1, 0, 1, 3600, lifetime, lifetime + 1])
    header = struct.pack(
        ">4sBBBQQ16s8s12s",
        record_format.MAGIC,
        1,
        rng.choice([1, 2, 3, 3, 0, 4]),
        rng.choice([0, 1, 2, 255]),
        max(created, 0),
        max(not_after, 0),
        rng.choice([ARMING_BOOT, THIS_BOOT, uuid.UUID(int=9)]).bytes,
        record_format.record_key_id(key),
        rng.randbytes(12),
    )
    with record_format._record_aead(key) as aead:  # noqa: SLF001
        out = bytearray(len(plaintext) + 16)
        aead.encrypt_into(header[-12:], plaintext, header, out)
    return header + bytes(out)


def _mutate(data: bytes, seeds: list[bytes], rng: random.Random) -> bytes:  # noqa: C901  (one branch per mutation)
    blob = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        op = rng.randrange(9)
        if op == 0 and blob:  # flip one bit
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
        elif op == 1 and blob:  # overwrite a byte
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif op == 2:  # truncate
            del blob[rng.randint(0, len(blob)) :]
        elif op == 3:  # extend
            blob += rng.randbytes(rng.choice([1, 16, rng.randint(1, 200)]))
        elif op == 4:  # splice with another seed
            other = rng.choice(seeds)
            cut = rng.randint(0, min(len(blob), len(other)))
            blob = blob[:cut] + bytearray(other[cut:])
        elif op == 5 and len(blob) >= record_format.HEADER_LEN:  # rewrite a header field
            start, end = rng.choice(
                [(4, 5), (5, 6), (6, 7), (7, 15), (15, 23), (23, 39), (39, 47), (47, 59)]
            )
            blob[start:end] = rng.randbytes(end - start)
        elif op == 6:  # delete a range
            a = rng.randint(0, len(blob))
            del blob[a : a + rng.randint(1, 20)]
        elif op == 7:  # insert a range
            a = rng.randint(0, len(blob))
            blob[a:a] = rng.randbytes(rng.randint(1, 20))
        elif op == 8:  # swap header of one seed onto the body of another
            other = rng.choice(seeds)
            blob = bytearray(other[: record_format.HEADER_LEN]) + blob[record_format.HEADER_LEN :]
    if rng.random() < 0.01:
        return rng.randbytes(rng.randint(0, 400))
    return bytes(blob)


def _check_invariants(record: record_format.HandoffRecord) -> str | None:  # noqa: PLR0911  (one per invariant)
    if not 1 <= len(record.entries) <= record_format.MAX_ENTRIES:
        return "entry count outside 1..16"
    if len({(e.volume, e.kind) for e in record.entries}) != len(record.entries):
        return "duplicate entries accepted"
    for e in record.entries:
        if (
            e.kind is record_format.EntryKind.ONETIME_KEY
            and len(e.payload) != record_format.ONETIME_KEY_LEN
        ):
            return "one-time key of the wrong length accepted"
        if not isinstance(e.payload, Secret):
            return "payload is not a Secret"
    if record.boots_left == 0 or record.boot_id == THIS_BOOT:
        return "exhausted or same-boot record accepted"
    if not record.created - record_format.CLOCK_SKEW <= NOW <= record.not_after:
        return "record outside its validity window accepted"
    if record.not_after - record.created > record_format.MAX_LIFETIME:
        return "lifetime over the maximum accepted"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; return 0 when nothing was found."""
    runs, seed = fuzzlib.arguments(__doc__, argv)
    rng = random.Random(seed)
    key = record_format.new_record_key()
    seeds = _seeds(key)
    seed_set = set(seeds)
    reasons: dict[str, int] = {}
    findings: list[str] = []
    accepted_authenticated = 0
    started = time.monotonic()
    for run in range(runs):
        authenticated = run % 4 == 3
        if authenticated:
            sealed = _raw_seal(key, _plaintext(rng), rng)
            blob = _mutate(sealed, seeds, rng) if rng.random() < 0.2 else sealed
            authenticated = blob == sealed
        else:
            blob = _mutate(rng.choice(seeds), seeds, rng)
        try:
            record = record_format.open_record(blob, key, now=NOW, boot_id=THIS_BOOT)
        except record_format.RecordRefused as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            continue
        except Exception:  # noqa: BLE001  (every other exception is a finding)
            findings.append(f"crash on {blob.hex()}\n{traceback.format_exc()}")
            continue
        problem = _check_invariants(record)
        record.wipe()
        if not authenticated and blob not in seed_set:
            findings.append(f"forged record accepted: {blob.hex()}")
        elif problem:
            findings.append(f"{problem}: {blob.hex()}")
        else:
            reasons["accepted"] = reasons.get("accepted", 0) + 1
            accepted_authenticated += authenticated
        if len(findings) >= 20:
            break
    return fuzzlib.report(
        seed, run + 1, started, findings,
        "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())),
        f"accepted authenticated (key-holder) records: {accepted_authenticated}",
    )


if __name__ == "__main__":
    sys.exit(main())
