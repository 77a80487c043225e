"""The handoff record: what the next boot needs, sealed, with a deadline and a boot binding.

Pure: bytes in, values out, no I/O (randomness for keys and nonces comes from
``os.urandom``).  Storing the sealed bytes is the channel's business: for ``efi`` and
``efi-volatile``, :class:`keyhandoff.efi.RecordVariable`; for ``kexec``, a file in the
RAM-only initrd segment of the loaded kernel (:mod:`keyhandoff.channels.kexec`).

Record layout, version 1 (integers big-endian)::

    offset size field
         0    4 magic        b"KHST"
         4    1 version      1
         5    1 channel      1 keyring, 2 efi, 3 efi-volatile, 4 kexec
         6    1 boots_left   1..255 (0 is refused: nothing left to hand off)
         7    8 created      unix seconds, when it was armed
        15    8 not_after    unix seconds, deadline (created < not_after <= created + 7 days)
        23   16 boot_id      the arming boot's /proc/sys/kernel/random/boot_id
        39    8 key_id       HKDF(record key, "key-id"): which record key sealed this
        47   12 nonce        random, ChaCha20-Poly1305 nonce
        59    n ciphertext   ChaCha20-Poly1305(entries), associated data = bytes 0..58
      59+n   16 tag

    entries (the plaintext):
         0    1 count        1..16
    then per entry:
              16 volume      LUKS UUID (binary)
               1 kind        1 one-time LUKS key, 2 passphrase sealed to the volume key
               2 length
               n payload     kind 1: the 32-byte key; kind 2: keyhandoff.sealing's format

Where the record key comes from (and what it can and cannot do)
----------------------------------------------------------------
A record in NVRAM has no secret neighbour: after a reboot every EFI variable is readable
by any local user (mode 0644), and deleting one leaves its bytes in flash until a
compaction.  Without a TPM there is no place on the machine that an attacker holding both
the disk and the flash chip cannot read, so no choice of key gives the ``efi`` record
confidentiality against that attacker.  The design therefore limits *what* travels:

* the ``efi`` record carries **one-time LUKS keys**, each unlocking a keyslot that the
  agent destroys once its volume is open (and every boot destroys expired ones): a record
  read after the handoff unlocks nothing;
* anything the login path needs (the person's passphrase) travels only
  :func:`~keyhandoff.sealing.seal_to_volume_key`-encrypted, under a key derived with
  HKDF-SHA256 from the LUKS **volume key**, so it opens only after the disk is open, never
  from NVRAM alone.

The record's own AEAD key (``key`` in :func:`seal` / :func:`open_record`) is a random 32-byte
**record key** chosen at arming time and kept **outside the record**: for ``efi`` and
``efi-volatile``, in the plaintext JSON of each armed volume's LUKS2 ``keyhandoff-onetime``
token, next to the keyslot it belongs to (for ``keyring``, in a kernel key beside the
record).  That split buys three things a key stored inside the record cannot:

1. **Integrity before use.**  Every header field is associated data and the entries are
   authenticated, so a truncated, corrupted or edited record is refused before any key in
   it reaches libcryptsetup.  (A forged record could not unlock anything anyway: its keys
   would have to match a keyslot.  What must be stopped is an edited deadline, boot count or
   boot binding extending a real record's life.)
2. **Replay and foreign records.**  The token and its keyslot are removed together after
   the handoff.  An old record restored into NVRAM (a flash rewrite, a saved variable), or a
   record from another machine, finds no token whose key authenticates it: refused.
3. **Two places to steal.**  An NVRAM dump alone (including deleted-but-not-erased
   copies) or a disk image alone gives neither the one-time key nor the passphrase.

What it does not do, stated plainly: someone with the disk *and* the NVRAM while a record
is armed can unlock the disk once (as they could with any unattended reboot without a
TPM); ``not_after`` is enforced only by keyhandoff, and the keyslot's own deadline in the
token is what bounds that window.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Self

from cryptography.exceptions import InvalidTag

from keyhandoff.aead import NONCE_LEN, TAG_LEN, DerivedAead, hkdf_into
from keyhandoff.errors import (
    RecordError,
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
from keyhandoff.sealing import SEALED_OVERHEAD
from keyhandoff.secret import MAX_PASSPHRASE, Secret

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CLOCK_SKEW",
    "HEADER_LEN",
    "KEY_ID_LEN",
    "MAGIC",
    "MAX_BOOTS",
    "MAX_ENTRIES",
    "MAX_LIFETIME",
    "MAX_RECORD_SIZE",
    "ONETIME_KEY_LEN",
    "RECORD_KEY_LEN",
    "VERSION",
    "Entry",
    "EntryKind",
    "HandoffRecord",
    "RecordChannel",
    "RecordError",
    "RecordExhausted",
    "RecordExpired",
    "RecordForeign",
    "RecordHeader",
    "RecordMalformed",
    "RecordNotYetValid",
    "RecordRefused",
    "RecordSameBoot",
    "RecordTampered",
    "RecordUnknownFormat",
    "new_record_key",
    "open_record",
    "parse_header",
    "record_key_id",
    "seal",
]

MAGIC: Final = b"KHST"
VERSION: Final = 1
RECORD_KEY_LEN: Final = 32
ONETIME_KEY_LEN: Final = 32
KEY_ID_LEN: Final = 8
MAX_ENTRIES: Final = 16
MAX_BOOTS: Final = 255
#: A deadline further out is no deadline: arming is for the reboots of one update.
MAX_LIFETIME: Final = 7 * 24 * 3600
#: A clock this far before the arming time is not trusted (an RTC reset to its epoch would
#: otherwise put every deadline in the future again).
CLOCK_SKEW: Final = 300
#: Far below what firmware stores allow for one variable; anything longer is refused unread.
MAX_RECORD_SIZE: Final = 16384

_HEADER: Final = struct.Struct(">4sBBBQQ16s8s12s")
HEADER_LEN: Final = _HEADER.size  # 59
_ENTRY_HEAD: Final = struct.Struct(">16sBH")
_MIN_PLAINTEXT: Final = 1 + _ENTRY_HEAD.size + ONETIME_KEY_LEN

_INFO_RECORD_AEAD: Final = b"keyhandoff record v1 aead"
_INFO_RECORD_KEY_ID: Final = b"keyhandoff record v1 key-id"


# --------------------------------------------------------------------------- values


class RecordChannel(IntEnum):
    """Where a record travels: the channel byte (see keyhandoff.channels for the channels)."""

    KEYRING = 1
    EFI = 2
    EFI_VOLATILE = 3
    KEXEC = 4


class EntryKind(IntEnum):
    """What an entry's payload is."""

    #: A random 32-byte key for a one-time LUKS2 keyslot (the only kind useful before unlock).
    ONETIME_KEY = 1
    #: The person's passphrase, :func:`~keyhandoff.sealing.seal_to_volume_key`-encrypted
    #: (opens after unlock).
    SEALED_PASSPHRASE = 2


def _check_payload(kind: EntryKind, length: int) -> str | None:
    if kind is EntryKind.ONETIME_KEY and length != ONETIME_KEY_LEN:
        return f"one-time key must be {ONETIME_KEY_LEN} bytes, not {length}"
    if kind is EntryKind.SEALED_PASSPHRASE and not (
        SEALED_OVERHEAD < length <= SEALED_OVERHEAD + MAX_PASSPHRASE
    ):
        return f"sealed passphrase has an impossible length ({length})"
    return None


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class Entry:
    """One volume's entry.  ``payload`` is owned by this entry: :meth:`wipe` when done."""

    volume: uuid.UUID
    kind: EntryKind
    payload: Secret

    def __post_init__(self) -> None:
        problem = _check_payload(EntryKind(self.kind), len(self.payload))
        if problem:
            raise ValueError(problem)

    def wipe(self) -> None:
        """Wipe the payload."""
        self.payload.wipe()

    def __repr__(self) -> str:
        return f"<Entry {self.volume} {self.kind.name} {len(self.payload)} bytes>"


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class HandoffRecord:
    """A handoff record's content.  Validated on construction (seal side and open side)."""

    channel: RecordChannel
    created: int
    not_after: int
    boots_left: int
    boot_id: uuid.UUID
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        problem = _check_fields(self.created, self.not_after, self.boots_left) or _check_entries(
            self.entries
        )
        if problem:
            raise ValueError(problem)

    def wipe(self) -> None:
        """Wipe every entry's payload."""
        for entry in self.entries:
            entry.wipe()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return (
            f"<HandoffRecord {self.channel.name} created={self.created} "
            f"not_after={self.not_after} boots_left={self.boots_left} "
            f"entries={len(self.entries)}>"
        )


def _check_fields(created: int, not_after: int, boots_left: int) -> str | None:
    if not 0 <= created < 2**63 or not 0 <= not_after < 2**63:
        return "times out of range"
    if not_after <= created:
        return "deadline is not after the arming time"
    if not_after - created > MAX_LIFETIME:
        return f"deadline is more than {MAX_LIFETIME} s after arming"
    if not 0 <= boots_left <= MAX_BOOTS:
        return f"boots_left out of range 0..{MAX_BOOTS}"
    return None


def _check_entries(entries: tuple[Entry, ...]) -> str | None:
    if not 1 <= len(entries) <= MAX_ENTRIES:
        return f"a record holds 1..{MAX_ENTRIES} entries, not {len(entries)}"
    seen = {(e.volume, e.kind) for e in entries}
    if len(seen) != len(entries):
        # Two keys for one volume: which one restore would use would be up to the order.
        return "duplicate entry for a volume"
    return None


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The record's cleartext header (authenticated, not secret)."""

    version: int
    channel: RecordChannel
    boots_left: int
    created: int
    not_after: int
    boot_id: uuid.UUID
    key_id: bytes
    nonce: bytes


# --------------------------------------------------------------------------- keys


def new_record_key() -> Secret:
    """A fresh random record key (keep it outside the record; see the module docstring)."""
    return Secret(bytearray(os.urandom(RECORD_KEY_LEN)))


def _record_key_view(key: Secret) -> memoryview:
    view = key.view()
    if len(view) != RECORD_KEY_LEN:
        raise ValueError(f"a record key is {RECORD_KEY_LEN} bytes")
    return view


def record_key_id(key: Secret) -> bytes:
    """The 8-byte identifier of a record key (one-way; safe to store in the clear)."""
    out = bytearray(KEY_ID_LEN)
    hkdf_into(_record_key_view(key), info=_INFO_RECORD_KEY_ID, salt=None, out=out)
    return bytes(out)


def _record_aead(key: Secret) -> DerivedAead:
    """The record's AEAD: key = HKDF-SHA256(record key, no salt, info "...record v1 aead")."""
    view = _record_key_view(key)
    return DerivedAead(
        lambda out: hkdf_into(view, info=_INFO_RECORD_AEAD, salt=None, out=out)
    )


# --------------------------------------------------------------------------- record


def seal(record: HandoffRecord, key: Secret) -> bytes:
    """The sealed record: header in the clear (authenticated), entries encrypted."""
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        int(record.channel),
        record.boots_left,
        record.created,
        record.not_after,
        record.boot_id.bytes,
        record_key_id(key),
        os.urandom(NONCE_LEN),
    )
    plaintext = bytearray([len(record.entries)])
    try:
        for entry in record.entries:
            payload = entry.payload.view()
            plaintext += _ENTRY_HEAD.pack(entry.volume.bytes, int(entry.kind), len(payload))
            plaintext += payload
        total = HEADER_LEN + len(plaintext) + TAG_LEN
        if total > MAX_RECORD_SIZE:
            raise ValueError(f"record would be {total} bytes (limit {MAX_RECORD_SIZE})")
        out = bytearray(len(plaintext) + TAG_LEN)
        with _record_aead(key) as aead:
            aead.encrypt_into(header[-NONCE_LEN:], plaintext, header, out)
        return header + bytes(out)
    finally:
        plaintext[:] = bytes(len(plaintext))


def parse_header(blob: bytes | bytearray | memoryview) -> RecordHeader:
    """Check the framing and decode the header, so the caller can pick the record key.

    Nothing here is trusted yet: :func:`open_record` authenticates all of it.
    """
    size = len(blob)
    if size > MAX_RECORD_SIZE:
        raise RecordMalformed(f"oversized ({size} bytes, limit {MAX_RECORD_SIZE})")
    if bytes(blob[:4]) != MAGIC[: min(size, 4)] or size == 0:
        raise RecordUnknownFormat("no keyhandoff magic")
    if size > 4 and blob[4] != VERSION:
        raise RecordUnknownFormat(f"version {blob[4]} is not supported")
    if size < HEADER_LEN + _MIN_PLAINTEXT + TAG_LEN:
        raise RecordMalformed(f"truncated ({size} bytes)")
    (_magic, version, channel, boots_left, created, not_after, boot_id, key_id, nonce) = (
        _HEADER.unpack_from(blob)
    )
    try:
        channel_value = RecordChannel(channel)
    except ValueError:
        raise RecordMalformed(f"unknown channel {channel}") from None
    return RecordHeader(
        version=version,
        channel=channel_value,
        boots_left=boots_left,
        created=created,
        not_after=not_after,
        boot_id=uuid.UUID(bytes=boot_id),
        key_id=key_id,
        nonce=nonce,
    )


def open_record(
    blob: bytes | bytearray | memoryview,
    key: Secret,
    *,
    now: int,
    boot_id: uuid.UUID,
    channel: RecordChannel | None = None,
) -> HandoffRecord:
    """Authenticate, decrypt and validate a sealed record; raise :class:`RecordRefused`.

    ``now`` is the current unix time, ``boot_id`` the *current* boot's id, ``channel`` the
    channel it was read from (when given, a record sealed for another one is refused).
    Authentication comes first, so a refusal for any later reason is about a record that
    really was sealed with ``key``.
    """
    header = parse_header(blob)
    if channel is not None and header.channel is not channel:
        raise RecordForeign(f"sealed for channel {header.channel.name}, read from {channel.name}")
    if header.key_id != record_key_id(key):
        raise RecordForeign("sealed under another record key")

    view = memoryview(blob)
    plaintext = bytearray(len(view) - HEADER_LEN - TAG_LEN)
    try:
        try:
            with _record_aead(key) as aead:
                aead.decrypt_into(header.nonce, view[HEADER_LEN:], view[:HEADER_LEN], plaintext)
        except InvalidTag:
            raise RecordTampered("authentication failed") from None
        _check_authenticated_header(header, now=now, boot_id=boot_id)
        entries = _parse_entries(plaintext)
    finally:
        plaintext[:] = bytes(len(plaintext))
    return HandoffRecord(
        channel=header.channel,
        created=header.created,
        not_after=header.not_after,
        boots_left=header.boots_left,
        boot_id=header.boot_id,
        entries=entries,
    )


def _check_authenticated_header(header: RecordHeader, *, now: int, boot_id: uuid.UUID) -> None:
    problem = _check_fields(header.created, header.not_after, header.boots_left)
    if problem:
        raise RecordMalformed(problem)
    if header.boots_left == 0:
        raise RecordExhausted("armed for no further boot")
    if now > header.not_after:
        # Stops a record kept past its deadline (power off for a week, then boot).
        raise RecordExpired(f"deadline passed {now - header.not_after} s ago")
    if now < header.created - CLOCK_SKEW:
        # Stops a clock set back (RTC battery, firmware setup) reviving an old record.
        raise RecordNotYetValid(f"clock is {header.created - now} s before the arming time")
    if header.boot_id == boot_id:
        # Stops a record being consumed in the boot that wrote it (no reboot happened: a
        # local process, not the next boot, is asking).
        raise RecordSameBoot("the current boot armed it")


def _parse_entry(view: memoryview, offset: int) -> tuple[Entry, int]:
    if offset + _ENTRY_HEAD.size > len(view):
        raise RecordMalformed("entry table truncated")
    volume, kind_value, length = _ENTRY_HEAD.unpack_from(view, offset)
    offset += _ENTRY_HEAD.size
    try:
        kind = EntryKind(kind_value)
    except ValueError:
        raise RecordMalformed(f"unknown entry kind {kind_value}") from None
    problem = _check_payload(kind, length)
    if problem:
        raise RecordMalformed(problem)
    if offset + length > len(view):
        raise RecordMalformed("entry payload truncated")
    payload = Secret(bytearray(view[offset : offset + length]))
    return Entry(uuid.UUID(bytes=volume), kind, payload), offset + length


def _parse_entries(plaintext: bytearray) -> tuple[Entry, ...]:
    view = memoryview(plaintext)
    count = view[0]
    if not 1 <= count <= MAX_ENTRIES:
        raise RecordMalformed(f"entry count {count} out of range 1..{MAX_ENTRIES}")
    entries: list[Entry] = []
    offset = 1
    try:
        for _ in range(count):
            entry, offset = _parse_entry(view, offset)
            entries.append(entry)
        if offset != len(view):
            raise RecordMalformed(f"{len(view) - offset} bytes after the last entry")
        problem = _check_entries(tuple(entries))
        if problem:
            raise RecordMalformed(problem)
    except RecordRefused:
        for entry in entries:
            entry.wipe()
        raise
    return tuple(entries)

