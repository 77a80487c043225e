"""The handoff record format: round trips, every refusal, tampering, hypothesis."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import record_keys
from support.passphrases import MARKER, make

from keyhandoff import record as record_format
from keyhandoff import sealing
from keyhandoff.record import (
    HEADER_LEN,
    Entry,
    EntryKind,
    HandoffRecord,
    RecordChannel,
    RecordExhausted,
    RecordExpired,
    RecordForeign,
    RecordMalformed,
    RecordNotYetValid,
    RecordRefused,
    RecordSameBoot,
    RecordTampered,
    RecordUnknownFormat,
)
from keyhandoff.sealing import SealedPayloadRefused
from keyhandoff.secret import Secret

NOW = 1_750_000_000
ARMING_BOOT = uuid.UUID("11111111-2222-3333-4444-555555555555")
NEXT_BOOT = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")
VOLUME_A = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
VOLUME_B = uuid.UUID("a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf")

# Header field offsets (record module docstring).
FIELDS = {
    "magic": (0, 4),
    "version": (4, 5),
    "channel": (5, 6),
    "boots_left": (6, 7),
    "created": (7, 15),
    "not_after": (15, 23),
    "boot_id": (23, 39),
    "key_id": (39, 47),
    "nonce": (47, 59),
}


def onetime_key(label: str = "otk") -> Secret:
    """A 32-byte key that carries the test marker, so a leak scan finds it."""
    return Secret(bytearray((make(label) * 2)[:32]))


def volume_key(label: str = "vk") -> Secret:
    return Secret(bytearray((make(label) * 4)[:64]))


def make_record(
    *,
    channel: RecordChannel = RecordChannel.EFI,
    created: int = NOW,
    not_after: int = NOW + 900,
    boots_left: int = 2,
    boot_id: uuid.UUID = ARMING_BOOT,
    entries: tuple[Entry, ...] | None = None,
) -> HandoffRecord:
    if entries is None:
        entries = (Entry(VOLUME_A, EntryKind.ONETIME_KEY, onetime_key()),)
    return HandoffRecord(channel, created, not_after, boots_left, boot_id, entries)


def open_now(blob, key, **kwargs):
    kwargs.setdefault("now", NOW + 60)
    kwargs.setdefault("boot_id", NEXT_BOOT)
    return record_format.open_record(blob, key, **kwargs)


@pytest.fixture
def key():
    with record_format.new_record_key() as k:
        yield k


@pytest.fixture
def sealed(key):
    with make_record() as record:
        return record_format.seal(record, key)


def raw_seal(
    key: Secret,
    plaintext: bytes,
    *,
    channel: int = 2,
    boots_left: int = 1,
    created: int = NOW,
    not_after: int = NOW + 900,
    boot_id: uuid.UUID = ARMING_BOOT,
    version: int = 1,
) -> bytes:
    """A record sealed by a writer holding the key but not following the rules.

    Builds the bytes with the documented layout and the documented key derivation
    (tests/support/record_keys.py, independent of keyhandoff), so the authenticated-but-malformed
    refusals can be reached (a buggy or hostile arming).
    """
    header = struct.pack(
        ">4sBBBQQ16s8s12s",
        b"KHST",
        version,
        channel,
        boots_left,
        created,
        not_after,
        boot_id.bytes,
        record_format.record_key_id(key),
        os.urandom(12),
    )
    aead = ChaCha20Poly1305(record_keys.record_aead_key(bytes(key.view())))
    return header + aead.encrypt(header[-12:], plaintext, header)


def entry_bytes(volume: uuid.UUID, kind: int, payload: bytes) -> bytes:
    return volume.bytes + struct.pack(">BH", kind, len(payload)) + payload


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("channel", list(RecordChannel))
def test_round_trip_every_channel(key, channel):
    vk = volume_key()
    passphrase = Secret(make("login"))
    sealed_pw = sealing.seal_to_volume_key(vk, passphrase, b"login:" + VOLUME_B.bytes)
    entries = (
        Entry(VOLUME_A, EntryKind.ONETIME_KEY, onetime_key("a")),
        Entry(VOLUME_B, EntryKind.ONETIME_KEY, onetime_key("b")),
        Entry(VOLUME_B, EntryKind.SEALED_PASSPHRASE, Secret(sealed_pw)),
    )
    expected = [bytes(e.payload.view()) for e in entries]
    record = make_record(channel=channel, entries=entries, boots_left=3)
    blob = record_format.seal(record, key)
    with open_now(blob, key, channel=channel) as opened:
        assert opened.channel is channel
        assert (opened.created, opened.not_after, opened.boots_left) == (NOW, NOW + 900, 3)
        assert opened.boot_id == ARMING_BOOT
        assert [(e.volume, e.kind) for e in opened.entries] == [
            (e.volume, e.kind) for e in entries
        ]
        assert [bytes(e.payload.view()) for e in opened.entries] == expected
        assert all(isinstance(e.payload, Secret) for e in opened.entries)
        login = sealing.open_with_volume_key(
            vk, opened.entries[2].payload.view(), b"login:" + VOLUME_B.bytes
        )
        assert login == passphrase
    assert all(e.payload.wiped for e in opened.entries)  # leaving the block wiped them


def test_header_is_readable_before_the_key_is_known(key, sealed):
    header = record_format.parse_header(sealed)
    assert header.channel is RecordChannel.EFI
    assert header.key_id == record_format.record_key_id(key)
    assert header.boot_id == ARMING_BOOT
    assert len(sealed) == HEADER_LEN + 1 + 19 + 32 + 16


def test_every_seal_uses_a_fresh_nonce(key):
    record = make_record()
    first, second = record_format.seal(record, key), record_format.seal(record, key)
    assert first[47:59] != second[47:59]
    assert first[59:] != second[59:]


def test_no_secret_in_reprs_or_ciphertext(key):
    record = make_record()
    blob = record_format.seal(record, key)
    opened = open_now(blob, key)
    texts = [repr(record), repr(record.entries[0]), repr(opened), repr(opened.entries)]
    assert not any(MARKER.decode() in t for t in texts)
    assert MARKER not in blob
    assert "ONETIME_KEY" in repr(opened.entries[0])


# --------------------------------------------------------------------------- refusals


def test_truncated_at_every_length_is_refused(key, sealed):
    for size in range(len(sealed)):
        with pytest.raises(RecordRefused) as info:
            open_now(sealed[:size], key)
        assert info.type in {RecordMalformed, RecordUnknownFormat, RecordTampered}
    with pytest.raises(RecordMalformed, match="truncated"):
        open_now(sealed[:HEADER_LEN], key)


def test_oversized_is_refused_unread(key, sealed):
    with pytest.raises(RecordMalformed, match="oversized"):
        open_now(sealed + bytes(record_format.MAX_RECORD_SIZE), key)


def test_trailing_byte_is_refused(key, sealed):
    with pytest.raises(RecordTampered):
        open_now(sealed + b"\0", key)


def test_unknown_magic(key, sealed):
    with pytest.raises(RecordUnknownFormat, match="magic"):
        open_now(b"KHSU" + sealed[4:], key)
    with pytest.raises(RecordUnknownFormat):
        open_now(b"", key)


def test_unknown_version(key):
    blob = raw_seal(key, b"\x01" + entry_bytes(VOLUME_A, 1, bytes(32)), version=2)
    with pytest.raises(RecordUnknownFormat, match="version 2"):
        open_now(blob, key)


def test_unknown_channel(key):
    blob = raw_seal(key, b"\x01" + entry_bytes(VOLUME_A, 1, bytes(32)), channel=9)
    with pytest.raises(RecordMalformed, match="channel 9"):
        open_now(blob, key)


def test_wrong_key_is_foreign(sealed):
    with record_format.new_record_key() as other, pytest.raises(RecordForeign, match="another"):
        open_now(sealed, other)


def test_key_id_forged_to_match_still_fails_authentication(key):
    # An attacker who copies our key id into a record sealed under their key gets nowhere.
    with record_format.new_record_key() as attacker:
        blob = bytearray(record_format.seal(make_record(), attacker))
    blob[39:47] = record_format.record_key_id(key)
    with pytest.raises(RecordTampered):
        open_now(bytes(blob), key)


def test_read_from_another_channel_is_foreign(key, sealed):
    with pytest.raises(RecordForeign, match="channel"):
        open_now(sealed, key, channel=RecordChannel.KEYRING)


def test_stale_record_is_refused(key, sealed):
    open_now(sealed, key, now=NOW + 900)  # the deadline itself is still inside
    with pytest.raises(RecordExpired, match="1 s ago"):
        open_now(sealed, key, now=NOW + 901)


def test_clock_before_arming_is_refused(key, sealed):
    open_now(sealed, key, now=NOW - record_format.CLOCK_SKEW)
    with pytest.raises(RecordNotYetValid):
        open_now(sealed, key, now=NOW - record_format.CLOCK_SKEW - 1)
    with pytest.raises(RecordNotYetValid):
        open_now(sealed, key, now=0)  # RTC reset to its epoch


def test_same_boot_is_refused(key, sealed):
    # Replay inside the arming boot: no reboot happened, so nothing may be handed off.
    with pytest.raises(RecordSameBoot) as info:
        open_now(sealed, key, boot_id=ARMING_BOOT)
    assert info.value.reason == "no-reboot"


def test_no_boots_left_is_refused(key):
    blob = record_format.seal(make_record(boots_left=0), key)
    with pytest.raises(RecordExhausted):
        open_now(blob, key)


def test_tag_failure_is_detail_free(key, sealed):
    blob = bytearray(sealed)
    blob[-1] ^= 1
    with pytest.raises(RecordTampered) as info:
        open_now(bytes(blob), key)
    assert str(info.value) == "handoff record refused (tampered): authentication failed"


@pytest.mark.parametrize("field", list(FIELDS))
def test_tampering_each_header_field_is_refused(key, sealed, field):
    start, end = FIELDS[field]
    for position in range(start, end):
        for bit in (0x01, 0x80):
            blob = bytearray(sealed)
            blob[position] ^= bit
            with pytest.raises(RecordRefused):
                open_now(bytes(blob), key)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("boots_left", RecordTampered),
        ("created", RecordTampered),
        ("not_after", RecordTampered),
        ("boot_id", RecordTampered),
        ("nonce", RecordTampered),
        ("key_id", RecordForeign),
        ("magic", RecordUnknownFormat),
        ("version", RecordUnknownFormat),
    ],
)
def test_tampered_field_gives_its_reason(key, sealed, field, expected):
    blob = bytearray(sealed)
    blob[FIELDS[field][0]] ^= 0x01
    with pytest.raises(expected):
        open_now(bytes(blob), key)


def test_extending_the_deadline_is_detected(key, sealed):
    # The attack the associated data stops: a later not_after on a real record.
    blob = bytearray(sealed)
    blob[15:23] = struct.pack(">Q", NOW + 86400)
    with pytest.raises(RecordTampered):
        open_now(bytes(blob), key, now=NOW + 3600)


@pytest.mark.parametrize("region", ["entry count", "volume", "kind", "length", "payload", "tag"])
def test_tampering_each_ciphertext_region_is_refused(key, sealed, region):
    base = HEADER_LEN
    regions = {
        "entry count": (base, base + 1),
        "volume": (base + 1, base + 17),
        "kind": (base + 17, base + 18),
        "length": (base + 18, base + 20),
        "payload": (base + 20, base + 52),
        "tag": (base + 52, base + 68),
    }
    start, end = regions[region]
    assert end <= len(sealed)
    for position in range(start, end):
        blob = bytearray(sealed)
        blob[position] ^= 0x40
        with pytest.raises(RecordTampered):
            open_now(bytes(blob), key)


# Authenticated but malformed: a writer with the key that breaks the rules.


@pytest.mark.parametrize(
    ("plaintext", "match"),
    [
        (b"\x00" + entry_bytes(VOLUME_A, 1, bytes(32)), "entry count 0"),
        (b"\x11" + entry_bytes(VOLUME_A, 1, bytes(32)), "entry count 17"),
        (b"\x01" + entry_bytes(VOLUME_A, 7, bytes(32)), "unknown entry kind 7"),
        (b"\x01" + entry_bytes(VOLUME_A, 1, bytes(31)) + b"\0", "one-time key must be 32"),
        (b"\x01" + entry_bytes(VOLUME_A, 2, bytes(45)), "impossible length"),
        (b"\x01" + entry_bytes(VOLUME_A, 1, bytes(32)) + b"\0", "1 bytes after"),
        (b"\x02" + entry_bytes(VOLUME_A, 1, bytes(32)), "entry table truncated"),
        (
            b"\x02" + entry_bytes(VOLUME_A, 1, bytes(32)) + VOLUME_B.bytes + b"\x01\x00\x20",
            "payload truncated",
        ),
        (b"\x02" + entry_bytes(VOLUME_A, 1, bytes(32)) * 2, "duplicate"),
    ],
)
def test_authenticated_but_malformed_entries(key, plaintext, match):
    with pytest.raises(RecordMalformed, match=match):
        open_now(raw_seal(key, plaintext), key)


@pytest.mark.parametrize(
    ("created", "not_after", "match"),
    [
        (NOW, NOW, "not after"),
        (NOW, NOW - 1, "not after"),
        (NOW, NOW + record_format.MAX_LIFETIME + 1, "more than"),
    ],
)
def test_authenticated_but_impossible_deadline(key, created, not_after, match):
    blob = raw_seal(
        key, b"\x01" + entry_bytes(VOLUME_A, 1, bytes(32)), created=created, not_after=not_after
    )
    with pytest.raises(RecordMalformed, match=match):
        open_now(blob, key, now=NOW)


def test_entries_already_parsed_are_wiped_on_refusal(key, monkeypatch):
    made: list[Secret] = []
    real = record_format.Secret

    def recording(data, **kwargs):
        secret = real(data, **kwargs)
        made.append(secret)
        return secret

    monkeypatch.setattr(record_format, "Secret", recording)
    plaintext = b"\x02" + entry_bytes(VOLUME_A, 1, bytes(range(32))) + entry_bytes(VOLUME_B, 9, b"")
    with pytest.raises(RecordMalformed):
        open_now(raw_seal(key, plaintext), key)
    assert made
    assert all(s.wiped for s in made)


def test_refusal_texts_carry_no_secret(key):
    record = make_record()
    blob = record_format.seal(record, key)
    texts = []
    for kwargs in (
        {"boot_id": ARMING_BOOT}, {"now": NOW + 10**6}, {"channel": RecordChannel.KEYRING},
    ):
        with pytest.raises(RecordRefused) as info:
            open_now(blob, key, **kwargs)
        texts.append(str(info.value))
    assert not any(MARKER.decode() in t for t in texts)


# --------------------------------------------------------------------------- construction


def test_record_validation_on_the_seal_side():
    entry = Entry(VOLUME_A, EntryKind.ONETIME_KEY, onetime_key())
    with pytest.raises(ValueError, match="not after"):
        make_record(not_after=NOW, entries=(entry,))
    with pytest.raises(ValueError, match="more than"):
        make_record(not_after=NOW + record_format.MAX_LIFETIME + 1, entries=(entry,))
    with pytest.raises(ValueError, match="entries"):
        make_record(entries=())
    with pytest.raises(ValueError, match="entries"):
        make_record(entries=(entry,) * 17)
    with pytest.raises(ValueError, match="duplicate"):
        make_record(entries=(entry, entry))
    with pytest.raises(ValueError, match="boots_left"):
        make_record(boots_left=256, entries=(entry,))
    with pytest.raises(ValueError, match="32 bytes"):
        Entry(VOLUME_A, EntryKind.ONETIME_KEY, Secret(b"short"))


def test_record_key_must_be_32_bytes():
    with Secret(b"k" * 16) as short, pytest.raises(ValueError, match="32 bytes"):
        record_format.seal(make_record(), short)


def test_oversized_record_cannot_be_sealed(key):
    vk = volume_key()
    big = sealing.seal_to_volume_key(vk, Secret(b"p" * 2048), b"ctx")
    entries = tuple(
        Entry(uuid.UUID(int=i), EntryKind.SEALED_PASSPHRASE, Secret(big)) for i in range(8)
    )
    with pytest.raises(ValueError, match="limit"):
        record_format.seal(make_record(entries=entries), key)


# --------------------------------------------------------------------------- volume key


def test_sealed_to_volume_key_round_trip_and_refusals():
    vk = volume_key()
    secret = Secret(make("login"))
    blob = sealing.seal_to_volume_key(vk, secret, b"login:a")
    assert MARKER not in blob
    assert len(blob) == len(secret) + sealing.SEALED_OVERHEAD
    with sealing.open_with_volume_key(vk, blob, b"login:a") as opened:
        assert opened == secret
    refusals = [
        (volume_key("other"), blob, b"login:a"),  # another volume's key
        (vk, blob, b"login:b"),  # sealed for another use
        (vk, blob[:-1], b"login:a"),
        (vk, blob[: sealing.SEALED_OVERHEAD], b"login:a"),
        (vk, b"\x02" + blob[1:], b"login:a"),
        (vk, blob + b"\0", b"login:a"),
    ]
    for position in range(len(blob)):
        flipped = bytearray(blob)
        flipped[position] ^= 1
        refusals.append((vk, bytes(flipped), b"login:a"))
    for k, candidate, context in refusals:
        with pytest.raises(SealedPayloadRefused) as info:
            sealing.open_with_volume_key(k, candidate, context)
        assert str(info.value) == "sealed payload refused"


def test_sealing_uses_fresh_salt_and_nonce():
    vk = volume_key()
    secret = Secret(make("login"))
    first = sealing.seal_to_volume_key(vk, secret, b"c")
    assert first != sealing.seal_to_volume_key(vk, secret, b"c")


def test_volume_key_too_short_is_a_caller_error():
    with pytest.raises(ValueError, match="at least"):
        sealing.seal_to_volume_key(Secret(b"k" * 8), Secret(b"x"), b"c")


# --------------------------------------------------------------------------- hypothesis

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_KEY = record_format.new_record_key()
_SEALED = record_format.seal(make_record(boots_left=5), _KEY)


@SETTINGS
@given(position=st.integers(0, len(_SEALED) - 1), mask=st.integers(1, 255))
def test_flipping_any_byte_is_refused(position, mask):
    blob = bytearray(_SEALED)
    blob[position] ^= mask
    with pytest.raises(RecordRefused):
        open_now(bytes(blob), _KEY)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_refusals(data):
    with pytest.raises(RecordRefused):
        open_now(data, _KEY)


@SETTINGS
@given(tail=st.binary(max_size=300))
def test_arbitrary_body_under_a_valid_header_is_refused(tail):
    with pytest.raises(RecordRefused):
        open_now(_SEALED[:HEADER_LEN] + tail, _KEY)


@SETTINGS
@given(
    start=st.integers(0, len(_SEALED)),
    end=st.integers(0, len(_SEALED)),
    insert=st.binary(max_size=40),
)
def test_splicing_is_refused(start, end, insert):
    start, end = sorted((start, end))
    blob = _SEALED[:start] + insert + _SEALED[end:]
    if blob == _SEALED:
        return
    with pytest.raises(RecordRefused):
        open_now(blob, _KEY)


@SETTINGS
@given(plaintext=st.binary(min_size=1, max_size=200))
def test_arbitrary_authenticated_plaintext_only_raises_refusals(plaintext):
    # Even a key holder cannot make the entry parser raise anything undocumented.
    try:
        record = open_now(raw_seal(_KEY, plaintext), _KEY)
    except RecordRefused:
        return
    record.wipe()


def test_aead_is_chacha20poly1305_over_the_header():
    # Pins the construction documented in the module docstring: the header is the AD.
    blob = record_format.seal(make_record(), _KEY)
    aead = ChaCha20Poly1305(record_keys.record_aead_key(bytes(_KEY.view())))
    plaintext = aead.decrypt(blob[47:59], blob[HEADER_LEN:], blob[:HEADER_LEN])
    assert plaintext[0] == 1
