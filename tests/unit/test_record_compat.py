"""The record still seals and opens with cryptography releases that lack ``*_into``
(Debian 12 ships 38, Debian 13 ships 43), and with cryptography 38's key handling.

:class:`CryptographyModel38` (tests/support/cryptography38.py) wraps the real primitives so
that they behave as 38's do: only the old methods exist, and ``ChaCha20Poly1305(key)`` keeps
a *reference* to the caller's key buffer and reads it at every encrypt/decrypt (38's
``ChaCha20Poly1305.__init__`` stores ``self._key = key``; ``_aead_setup`` takes
``ffi.from_buffer(key)`` per call).  A caller that wipes the buffer after constructing the
cipher then encrypts under zero bytes, as keyhandoff did (issue 10, finding 1).  The
Debian-stack CI pass runs this file on the real 38 as well.
"""

import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from support.cryptography38 import CryptographyModel38, OldAead
from support.passphrases import make

from keyhandoff import record as record_format
from keyhandoff import sealing
from keyhandoff.secret import Secret


@pytest.fixture
def old_cryptography(monkeypatch):
    CryptographyModel38.install(monkeypatch)


def test_the_model_keeps_the_reference_as_38_does():
    # The fixture is only worth something if it reproduces 38's aliasing.
    key = bytearray(range(32))
    aead = OldAead(key)
    sealed = aead.encrypt(bytes(12), b"data", b"")
    key[:] = bytes(32)
    assert aead.encrypt(bytes(12), b"data", b"") == ChaCha20Poly1305(bytes(32)).encrypt(
        bytes(12), b"data", b""
    )
    assert sealed == ChaCha20Poly1305(bytes(range(32))).encrypt(bytes(12), b"data", b"")


def _record():
    entry = record_format.Entry(
        uuid.uuid4(), record_format.EntryKind.ONETIME_KEY, Secret(b"\x01" * 32)
    )
    return record_format.HandoffRecord(
        channel=record_format.RecordChannel.EFI, created=1_700_000_000, not_after=1_700_000_600,
        boots_left=1, boot_id=uuid.uuid4(), entries=(entry,),
    )


def test_seal_and_open_without_into(old_cryptography):
    key = record_format.new_record_key()
    blob = record_format.seal(_record(), key)
    record = record_format.open_record(blob, key, now=1_700_000_100, boot_id=uuid.uuid4())
    assert bytes(record.entries[0].payload.view()) == b"\x01" * 32
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(record_format.RecordTampered):
        record_format.open_record(bytes(tampered), key, now=1_700_000_100, boot_id=uuid.uuid4())


def test_records_are_compatible_across_versions(old_cryptography, monkeypatch):
    key = record_format.new_record_key()
    blob = record_format.seal(_record(), key)
    monkeypatch.undo()  # the current cryptography opens what the old one sealed
    record = record_format.open_record(blob, key, now=1_700_000_100, boot_id=uuid.uuid4())
    assert len(record.entries) == 1


def test_sealed_passphrase_without_into(old_cryptography):
    vk = Secret(b"\x02" * 64)
    pw = make("compat")
    sealed = sealing.seal_to_volume_key(vk, Secret(pw), b"ctx")
    with sealing.open_with_volume_key(vk, sealed, b"ctx") as got:
        assert bytes(got.view()) == pw
    with pytest.raises(sealing.SealedPayloadRefused):
        sealing.open_with_volume_key(vk, sealed, b"other")
