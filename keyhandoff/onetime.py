"""One-time LUKS2 keyslots: what the ``efi`` channel hands over instead of the passphrase.

``arm`` adds a keyslot opened by a random 256-bit key, made from the volume key (no PBKDF
of the person's keyslot beyond the one that produced the volume key), and describes it in a
LUKS2 token of type ``keyhandoff-onetime``::

    {"type": "keyhandoff-onetime", "keyslots": ["3"], "not_after": 1767225600,
     "boot_id": "<arming boot>", "record_key": "<base64: the handoff record's AEAD key>"}

The keyslot's passphrase is the key in lower-case hex (64 ASCII characters): systemd's
password protocol carries C strings, so a binary key with a NUL byte would be cut short.
Once the volume is open the keyslot and its token are destroyed; every boot destroys the
ones past ``not_after`` or not claimed by a valid record.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from keyhandoff.luks import KeyslotNotFound, LuksError
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from keyhandoff.luks import LuksHeader

__all__ = ["KEY_LEN", "TOKEN_TYPE", "OnetimeSlot", "add", "destroy", "key_text", "slots"]

TOKEN_TYPE: Final = "keyhandoff-onetime"  # noqa: S105  # a LUKS2 token type name
KEY_LEN: Final = 32
_HEX: Final = b"0123456789abcdef"
#: The PBKDF of one-time keyslots (a random 256-bit key needs no costly one).
ONETIME_PBKDF: Final = "pbkdf2"
ONETIME_ITERATIONS: Final = 1000


@dataclass(frozen=True, slots=True, repr=False)
class OnetimeSlot:
    """A one-time keyslot as its token describes it."""

    token: int
    keyslot: int
    not_after: int
    boot_id: str
    record_key_b64: str

    def record_key(self) -> Secret:
        """The record key stored beside the keyslot (a new Secret; wipe it)."""
        try:
            raw = bytearray(base64.b64decode(self.record_key_b64, validate=True))
        except (binascii.Error, ValueError):
            raw = bytearray()
        return Secret(raw, allow_empty=True)

    def __repr__(self) -> str:
        return f"<OnetimeSlot token={self.token} keyslot={self.keyslot} not_after={self.not_after}>"


def key_text(key: Secret) -> Secret:
    """The keyslot passphrase for a one-time key: its lower-case hex, in a new Secret."""
    view = key.view()
    out = bytearray(2 * len(view))
    for i, b in enumerate(view):
        out[2 * i] = _HEX[b >> 4]
        out[2 * i + 1] = _HEX[b & 15]
    return Secret(out)


def add(
    header: LuksHeader,
    volume_key: Secret,
    *,
    not_after: int,
    boot_id: str,
    record_key: Secret,
) -> tuple[OnetimeSlot, Secret]:
    """Add a one-time keyslot and its token; return them and the raw 32-byte key.

    On a failure after the keyslot was added, the keyslot is destroyed again.
    """
    key = Secret(bytearray(os.urandom(KEY_LEN)))
    with key_text(key) as text:
        keyslot = header.add_onetime_keyslot(
            volume_key, text, pbkdf=ONETIME_PBKDF, iterations=ONETIME_ITERATIONS,
        )
    try:
        record_key_b64 = base64.b64encode(record_key.view()).decode()
        token = header.set_token({
            "type": TOKEN_TYPE,
            "keyslots": [str(keyslot)],
            "not_after": not_after,
            "boot_id": boot_id,
            "record_key": record_key_b64,
        })
    except BaseException:
        with contextlib.suppress(LuksError):
            header.destroy_keyslot(keyslot)
        key.wipe()
        raise
    return OnetimeSlot(token, keyslot, not_after, boot_id, record_key_b64), key


def _parse(token: int, data: dict[str, Any]) -> OnetimeSlot | None:
    try:
        [keyslot] = data["keyslots"]
        return OnetimeSlot(
            token=token,
            keyslot=int(keyslot),
            not_after=int(data["not_after"]),
            boot_id=str(data.get("boot_id", "")),
            record_key_b64=str(data.get("record_key", "")),
        )
    except (KeyError, ValueError, TypeError):
        return None


def slots(header: LuksHeader) -> list[OnetimeSlot]:
    """The one-time keyslots described in this header (malformed tokens are skipped)."""
    found = []
    for token, data in header.tokens.items():
        if data.get("type") == TOKEN_TYPE:
            slot = _parse(token, data)
            if slot is not None:
                found.append(slot)
    return found


def malformed_tokens(header: LuksHeader) -> list[int]:
    """Our tokens that do not parse (to be removed: they cannot be trusted to mean anything)."""
    return [t for t, d in header.tokens.items()
            if d.get("type") == TOKEN_TYPE and _parse(t, d) is None]


def destroy(header: LuksHeader, slot: OnetimeSlot) -> bool:
    """Destroy the keyslot, then its token; return whether a keyslot was destroyed.

    The keyslot is destroyed only when it still looks like one of ours: assigned to this
    token and protected by the cheap PBKDF we give one-time keys.  A token edited to name
    the person's keyslot (or a keyslot number reused since) loses only the token: the
    attack this stops is a forged token turning our clean-up into a way to wipe the
    person's passphrase.
    """
    destroyed = False
    with contextlib.suppress(KeyslotNotFound):
        if (
            slot.keyslot in header.keyslots
            and header.token_assigned(slot.token, slot.keyslot)
            and header.keyslot_pbkdf(slot.keyslot) == (ONETIME_PBKDF, ONETIME_ITERATIONS)
        ):
            header.destroy_keyslot(slot.keyslot)
            destroyed = True
    header.remove_token(slot.token)
    return destroyed
