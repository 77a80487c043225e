"""A model of cryptography 38's ChaCha20Poly1305 and HKDF over the real primitives.

Only the old methods exist, and ``ChaCha20Poly1305(key)`` keeps a *reference* to the
caller's key buffer and reads it at every encrypt/decrypt, as 38 does.  Used by
tests/unit/test_record_compat.py (which checks the model itself) and test_record_keys.py.
"""

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyhandoff import aead


class OldAead:
    """cryptography 38's ChaCha20Poly1305: the key buffer is referenced, not copied."""

    def __init__(self, key):
        if not isinstance(key, bytes | bytearray | memoryview) or len(key) != 32:
            raise ValueError("ChaCha20Poly1305 key must be 32 bytes.")
        self._key = key  # 38 keeps the caller's object

    def _cipher(self):
        return ChaCha20Poly1305(bytes(self._key))  # what the buffer holds *now*

    def encrypt(self, nonce, data, aad):
        return self._cipher().encrypt(nonce, data, aad)

    def decrypt(self, nonce, data, aad):
        return self._cipher().decrypt(nonce, data, aad)


class OldHkdf:
    def __init__(self, **kw):
        self._real = HKDF(**kw)

    def derive(self, ikm):
        return self._real.derive(ikm)


class CryptographyModel38:
    @staticmethod
    def install(monkeypatch):
        monkeypatch.setattr(aead, "ChaCha20Poly1305", OldAead)
        monkeypatch.setattr(aead, "HKDF", OldHkdf)
        assert not hasattr(aead.ChaCha20Poly1305(b"k" * 32), "encrypt_into")
