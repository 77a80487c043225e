"""A payload sealed to a LUKS volume key: it opens only after the disk is open.

Anything the login path needs (the person's passphrase) travels in a handoff record only
in this form, as an entry of kind ``SEALED_PASSPHRASE`` (:mod:`keyhandoff.record`): a
record read from NVRAM alone, without the opened volume, does not yield it.

Layout, version 1::

    offset size field
         0    1 version      1
         1   16 salt         random
        17   12 nonce        random, ChaCha20-Poly1305 nonce
        29    n ciphertext   ChaCha20-Poly1305(plaintext), associated data = bytes 0..28
      29+n   16 tag

The key is HKDF-SHA256(volume key, salt, info = ``b"keyhandoff sealed-to-volume-key v1"``,
a NUL byte, then ``context``); ``context`` names the use (e.g. ``b"login:" + uuid``) so a
payload sealed for one use or volume does not open for another.  Pure: no I/O (the salt and
nonce come from ``os.urandom``).
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag

from keyhandoff.aead import NONCE_LEN, TAG_LEN, DerivedAead, hkdf_into
from keyhandoff.errors import SealedPayloadRefused
from keyhandoff.secret import MAX_PASSPHRASE, Secret

__all__ = [
    "SEALED_OVERHEAD",
    "SealedPayloadRefused",
    "open_with_volume_key",
    "seal_to_volume_key",
]

_SEALED_VERSION: Final = 1
_SALT_LEN: Final = 16
_SEALED_PREFIX_LEN: Final = 1 + _SALT_LEN + NONCE_LEN
#: Bytes seal_to_volume_key() adds to the plaintext.
SEALED_OVERHEAD: Final = _SEALED_PREFIX_LEN + TAG_LEN
_MIN_VOLUME_KEY: Final = 16

_INFO_SEALED: Final = b"keyhandoff sealed-to-volume-key v1\x00"


def _sealed_aead(volume_key: Secret, salt: bytes, context: bytes) -> DerivedAead:
    """Key = HKDF-SHA256(volume key, salt, info = label, a NUL byte, ``context``)."""
    ikm = volume_key.view()
    if len(ikm) < _MIN_VOLUME_KEY:
        raise ValueError(f"a volume key is at least {_MIN_VOLUME_KEY} bytes")
    return DerivedAead(
        lambda out: hkdf_into(ikm, info=_INFO_SEALED + context, salt=salt, out=out)
    )


def seal_to_volume_key(volume_key: Secret, plaintext: Secret, context: bytes) -> bytes:
    """Encrypt ``plaintext`` under a key only the opened volume yields.

    The key is HKDF-SHA256(volume key, salt = 16 random bytes, info = label || ``context``);
    ``context`` names the use (e.g. ``b"login:" + uuid``) so a payload sealed for one use or
    volume does not open for another.  Output: version (1) || salt || nonce || ciphertext+tag.
    """
    if not 1 <= len(plaintext) <= MAX_PASSPHRASE:
        raise ValueError(f"sealed plaintext is 1..{MAX_PASSPHRASE} bytes")
    salt = os.urandom(_SALT_LEN)
    prefix = bytes([_SEALED_VERSION]) + salt + os.urandom(NONCE_LEN)
    out = bytearray(len(plaintext) + TAG_LEN)
    with _sealed_aead(volume_key, salt, context) as aead:
        aead.encrypt_into(prefix[-NONCE_LEN:], plaintext.view(), prefix, out)
    return prefix + bytes(out)


def open_with_volume_key(
    volume_key: Secret, sealed: bytes | bytearray | memoryview, context: bytes
) -> Secret:
    """Open a :func:`seal_to_volume_key` payload; :class:`SealedPayloadRefused` otherwise."""
    view = memoryview(sealed)
    if not SEALED_OVERHEAD < len(view) <= SEALED_OVERHEAD + MAX_PASSPHRASE:
        raise SealedPayloadRefused("sealed payload refused")
    if view[0] != _SEALED_VERSION:
        raise SealedPayloadRefused("sealed payload refused")
    salt = bytes(view[1 : 1 + _SALT_LEN])
    nonce = bytes(view[1 + _SALT_LEN : _SEALED_PREFIX_LEN])
    out = bytearray(len(view) - SEALED_OVERHEAD)
    try:
        with _sealed_aead(volume_key, salt, context) as aead:
            aead.decrypt_into(nonce, view[_SEALED_PREFIX_LEN:], view[:_SEALED_PREFIX_LEN], out)
    except InvalidTag:
        out[:] = bytes(len(out))
        raise SealedPayloadRefused("sealed payload refused") from None
    return Secret(out)
