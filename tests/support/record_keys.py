"""An independent reading of the handoff record's cryptography, written out from the format
documentation (the module docstrings of keyhandoff/record.py and sealing.py), not taken from
keyhandoff.

HKDF-SHA256 is RFC 5869 over the standard library's hmac; only the ChaCha20-Poly1305
primitive comes from cryptography, always given an immutable ``bytes`` key.  Tests open
what keyhandoff sealed with this, so a key derivation that drifted (or a cipher that ran
under another key than the derived one, as with cryptography 38 and a wiped buffer) is
caught by something other than a round trip through the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

#: The documented HKDF info strings (record.py, sealing.py: "_INFO_*"), spelled out on purpose.
INFO_RECORD_AEAD = b"keyhandoff record v1 aead"
INFO_RECORD_KEY_ID = b"keyhandoff record v1 key-id"
INFO_SEALED = b"keyhandoff sealed-to-volume-key v1\x00"
HEADER_LEN = 59
NONCE = slice(47, 59)
ZERO_KEY = bytes(32)


def hkdf_sha256(ikm: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """RFC 5869: extract (salt defaults to HashLen zero bytes), then expand."""
    prk = hmac.new(salt if salt is not None else bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def record_aead_key(record_key: bytes) -> bytes:
    return hkdf_sha256(record_key, info=INFO_RECORD_AEAD)


def record_key_id(record_key: bytes) -> bytes:
    return hkdf_sha256(record_key, info=INFO_RECORD_KEY_ID, length=8)


def open_record_with(aead_key: bytes, blob: bytes) -> bytes:
    """Decrypt a sealed record's entries under ``aead_key`` (InvalidTag when it is wrong)."""
    return ChaCha20Poly1305(bytes(aead_key)).decrypt(
        blob[NONCE], blob[HEADER_LEN:], blob[:HEADER_LEN]
    )


def entries(plaintext: bytes) -> list[tuple[bytes, int, bytes]]:
    """(volume UUID bytes, kind, payload) for each entry of a decrypted record."""
    out, offset = [], 1
    for _ in range(plaintext[0]):
        volume, kind, length = struct.unpack_from(">16sBH", plaintext, offset)
        offset += 19
        out.append((volume, kind, plaintext[offset : offset + length]))
        offset += length
    assert offset == len(plaintext)
    return out


def sealed_key(volume_key: bytes, sealed: bytes, context: bytes) -> bytes:
    """The AEAD key of a seal_to_volume_key() payload: version || salt(16) || nonce(12) || ct."""
    assert sealed[0] == 1
    return hkdf_sha256(volume_key, info=INFO_SEALED + context, salt=sealed[1:17])


def open_sealed_with(aead_key: bytes, sealed: bytes) -> bytes:
    return ChaCha20Poly1305(bytes(aead_key)).decrypt(sealed[17:29], sealed[29:], sealed[:29])
