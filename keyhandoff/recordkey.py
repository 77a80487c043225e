"""Where the handoff record's key is kept between arming and the next boot.

The record (:mod:`keyhandoff.record`) is sealed under a random 32-byte record key that never
travels with it.  Where that key waits is a choice separate from the channel that carries
the record: today it is written into each armed volume's LUKS2 ``keyhandoff-onetime`` token,
beside the one-time keyslot it belongs to (:class:`LuksTokenKeys`); a TPM2 store would seal
it to the TPM instead and change nothing in the channels.

A store implements :class:`RecordKeyStore`:

``new_key()``
    A fresh record key (a :class:`~keyhandoff.secret.Secret` the caller wipes).
``beside_keyslot(key)``
    What the one-time keyslot's token keeps of it (the LUKS2 token store: the key itself).
``find(key_id, found)``
    At restore: the record key whose id the record names, from the one-time keyslots found
    on this machine's volumes, and the bindings of the keyslots that key claims.  ``None``
    when no keyslot has it: the record is foreign or replayed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.secret import Secret
    from keyhandoff.sweep import FoundSlot

__all__ = ["STORE", "LuksTokenKeys", "RecordKeyStore"]


class RecordKeyStore(Protocol):
    """Keeps the record key until the next boot (see the module documentation)."""

    name: str

    def new_key(self) -> Secret:
        """A fresh record key."""
        ...

    def beside_keyslot(self, key: Secret) -> Secret:
        """What the one-time keyslot's token keeps of ``key``."""
        ...

    def find(self, key_id: bytes, found: Sequence[FoundSlot]) -> tuple[Secret, set[str]] | None:
        """The record key with ``key_id`` and the bindings it claims; ``None`` if none."""
        ...


class LuksTokenKeys:
    """The record key in the plaintext JSON of each one-time keyslot's LUKS2 token."""

    name = "luks2-token"

    def new_key(self) -> Secret:
        """32 random bytes."""
        from keyhandoff import record

        return record.new_record_key()

    def beside_keyslot(self, key: Secret) -> Secret:
        """The token keeps the key itself (a copy; wipe it)."""
        return key.copy()

    def find(self, key_id: bytes, found: Sequence[FoundSlot]) -> tuple[Secret, set[str]] | None:
        """The first token key with ``key_id``; the bindings of every keyslot holding it."""
        from keyhandoff import record

        for candidate in found:
            key = candidate.slot.record_key()
            if len(key) == record.RECORD_KEY_LEN and record.record_key_id(key) == key_id:
                mine = candidate.slot.record_key_b64
                return key, {f.slot.binding for f in found if f.slot.record_key_b64 == mine}
            key.wipe()
        return None


#: The store the channels use.
STORE: Final[RecordKeyStore] = LuksTokenKeys()
