"""Mutation fuzzer for the one-time token parser (keyhandoff.onetime.parse_token).

Run as a script: ``python fuzz/fuzz_token.py --runs 1000000 [--seed N]``.

Token JSON is whatever somebody wrote into a LUKS2 header.  Inputs are valid tokens
mutated as bytes (bit flips, byte writes, truncation, insertion, splices, invalid UTF-8)
and as JSON (a field replaced by a hostile value: floats, ``1e400``, NaN, huge or negative
integers, booleans, nested containers, wrong strings; fields dropped, duplicated or
added), plus random bytes.

``parse_token`` must return ``None`` or a slot, never raise; and what it accepts must
satisfy every rule of the token's documented shape, checked here independently of the
parser (:func:`_check`).  Exits 1 on any finding and prints reproducers (hex).
"""

from __future__ import annotations

import base64
import json
import random
import re
import sys
import time
import traceback
import uuid

import fuzzlib

from keyhandoff import onetime

FIELDS = ("type", "keyslots", "not_after", "boot_id", "record_key", "binding")

HOSTILE = [
    1e400, -1e400, 1.5, 0.0, -0.0, float("nan"), 0, -1, 2**63, 2**63 - 1, 2**64, 10**30,
    True, False, None, "", "x", "\udcff", "\u0000", [], {}, [[]], {"a": 1}, ["0", "1"],
    ["00"], ["32"], ["-1"], ["1e1"], [0], "3", "keyhandoff-onetime ", "KEYHANDOFF-ONETIME",
    "g" * 64, "A" * 64, "0" * 63, "0" * 65, "AAAA", "=" * 44, "a" * 5000,
]


def _valid(rng: random.Random) -> dict[str, object]:
    salt = rng.randbytes(32)
    keyslot = rng.randrange(32)
    return {
        "type": onetime.TOKEN_TYPE,
        "keyslots": [str(keyslot)],
        "not_after": rng.choice([1, 1_750_000_000, 2**63 - 1, rng.randrange(1, 2**40)]),
        "boot_id": str(uuid.UUID(bytes=rng.randbytes(16))),
        "record_key": base64.b64encode(rng.randbytes(32)).decode(),
        "binding": onetime.binding(keyslot, salt),
    }


def _dumps(data: object, rng: random.Random) -> bytes:
    sep = rng.choice([(",", ":"), (", ", ": "), (",", " : ")])
    return json.dumps(data, separators=sep, ensure_ascii=rng.random() < 0.5,
                      allow_nan=True).encode("utf-8", "surrogatepass")


def _json_mutation(rng: random.Random) -> bytes:
    data: dict[str, object] = _valid(rng)
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(7)
        name = rng.choice(FIELDS)
        if op == 0:
            data[name] = rng.choice(HOSTILE)
        elif op == 1:
            data.pop(name, None)
        elif op == 2:
            data[rng.choice(["extra", "Type", "keyslot", "record_key ", "binding2"])] = 1
        elif op == 3:  # the same key twice, as text (json.dumps cannot write it)
            text = _dumps(data, rng)
            return text[:-1] + b',"' + name.encode() + b'":' + _dumps(rng.choice(HOSTILE), rng) \
                + b"}"
        elif op == 4 and isinstance(data.get(name), str):
            value = str(data[name])
            i = rng.randrange(len(value) + 1)
            data[name] = value[:i] + rng.choice(["\udcff", "\u00e9", "A", "=", "", "0"]) + value[i:]
        elif op == 5:
            data = {"wrapped": data} if rng.random() < 0.5 else data
        elif op == 6:
            data["not_after"] = rng.choice([2**63, 2**63 - 1, 1, 0, -(2**63), 10**19, 10**18])
    if not isinstance(data, dict) or rng.random() < 0.05:
        return _dumps([data], rng)
    return _dumps(data, rng)


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    blob = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        op = rng.randrange(6)
        if op == 0 and blob:
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
        elif op == 1 and blob:
            blob[rng.randrange(len(blob))] = rng.choice([0x80, 0xC0, 0xFF, 0xED, 0x22, 0x5C])
        elif op == 2:
            del blob[rng.randint(0, len(blob)) :]
        elif op == 3:
            i = rng.randint(0, len(blob))
            blob[i:i] = rng.choice([b"\xff", b"\xed\xa0\x80", b"1e400", b"[", b"{", b"\\u0000",
                                    rng.randbytes(rng.randint(1, 8))])
        elif op == 4:
            blob += b" " * rng.choice([1, 600, onetime.MAX_TOKEN_BYTES])
        elif op == 5:
            i = rng.randint(0, len(blob))
            blob = blob[:i] + b"[" * rng.choice([10, 1000, 5000]) + blob[i:]
    return bytes(blob)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _check(raw: bytes, slot: onetime.OnetimeSlot) -> str | None:  # noqa: C901, PLR0911  (one per rule)
    """Every documented rule, checked without the parser's code."""
    if len(raw) > onetime.MAX_TOKEN_BYTES:
        return "over the size limit accepted"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8 accepted"
    pairs: list[list[tuple[str, object]]] = []
    data = json.loads(text, object_pairs_hook=lambda p: pairs.append(p) or dict(p))
    if any(len({k for k, _ in p}) != len(p) for p in pairs):
        return "duplicate key accepted"
    if not isinstance(data, dict) or sorted(data) != sorted(FIELDS):
        return "wrong set of fields accepted"
    if data["type"] != onetime.TOKEN_TYPE:
        return "wrong type accepted"
    if data["keyslots"] != [str(slot.keyslot)] or not 0 <= slot.keyslot < 32:
        return "keyslot accepted wrongly"
    if type(data["not_after"]) is not int or not 0 < data["not_after"] < 2**63:
        return "not_after out of range or not an integer accepted"
    if not _UUID.fullmatch(data["boot_id"]):
        return "non-canonical boot_id accepted"
    key = data["record_key"]
    if len(base64.b64decode(key, validate=True)) != 32 or not key.isascii():
        return "record key of the wrong size accepted"
    if not re.fullmatch(r"[0-9a-f]{64}", data["binding"]):
        return "malformed binding accepted"
    if (slot.not_after, slot.boot_id, slot.record_key_b64, slot.binding) != (
        data["not_after"], data["boot_id"], key, data["binding"]
    ):
        return "parsed fields differ from the text"
    return None


def one(raw: bytes) -> str | None:
    """Parse ``raw``; return a finding (text) or ``None``."""
    try:
        slot = onetime.parse_token(7, raw)
    except Exception:  # noqa: BLE001  (every exception is a finding)
        return f"crash on {raw.hex()}\n{traceback.format_exc()}"
    if slot is None:
        return None
    try:
        problem = _check(raw, slot)
    except Exception:  # noqa: BLE001
        return f"accepted text the checker cannot read: {raw.hex()}\n{traceback.format_exc()}"
    return None if problem is None else f"{problem}: {raw.hex()}"


def generate(rng: random.Random) -> bytes:
    """One fuzz input."""
    pick = rng.random()
    if pick < 0.45:
        return _json_mutation(rng)
    if pick < 0.9:
        return _byte_mutation(_dumps(_valid(rng), rng), rng)
    if pick < 0.95:
        return _dumps(_valid(rng), rng)
    return rng.randbytes(rng.randint(0, 300))


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; return 0 when nothing was found."""
    runs, seed = fuzzlib.arguments(__doc__, argv)
    rng = random.Random(seed)
    findings: list[str] = []
    accepted = 0
    started = time.monotonic()
    run = 0
    for run in range(runs):  # noqa: B007  (reported after the loop)
        raw = generate(rng)
        finding = one(raw)
        if finding is not None:
            findings.append(finding)
            if len(findings) >= 20:
                break
        elif onetime.parse_token(7, raw) is not None:
            accepted += 1
    return fuzzlib.report(seed, run + 1, started, findings, f"accepted (valid) tokens: {accepted}")


if __name__ == "__main__":
    sys.exit(main())
