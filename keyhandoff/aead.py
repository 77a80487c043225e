"""The key derivation and one-use AEAD that the handoff record and the sealed payloads share.

HKDF-SHA256 derives a 32-byte key into a buffer we own (:func:`hkdf_into`), and
:class:`DerivedAead` runs ChaCha20-Poly1305 under it and wipes it afterwards.  The formats
built on them are :mod:`keyhandoff.record` (the handoff record, under the record key) and
:mod:`keyhandoff.sealing` (a payload sealed to a LUKS volume key).  Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Self

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["NONCE_LEN", "TAG_LEN", "Buffer", "DerivedAead", "hkdf_into"]

#: ChaCha20-Poly1305's nonce and tag sizes.
NONCE_LEN: Final = 12
TAG_LEN: Final = 16

Buffer = bytes | bytearray | memoryview


def hkdf_into(ikm: memoryview, *, info: bytes, salt: bytes | None, out: bytearray) -> None:
    """HKDF-SHA256 of ``ikm`` into ``out`` (``len(out)`` bytes), without a copy where possible."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=len(out), salt=salt, info=info)
    if hasattr(hkdf, "derive_into"):
        hkdf.derive_into(ikm, out)
    else:  # cryptography < 47 (Debian 12: 38, Debian 13: 43): an unwipeable bytes copy
        out[:] = hkdf.derive(bytes(ikm))


class DerivedAead:
    """ChaCha20-Poly1305 under a derived key whose only buffer is wiped when this closes.

    cryptography 38 (Debian 12) keeps a *reference* to the key buffer given to
    ``ChaCha20Poly1305(key)`` and reads it at every ``encrypt``/``decrypt``; later releases
    copy it.  So the derived key must stay intact for as long as the cipher object is used,
    and be wiped only after the object is gone: use this as a context manager, encrypt or
    decrypt inside the block.  On exit the cipher object is released first, then the key is
    wiped, and a use after exit raises instead of silently running under 32 zero bytes.
    (The cipher's own copy in newer releases is one Python cannot wipe: SECURITY.md,
    "What Python cannot do".)
    """

    __slots__ = ("_aead", "_key")

    def __init__(self, derive: Callable[[bytearray], None]) -> None:
        self._key = bytearray(32)
        self._aead: ChaCha20Poly1305 | None = None
        try:
            derive(self._key)
            self._aead = ChaCha20Poly1305(self._key)
        except BaseException:
            self.close()
            raise

    def _cipher(self) -> ChaCha20Poly1305:
        if self._aead is None:
            raise RuntimeError("the derived key is wiped: encrypt and decrypt inside the block")
        return self._aead

    def encrypt_into(self, nonce: bytes, data: Buffer, aad: bytes, out: bytearray) -> None:
        """``aead.encrypt_into`` where cryptography has it (no immutable copy of ``data``).

        Older releases (Debian's 38 and 43) only return ``bytes``: the ciphertext then
        passes through an immutable object (not secret), and the plaintext is copied once
        into ``bytes`` we cannot wipe (SECURITY.md, "What Python cannot do").
        """
        aead = self._cipher()
        if hasattr(aead, "encrypt_into"):
            aead.encrypt_into(nonce, data, aad, out)
        else:
            out[:] = aead.encrypt(nonce, bytes(data), aad)

    def decrypt_into(self, nonce: bytes, data: Buffer, aad: Buffer, out: bytearray) -> None:
        """``aead.decrypt_into`` where cryptography has it; see :meth:`encrypt_into`."""
        aead = self._cipher()
        if hasattr(aead, "decrypt_into"):
            aead.decrypt_into(nonce, data, aad, out)
        else:
            out[:] = aead.decrypt(nonce, bytes(data), bytes(aad))

    def close(self) -> None:
        """Release the cipher object, then wipe the key it may reference."""
        self._aead = None
        self._key[:] = bytes(len(self._key))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
