"""The one-time token parser: the exact shape accepted, every hostile shape refused, fuzzed.

Token text is whatever somebody wrote into a LUKS2 header; parse_token must answer
``None`` (untrusted) for anything but the documented shape, and never raise.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import fuzzers

from keyhandoff import onetime

fuzz_token = fuzzers.load("fuzz_token")  # the fuzzer's generator and checker, run bounded here

BOOT = "0f0e0d0c-0b0a-0908-0706-050403020100"
RECORD_KEY = base64.b64encode(bytes(range(32))).decode()
BINDING = onetime.binding(3, b"s" * 32)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
#: the last character with a padding bit set: decodes to the same 32 bytes, not canonical
_SLOPPY = _B64[_B64.index(RECORD_KEY[-2]) + 1]


def valid(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "type": onetime.TOKEN_TYPE, "keyslots": ["3"], "not_after": 1_767_225_600,
        "boot_id": BOOT, "record_key": RECORD_KEY, "binding": BINDING,
    }
    for name, value in changes.items():
        if value is KeyError:
            del data[name]
        else:
            data[name] = value
    return data


def text(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def test_the_documented_shape_parses():
    slot = onetime.parse_token(4, text(valid()))
    assert slot is not None
    assert (slot.token, slot.keyslot, slot.not_after, slot.boot_id, slot.binding) == (
        4, 3, 1_767_225_600, BOOT, BINDING)
    with slot.record_key() as key:
        assert bytes(key.view()) == bytes(range(32))


def test_binding_names_the_keyslot_number_and_salt():
    assert onetime.binding(3, b"a" * 32) != onetime.binding(3, b"b" * 32)
    assert onetime.binding(3, b"a" * 32) != onetime.binding(4, b"a" * 32)
    assert len(onetime.binding(0, b"")) == 64


GOOD = text(valid())
HOSTILE = {
    "float not_after": GOOD.replace(b"1767225600", b"1767225600.0"),
    "1e400": GOOD.replace(b"1767225600", b"1e400"),
    "NaN": GOOD.replace(b"1767225600", b"NaN"),
    "Infinity": GOOD.replace(b"1767225600", b"Infinity"),
    "huge int": GOOD.replace(b"1767225600", b"9" * 5000),
    "2**63": GOOD.replace(b"1767225600", str(2**63).encode()),
    "u64 max (json-c's clamp)": GOOD.replace(b"1767225600", b"18446744073709551615"),
    "zero": GOOD.replace(b"1767225600", b"0"),
    "negative": GOOD.replace(b"1767225600", b"-5"),
    "bool": GOOD.replace(b"1767225600", b"true"),
    "string": GOOD.replace(b"1767225600", b'"1767225600"'),
    "invalid UTF-8": GOOD.replace(BOOT.encode(), b"\xff\xfe" + BOOT.encode()[2:]),
    "invalid UTF-8 outside the fields": GOOD[:-1] + b',"x":"\xc3\x28"}',
    "lone surrogate": GOOD.replace(BOOT[:6].encode(), b"\\udcff"),
    "duplicate key": GOOD[:-1] + b',"keyslots":["0"]}',
    "duplicate type": b'{"type":"other",' + GOOD[1:],
    "too long": GOOD[:-1] + b"," + b" " * onetime.MAX_TOKEN_BYTES + b"}",
    "deep nesting": GOOD[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not an object": b"[" + GOOD + b"]",
    "not JSON": GOOD[:-1],
    "empty": b"",
    "extra field": text(valid(extra=1)),
    "no binding (an old token)": text(valid(binding=KeyError)),
    "binding upper case": text(valid(binding=BINDING.upper())),
    "binding short": text(valid(binding=BINDING[:-1])),
    "two keyslots": text(valid(keyslots=["3", "4"])),
    "no keyslot": text(valid(keyslots=[])),
    "keyslot as int": text(valid(keyslots=[3])),
    "keyslot 32": text(valid(keyslots=["32"])),
    "keyslot 03": text(valid(keyslots=["03"])),
    "keyslot -1": text(valid(keyslots=["-1"])),
    "boot id upper case": text(valid(boot_id=BOOT.upper())),
    "boot id not a uuid": text(valid(boot_id="x")),
    "record key short": text(valid(record_key=base64.b64encode(bytes(31)).decode())),
    "record key not base64": text(valid(record_key="*" * 44)),
    "record key non-canonical": text(valid(record_key=RECORD_KEY[:-2] + _SLOPPY + "=")),
    "other type": text(valid(type="systemd-tpm2")),
    "no type": text(valid(type=KeyError)),
}


@pytest.mark.parametrize("raw", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_shapes_are_refused_without_raising(raw):
    assert onetime.parse_token(0, raw) is None


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1200))
def test_any_bytes_never_raise(raw):
    assert fuzz_token.one(raw) is None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                        max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(fuzz_token.FIELDS)), _JSON)
def test_any_field_value_is_checked(name, value):
    """One field replaced by any JSON value: refused, or accepted only if truly valid."""
    raw = json.dumps(valid(**{name: value})).encode("utf-8", "surrogatepass")
    assert fuzz_token.one(raw) is None


def test_fuzzer_bounded_run():
    """The fuzzer itself, bounded (the large runs are `python fuzz/fuzz_token.py`)."""
    assert fuzz_token.main(["--runs", "30000", "--seed", "10"]) == 0


def test_fuzzer_checker_catches_a_lenient_parser(monkeypatch):
    """The fuzzer is not a test that cannot fail: a parser accepting duplicates is caught."""
    monkeypatch.setattr(onetime, "_unique", dict)
    assert fuzz_token.main(["--runs", "20000", "--seed", "10"]) == 1


def test_uuid_helper_is_the_canonical_form():
    assert onetime._canonical_uuid(BOOT)
    for other in (BOOT.upper(), BOOT.replace("-", ""), "{" + BOOT + "}", f"urn:uuid:{BOOT}",
                  uuid.UUID(BOOT), BOOT.encode(), None):
        assert not onetime._canonical_uuid(other), other
