"""Issue 10, finding 1: what keyhandoff seals is encrypted under the documented derived key,
never under 32 zero bytes, on every supported cryptography.

cryptography 38 (Debian 12) keeps a reference to the key buffer given to
``ChaCha20Poly1305(key)``; keyhandoff used to wipe that buffer right after constructing the
cipher, so every record and sealed passphrase was encrypted under zero bytes.  Each test
here seals with keyhandoff and then (a) fails to open under the zero key and (b) opens
with the independent derivation in tests/support/record_keys.py.  They run on the installed
cryptography and on a model of cryptography 38's key handling (``cryptography_38``, the
same fixture as test_record_compat.py); the Debian-stack CI pass runs them on the real 38.
"""

from __future__ import annotations

import uuid

import pytest
from cryptography.exceptions import InvalidTag
from support import record_keys
from support.cryptography38 import CryptographyModel38
from support.passphrases import make

from keyhandoff import record as record_format
from keyhandoff import sealing
from keyhandoff.secret import Secret

NOW = 1_750_000_000
VOLUME = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
CONTEXT = b"keyhandoff login:" + str(VOLUME).encode()


@pytest.fixture(params=["installed", "cryptography-38-model"])
def cryptography_version(request, monkeypatch):
    if request.param == "cryptography-38-model":
        CryptographyModel38.install(monkeypatch)
    return request.param


def test_hkdf_helper_matches_rfc5869_case_1():
    # The independent derivation is itself checked against RFC 5869, appendix A.1.
    okm = record_keys.hkdf_sha256(
        bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_record_is_sealed_under_the_documented_key_not_zero(cryptography_version):
    onetime = (make("kat") * 2)[:32]
    record_key = bytes(range(32))  # a known record key: the expected key follows from it
    entry = record_format.Entry(
        VOLUME, record_format.EntryKind.ONETIME_KEY, Secret(bytearray(onetime))
    )
    record = record_format.HandoffRecord(
        record_format.RecordChannel.EFI, NOW, NOW + 600, 1, uuid.uuid4(), (entry,)
    )
    blob = record_format.seal(record, Secret(bytearray(record_key)))
    assert blob[39:47] == record_keys.record_key_id(record_key)
    with pytest.raises(InvalidTag):
        record_keys.open_record_with(record_keys.ZERO_KEY, blob)
    plaintext = record_keys.open_record_with(record_keys.record_aead_key(record_key), blob)
    assert record_keys.entries(plaintext) == [(VOLUME.bytes, 1, onetime)]


def test_sealed_passphrase_is_under_the_documented_key_not_zero(cryptography_version):
    volume_key = bytes(range(64))
    pw = make("kat-login")
    sealed = sealing.seal_to_volume_key(Secret(bytearray(volume_key)), Secret(pw), CONTEXT)
    with pytest.raises(InvalidTag):
        record_keys.open_sealed_with(record_keys.ZERO_KEY, sealed)
    key = record_keys.sealed_key(volume_key, sealed, CONTEXT)
    assert record_keys.open_sealed_with(key, sealed) == pw


def test_opens_what_the_documented_derivation_sealed(cryptography_version):
    # The other direction: a record written by the independent code opens in keyhandoff,
    # and one written under the zero key is refused as tampered.
    record_key = bytes(range(100, 132))
    onetime = (make("kat-open") * 2)[:32]
    plaintext = b"\x01" + VOLUME.bytes + b"\x01\x00\x20" + onetime
    header = (b"KHST\x01\x02\x01" + NOW.to_bytes(8, "big") + (NOW + 600).to_bytes(8, "big")
              + uuid.uuid4().bytes + record_keys.record_key_id(record_key) + bytes(12))
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: PLC0415

    def sealed_under(aead_key: bytes) -> bytes:
        return header + ChaCha20Poly1305(aead_key).encrypt(header[47:59], plaintext, header)

    good = sealed_under(record_keys.record_aead_key(record_key))
    with record_format.open_record(good, Secret(bytearray(record_key)), now=NOW + 1,
                           boot_id=uuid.uuid4()) as opened:
        assert bytes(opened.entries[0].payload.view()) == onetime
    with pytest.raises(record_format.RecordTampered):
        record_format.open_record(sealed_under(record_keys.ZERO_KEY), Secret(bytearray(record_key)),
                          now=NOW + 1, boot_id=uuid.uuid4())


def test_the_derived_key_is_wiped_after_the_block_and_cannot_be_used_then():
    with record_format.new_record_key() as key:
        aead = record_format._record_aead(key)
        with aead:
            out = bytearray(1 + 16)
            aead.encrypt_into(bytes(12), b"x", b"", out)
            assert any(aead._key)
        assert aead._key == bytes(32)
        with pytest.raises(RuntimeError, match="wiped"):
            aead.encrypt_into(bytes(12), b"x", b"", out)
