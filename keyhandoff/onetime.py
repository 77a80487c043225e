"""One-time LUKS2 keyslots: what the ``efi`` channel hands over instead of the passphrase.

``arm`` adds a keyslot opened by a random 256-bit key, made from the volume key (no PBKDF
of the person's keyslot beyond the one that produced the volume key), and describes it in a
LUKS2 token of type ``keyhandoff-onetime``::

    {"type": "keyhandoff-onetime", "keyslots": ["3"], "not_after": 1767225600,
     "boot_id": "<arming boot>", "record_key": "<base64: the handoff record's AEAD key>",
     "binding": "<hex: SHA-256 over the keyslot's number and its own random KDF salt>"}

The keyslot's passphrase is the key in lower-case hex (64 ASCII characters): systemd's
password protocol carries C strings, so a binary key with a NUL byte would be cut short.
Once the volume is open the keyslot and its token are destroyed; every boot destroys the
ones past ``not_after`` or not claimed by a valid record.

**Which keyslot is ours.**  pbkdf2 with 1000 iterations says nothing: it is also every
``systemd-cryptenroll`` recovery, TPM2, FIDO2 and PKCS#11 keyslot, and cryptsetup's
minimum.  So the token is bound to the one keyslot *instance* it was made for: ``binding``
is a digest of that keyslot's number and its random KDF salt, read back from the header
right after the keyslot was added.  libcryptsetup draws a new salt for every keyslot it
makes, so after ``cryptsetup luksKillSlot`` and a new keyslot in the same number the
binding no longer matches.  A keyslot is destroyed only when it is active, assigned to the
token, has our PBKDF *and* its salt gives the token's binding; a token that fails any of
that loses only the token.  The binding is not a secret (the salt is in the header): it
stops stale tokens, tokens copied from another header and hand-made ones, which is what a
clean-up can be tricked with.  Whoever can write a forged token can write the header, and
so can destroy any keyslot without us (``crypt_keyslot_destroy`` needs no passphrase).

**Token text is untrusted.**  :func:`parse_token` takes the stored bytes and refuses
(``None``) anything but the exact shape above: at most :data:`MAX_TOKEN_BYTES`, valid
UTF-8, no duplicate keys, no floats, NaN or Infinity, no integer of more than 19 digits,
exactly these keys with exactly these types and ranges.  Nothing in a token raises.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import re
import uuid as _uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from keyhandoff import journal, names
from keyhandoff.journal import Event
from keyhandoff.luks import KeyslotNotFound, LuksError
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from keyhandoff.luks import LuksHeader

__all__ = [
    "KEY_LEN",
    "MAX_TOKEN_BYTES",
    "TOKEN_TYPE",
    "OnetimeSlot",
    "add",
    "binding",
    "destroy",
    "key_text",
    "not_ours",
    "parse_token",
    "remove_untrusted",
    "slots",
    "untrusted_tokens",
]

TOKEN_TYPE: Final = names.TOKEN_TYPE
KEY_LEN: Final = 32
_HEX: Final = b"0123456789abcdef"
#: The PBKDF of one-time keyslots (a random 256-bit key needs no costly one).
ONETIME_PBKDF: Final = "pbkdf2"
ONETIME_ITERATIONS: Final = 1000
#: Our tokens are about 250 bytes; anything much larger is not one of them.
MAX_TOKEN_BYTES: Final = 1024
#: LUKS2 has keyslots 0..31.
_MAX_KEYSLOTS: Final = 32
#: The record key's length (keyhandoff.record.RECORD_KEY_LEN; not imported: record loads
#: the AEAD backend, which the sweeps do not need).
_RECORD_KEY_LEN: Final = 32
_FIELDS: Final = frozenset({"type", "keyslots", "not_after", "boot_id", "record_key", "binding"})
_KEYSLOT_TEXT: Final = re.compile(r"0|[1-9][0-9]?")
_BINDING_TEXT: Final = re.compile(r"[0-9a-f]{64}")
_BINDING_CONTEXT: Final = b"keyhandoff-onetime keyslot binding v1\0"


@dataclass(frozen=True, slots=True, repr=False)
class OnetimeSlot:
    """A one-time keyslot as its (well-formed) token describes it."""

    token: int
    keyslot: int
    not_after: int
    boot_id: str
    record_key_b64: str
    binding: str

    def record_key(self) -> Secret:
        """The record key stored beside the keyslot (a new Secret; wipe it)."""
        try:
            raw = bytearray(base64.b64decode(self.record_key_b64, validate=True))
        except (binascii.Error, ValueError):
            raw = bytearray()
        return Secret(raw, allow_empty=True)

    def __repr__(self) -> str:
        return f"<OnetimeSlot token={self.token} keyslot={self.keyslot} not_after={self.not_after}>"


def binding(keyslot: int, salt: bytes) -> str:
    """The token's ``binding`` for a keyslot number and that keyslot's KDF salt (hex)."""
    digest = hashlib.sha256()
    digest.update(_BINDING_CONTEXT)
    digest.update(keyslot.to_bytes(4, "big"))
    digest.update(salt)
    return digest.hexdigest()


def _header_binding(header: LuksHeader, keyslot: int) -> str | None:
    salt = header.keyslot_salt(keyslot)
    return None if salt is None else binding(keyslot, salt)


def _new_binding(header: LuksHeader, keyslot: int) -> str:
    bound = _header_binding(header, keyslot)
    if bound is None:
        raise LuksError(errno.EIO, f"keyslot {keyslot} just added has no KDF salt to bind to")
    return bound


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
    """Add a one-time keyslot and its (bound) token; return them and the raw 32-byte key.

    On a failure after the keyslot was added, the keyslot is destroyed again.
    """
    key = Secret(bytearray(os.urandom(KEY_LEN)))
    with key_text(key) as text:
        keyslot = header.add_onetime_keyslot(
            volume_key, text, pbkdf=ONETIME_PBKDF, iterations=ONETIME_ITERATIONS,
        )
    try:
        bound = _new_binding(header, keyslot)
        record_key_b64 = base64.b64encode(record_key.view()).decode()
        token = header.set_token({
            "type": TOKEN_TYPE,
            "keyslots": [str(keyslot)],
            "not_after": not_after,
            "boot_id": boot_id,
            "record_key": record_key_b64,
            "binding": bound,
        })
    except BaseException:
        with contextlib.suppress(LuksError):
            header.destroy_keyslot(keyslot)
        key.wipe()
        raise
    return OnetimeSlot(token, keyslot, not_after, boot_id, record_key_b64, bound), key


class _Refused(Exception):
    """Inside the strict parser: the text is not one of our tokens."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Refused("duplicate key")
    return out


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # 19 digits: below 2**63
        raise _Refused("integer too long")
    return int(text)


def _no_float(_text: str) -> float:
    raise _Refused("float")


def _strict_json(raw: bytes) -> Any:  # noqa: ANN401  # whatever JSON held; checked by caller
    if len(raw) > MAX_TOKEN_BYTES:
        raise _Refused("too long")
    text = raw.decode("utf-8")  # UnicodeDecodeError (a ValueError) on invalid UTF-8
    return json.loads(text, object_pairs_hook=_unique, parse_float=_no_float,
                      parse_int=_small_int, parse_constant=_no_float)


def _lenient_type(raw: bytes) -> object:
    """The token's ``type`` as libcryptsetup reads it (last duplicate wins); never raises."""
    try:
        data = json.loads(raw.decode("utf-8", "replace"),
                          parse_int=str, parse_float=str, parse_constant=str)
    except (ValueError, RecursionError):
        return None
    return data.get("type") if isinstance(data, dict) else None


def _canonical_uuid(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(_uuid.UUID(value)) == value
    except ValueError:
        return False


def _record_key_ok(value: object) -> bool:
    if not isinstance(value, str) or not value.isascii():
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == _RECORD_KEY_LEN and base64.b64encode(raw).decode() == value


def parse_token(token: int, raw: bytes) -> OnetimeSlot | None:  # noqa: PLR0911  # one per rule
    """Our token from its stored bytes, or ``None`` for anything not exactly its shape."""
    try:
        data = _strict_json(raw)
    except (_Refused, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or set(data) != _FIELDS or data["type"] != TOKEN_TYPE:
        return None
    keyslots, not_after = data["keyslots"], data["not_after"]
    if not (isinstance(keyslots, list) and len(keyslots) == 1 and isinstance(keyslots[0], str)
            and _KEYSLOT_TEXT.fullmatch(keyslots[0]) and int(keyslots[0]) < _MAX_KEYSLOTS):
        return None
    if type(not_after) is not int or not 0 < not_after < 2**63:
        return None
    if not _canonical_uuid(data["boot_id"]) or not _record_key_ok(data["record_key"]):
        return None
    bound = data["binding"]
    if not isinstance(bound, str) or not _BINDING_TEXT.fullmatch(bound):
        return None
    return OnetimeSlot(token=token, keyslot=int(keyslots[0]), not_after=not_after,
                       boot_id=data["boot_id"], record_key_b64=data["record_key"],
                       binding=bound)


def not_ours(header: LuksHeader, slot: OnetimeSlot) -> str | None:
    """Why the keyslot a token names is not the one we made for it; ``None`` if it is."""
    try:
        if slot.keyslot not in header.keyslots:
            return f"keyslot {slot.keyslot} is not active"
        if not header.token_assigned(slot.token, slot.keyslot):
            return f"token {slot.token} is not assigned to keyslot {slot.keyslot}"
        if header.keyslot_pbkdf(slot.keyslot) != (ONETIME_PBKDF, ONETIME_ITERATIONS):
            return f"keyslot {slot.keyslot} does not have the PBKDF of a one-time keyslot"
        if _header_binding(header, slot.keyslot) != slot.binding:
            return (f"keyslot {slot.keyslot} is not the keyslot token {slot.token} was made "
                    "for (its salt does not give the token's binding)")
    except LuksError as exc:
        return f"keyslot {slot.keyslot} cannot be read: {exc}"
    return None


def _classify(header: LuksHeader) -> tuple[list[OnetimeSlot], dict[int, str]]:
    ours: list[OnetimeSlot] = []
    untrusted: dict[int, str] = {}
    for token, raw in header.token_texts.items():
        if _lenient_type(raw) != TOKEN_TYPE:
            continue
        slot = parse_token(token, raw)
        if slot is None:
            untrusted[token] = "malformed"
            continue
        reason = not_ours(header, slot)
        if reason is None:
            ours.append(slot)
        else:
            untrusted[token] = reason
    return ours, untrusted


def slots(header: LuksHeader) -> list[OnetimeSlot]:
    """The one-time keyslots in this header: well-formed tokens bound to their keyslot."""
    return _classify(header)[0]


def untrusted_tokens(header: LuksHeader) -> dict[int, str]:
    """Tokens of our type that are malformed or not bound to the keyslot they name: why."""
    return _classify(header)[1]


def remove_untrusted(header: LuksHeader) -> int:
    """Remove our untrusted tokens (never a keyslot); log each; return how many."""
    removed = 0
    for token, reason in untrusted_tokens(header).items():
        header.remove_token(token)
        removed += 1
        journal.log(Event.WIPED,
                    f"removed untrusted {TOKEN_TYPE} token {token} from {header.path}, "
                    f"no keyslot destroyed: {reason}",
                    priority=journal.WARNING, token=token)
    return removed


def destroy(header: LuksHeader, slot: OnetimeSlot) -> bool:
    """Destroy the keyslot, then its token; return whether a keyslot was destroyed.

    The keyslot is destroyed only when it is the keyslot instance the token was made for
    (:func:`not_ours`).  A token naming the person's keyslot, a keyslot number reused
    since, or a keyslot of the same cheap PBKDF that systemd-cryptenroll makes, loses only
    the token, and that is logged.
    """
    destroyed = False
    reason = not_ours(header, slot)
    if reason is None:
        with contextlib.suppress(KeyslotNotFound):
            header.destroy_keyslot(slot.keyslot)
            destroyed = True
    else:
        journal.log(Event.WIPED,
                    f"removed {TOKEN_TYPE} token {slot.token} from {header.path}, "
                    f"no keyslot destroyed: {reason}",
                    priority=journal.WARNING, token=slot.token)
    header.remove_token(slot.token)
    return destroyed
