"""The token plugin's parsers (csrc/token_record.c, token_json.c) against the Python ones.

Those two files are built as a small shared object and called through ctypes (the real C
code, no copy of its rules): every generated token text gets the same verdict from
:func:`keyhandoff.onetime.parse_token` and ``kht_parse_token`` (and the same fields), every
generated record the same verdict from :func:`keyhandoff.record.open_record` and
``khr_open`` (and the same key).  The plugin's ABI entry points that need no LUKS header
are called on the built plugin itself.  The whole path through libcryptsetup is
tests/integration/test_token_plugin.py.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.parts import require, require_binary

from keyhandoff import onetime, record
from keyhandoff.errors import RecordRefused
from keyhandoff.secret import Secret

REPO = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000
BOOT = uuid.UUID("0b0b0b0b-0000-4000-8000-000000000001")
VOLUME = uuid.UUID("5e1f5e1f-0000-4000-8000-000000000002")
NAMES = {
    0: "ok", 1: "unknown-format", 2: "malformed", 3: "foreign", 4: "tampered",
    5: "exhausted", 6: "expired", 7: "not-yet-valid", 8: "same-boot", 9: "no-entry",
}
PY_NAMES = {
    "RecordUnknownFormat": "unknown-format", "RecordMalformed": "malformed",
    "RecordForeign": "foreign", "RecordTampered": "tampered", "RecordExhausted": "exhausted",
    "RecordExpired": "expired", "RecordNotYetValid": "not-yet-valid",
    "RecordSameBoot": "same-boot",
}


class Token(ctypes.Structure):
    _fields_ = [
        ("keyslot", ctypes.c_int),
        ("not_after", ctypes.c_int64),
        ("boot_id", ctypes.c_char * 37),
        ("record_key", ctypes.c_uint8 * 32),
        ("binding", ctypes.c_char * 65),
    ]


def _cc(*args: str) -> None:
    cc = require_binary("cc", "apt-get install build-essential")
    proc = subprocess.run([cc, *args], capture_output=True, text=True, check=False)
    require(proc.returncode == 0, f"building token_record.c ({proc.stderr.strip()[-400:]})",
            "apt-get install libssl-dev libcryptsetup-dev libjson-c-dev")


@pytest.fixture(scope="module")
def c_parsers(tmp_path_factory):
    out = tmp_path_factory.mktemp("token-record") / "token_record.so"
    _cc("-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-o", str(out),
        str(REPO / "csrc" / "token_record.c"), str(REPO / "csrc" / "token_json.c"), "-lcrypto")
    lib = ctypes.CDLL(str(out))
    lib.kht_parse_token.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(Token)]
    lib.khr_open.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                             ctypes.c_int64, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    return lib


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin")
    proc = subprocess.run([str(REPO / "csrc" / "build-token"), str(out)], capture_output=True,
                          text=True, check=False)
    require(proc.returncode == 0, f"building the token plugin ({proc.stderr.strip()[-400:]})",
            "apt-get install libcryptsetup-dev libssl-dev libjson-c-dev")
    return out / "libcryptsetup-token-keyhandoff-onetime.so"


# --------------------------------------------------------------------------- tokens

GOOD = {
    "type": "keyhandoff-onetime",
    "keyslots": ["3"],
    "not_after": 1_767_225_600,
    "boot_id": "0a1b2c3d-0000-4000-8000-00000000abcd",
    "record_key": base64.b64encode(bytes(range(32))).decode(),
    "binding": "0123456789abcdef" * 4,
}


def _verdicts(lib, raw: bytes) -> tuple[object, object]:
    parsed = onetime.parse_token(0, raw)
    token = Token()
    rc = lib.kht_parse_token(raw, len(raw), ctypes.byref(token))
    in_python = None if parsed is None else (
        parsed.keyslot, parsed.not_after, parsed.boot_id, parsed.record_key_b64, parsed.binding)
    in_c = None if rc != 0 else (
        token.keyslot, token.not_after, token.boot_id.decode(),
        base64.b64encode(bytes(token.record_key)).decode(), token.binding.decode())
    return in_python, in_c


FIXED_TOKENS = [
    json.dumps(GOOD).encode(),
    json.dumps(GOOD, separators=(",", ":")).encode(),
    json.dumps(GOOD, indent="\t").encode(),
    b" \r\n" + json.dumps(GOOD).encode() + b"\n ",
    json.dumps(GOOD).replace('"type"', '"\\u0074ype"').encode(),
    json.dumps(GOOD).replace('"3"', '"\\u0033"').encode(),
    json.dumps(GOOD).replace('"3"', '"\\u00333"').encode(),
    json.dumps(GOOD).replace('"3"', '"31"').encode(),
    json.dumps(GOOD).replace('"3"', '"32"').encode(),
    json.dumps(GOOD).replace('"3"', '"03"').encode(),
    json.dumps(GOOD).replace('["3"]', '["3", "4"]').encode(),
    json.dumps(GOOD).replace('["3"]', "[3]").encode(),
    json.dumps(GOOD).replace('["3"]', "[]").encode(),
    json.dumps(GOOD).replace("1767225600", "1767225600.0").encode(),
    json.dumps(GOOD).replace("1767225600", "1.7e9").encode(),
    json.dumps(GOOD).replace("1767225600", "-1").encode(),
    json.dumps(GOOD).replace("1767225600", "0").encode(),
    json.dumps(GOOD).replace("1767225600", "9223372036854775807").encode(),
    json.dumps(GOOD).replace("1767225600", "9223372036854775808").encode(),
    json.dumps(GOOD).replace("1767225600", "00000000000000000001").encode(),
    json.dumps(GOOD).replace("1767225600", "true").encode(),
    json.dumps(GOOD).replace("1767225600", "NaN").encode(),
    json.dumps(GOOD).replace("1767225600", "Infinity").encode(),
    json.dumps(GOOD).replace("1767225600", '"1767225600"').encode(),
    json.dumps(GOOD)[:-1].encode() + b', "binding": "' + b"0" * 64 + b'"}',
    json.dumps(GOOD)[:-1].encode() + b', "extra": 1}',
    json.dumps(GOOD)[:-1].encode() + b",}",
    json.dumps(GOOD).encode() + b"x",
    json.dumps(GOOD).encode() + b"{}",
    json.dumps(GOOD).replace("abcd", "ABCD").encode(),
    json.dumps(GOOD).replace("0a1b2c3d-", "{0a1b2c3d-").encode(),
    json.dumps(GOOD).replace("0123456789abcdef", "0123456789ABCDEF", 1).encode(),
    json.dumps(GOOD).replace("keyhandoff-onetime", "keyhandoff-onetimf").encode(),
    json.dumps(GOOD).replace("keyhandoff-onetime", "keyhandoff-onetim\\u00e9").encode(),
    json.dumps({**GOOD, "type": "keyhandoff-onétime"}, ensure_ascii=False).encode(),
    json.dumps({**GOOD, "record_key": base64.b64encode(bytes(31)).decode()}).encode(),
    json.dumps({**GOOD, "record_key": base64.b64encode(bytes(33)).decode()}).encode(),
    json.dumps({**GOOD, "record_key": GOOD["record_key"][:-2] + "9="}).encode(),
    json.dumps({**GOOD, "record_key": GOOD["record_key"].rstrip("=")}).encode(),
    json.dumps({**GOOD, "keyslots": "3"}).encode(),
    json.dumps([GOOD]).encode(),
    json.dumps(GOOD).replace(": ", ":\x00").encode(),
    json.dumps(GOOD).replace("-onetime", "-one\ttime").encode(),
    json.dumps(GOOD).replace("-onetime", "-one\\ttime").encode(),
    json.dumps(GOOD) .replace('"binding"', '"binding\\/"').encode(),
    b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),
    json.dumps(GOOD).encode() + b" " * 1100,
    b"", b"{}", b"{", b"null", b"[]",
]


@pytest.mark.parametrize("raw", FIXED_TOKENS, ids=range(len(FIXED_TOKENS)))
def test_fixed_tokens_get_the_same_verdict(c_parsers, raw):
    in_python, in_c = _verdicts(c_parsers, raw)
    assert in_c == in_python


def test_the_token_table_has_both_verdicts(c_parsers):
    """The table is no use if every case is refused (or accepted)."""
    accepted = sum(_verdicts(c_parsers, raw)[0] is not None for raw in FIXED_TOKENS)
    assert 5 <= accepted < len(FIXED_TOKENS) - 20


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.sampled_from(["3", "32", GOOD["boot_id"], GOOD["record_key"], GOOD["binding"]]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)


@st.composite
def token_texts(draw) -> bytes:
    fields = dict(GOOD)
    for name in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=2)):
        if draw(st.booleans()):
            fields[name] = draw(json_values)
        else:
            fields.pop(name, None)
    text = json.dumps(fields, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
                      ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(max_size=3)) + text[at + draw(st.integers(0, 3)):]
    return text


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=token_texts())
def test_generated_tokens_get_the_same_verdict(c_parsers, raw):
    in_python, in_c = _verdicts(c_parsers, raw)
    assert in_c == in_python


# --------------------------------------------------------------------------- records

RECORD_KEY = bytes(range(100, 132))


def _python_verdict(blob: bytes, now: int, boot: uuid.UUID) -> tuple[str, bytes | None]:
    # khr_open opens a one-time key record of either channel that carries one (efi, kexec):
    # the store checked that it came from where records of its channel travel, as restore's
    # source check does (channels/efi.py _open_record); so: its own channel if kexec
    kexec = len(blob) > 5 and blob[5] == record.RecordChannel.KEXEC
    try:
        opened = record.open_record(blob, Secret(bytearray(RECORD_KEY)), now=now, boot_id=boot,
                                    channel=record.RecordChannel.KEXEC if kexec
                                    else record.RecordChannel.EFI)
    except RecordRefused as exc:
        return PY_NAMES[type(exc).__name__], None
    with opened:
        for e in opened.entries:
            if e.volume == VOLUME and e.kind is record.EntryKind.ONETIME_KEY:
                return "ok", bytes(e.payload.view())
    return "no-entry", None


def _c_verdict(lib, blob: bytes, now: int, boot: uuid.UUID) -> tuple[str, bytes | None]:
    out = ctypes.create_string_buffer(32)
    rc = lib.khr_open(blob, len(blob), RECORD_KEY, now, boot.bytes, VOLUME.bytes, out)
    return NAMES[rc], (out.raw if rc == 0 else None)


entries = st.lists(
    st.tuples(st.sampled_from([VOLUME, uuid.UUID(int=7), uuid.UUID(int=8)]),
              st.sampled_from(list(record.EntryKind)), st.integers(0, 60)),
    min_size=1, max_size=4, unique_by=lambda e: (e[0], e[1]),
)


@st.composite
def records(draw) -> tuple[bytes, int, uuid.UUID]:
    # NOW inside the record's life (or before it, in the future beyond the clock skew), past
    # it, or at a boundary: the clock skew, the deadline; the longest lifetimes
    lifetime = draw(st.one_of(st.integers(1, record.MAX_LIFETIME),
                              st.integers(record.MAX_LIFETIME - 3600, record.MAX_LIFETIME)))
    created = NOW + draw(st.one_of(
        st.integers(-lifetime, 1000),
        st.integers(-8 * 86400, -lifetime - 1),
        st.integers(record.CLOCK_SKEW - 20, record.CLOCK_SKEW + 20),
        st.integers(-lifetime - 3, -lifetime + 3),
    ))
    boot = draw(st.sampled_from([BOOT, uuid.UUID(int=3)]))
    items = []
    for volume, kind, extra in draw(entries):
        size = 32 if kind is record.EntryKind.ONETIME_KEY else 46 + extra
        items.append(record.Entry(volume, kind, Secret(bytearray(os.urandom(size)))))
    # mostly the channel the plugin reads and records left as sealed: the verdicts past
    # the channel and the tag (expired, same-boot, ok, ...) are then common, not rare
    handoff = record.HandoffRecord(
        channel=draw(st.sampled_from([*[record.RecordChannel.EFI] * 4, *record.RecordChannel])),
        created=created,
        not_after=created + lifetime, boots_left=draw(st.integers(0, 3)), boot_id=boot,
        entries=tuple(items))
    with handoff:
        blob = record.seal(handoff, Secret(bytearray(RECORD_KEY)))
    how = draw(st.sampled_from(["as is", "as is", "as is", "flip", "cut", "splice"]))
    if how == "flip":
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1:]
    elif how == "cut":
        blob = blob[: draw(st.integers(0, len(blob)))]
    elif how == "splice":
        at = draw(st.integers(0, 8))
        blob = blob[:at] + draw(st.binary(max_size=3)) + blob[at + 1:]
    return blob, NOW, BOOT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=records())
def test_generated_records_get_the_same_verdict(c_parsers, case):
    blob, now, boot = case
    assert _c_verdict(c_parsers, blob, now, boot) == _python_verdict(blob, now, boot)


def test_the_record_generator_reaches_every_verdict(c_parsers):
    """Without every verdict among generated records, the property above proves little.

    Derandomized: the same 300 records each run, so the answer does not depend on the luck
    of the draw (with a random seed, 600 records missed a verdict in 3 runs of 13).
    """
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=records())
    def collect(case):
        seen.add(_c_verdict(c_parsers, *case)[0])

    collect()
    assert seen == set(NAMES.values())


# --------------------------------------------------------------------------- the ABI

# The plugin is loaded in a child interpreter, never into the test process (libcryptsetup
# loads it in its own processes; here it would stay loaded for every later test).
ABI_CHILD = """
import ctypes, json, sys
plugin = ctypes.CDLL(sys.argv[1])
texts = [bytes.fromhex(t) for t in json.load(sys.stdin)]
buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
pin = b"123456"
open_pin = plugin.cryptsetup_token_open_pin(None, 0, pin, len(pin), ctypes.byref(buffer),
                                            ctypes.byref(size), None)
plugin.cryptsetup_token_version.restype = ctypes.c_char_p
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buf = libc.malloc(64)
ctypes.memset(buf, 0x41, 64)
plugin.cryptsetup_token_buffer_free(ctypes.c_void_p(buf), ctypes.c_size_t(64))
plugin.cryptsetup_token_buffer_free(None, ctypes.c_size_t(0))
print(json.dumps({
    "open_pin": open_pin, "answer": buffer.value is not None,
    "version": plugin.cryptsetup_token_version().decode(),
    "validate": [plugin.cryptsetup_token_validate(None, t) for t in texts],
}))
"""


def _refused_tokens() -> list[bytes]:
    return [raw for raw in FIXED_TOKENS
            if onetime.parse_token(0, raw) is None and b"\x00" not in raw]


@pytest.fixture(scope="module")
def abi(plugin):
    texts = [json.dumps(GOOD).encode(), *_refused_tokens()]
    proc = subprocess.run([sys.executable, "-c", ABI_CHILD, str(plugin)],
                          input=json.dumps([t.hex() for t in texts]), capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_plugin_takes_no_pin(abi):
    assert abi["open_pin"] == -errno.ENOANO
    assert not abi["answer"]


def test_validate_is_the_strict_parser(abi):
    good, *refused = abi["validate"]
    assert good == 0
    assert len(refused) == len(_refused_tokens()) > 20
    assert set(refused) == {-errno.EINVAL}


def test_the_version(abi):
    assert abi["version"] == "1.0"
