"""LUKS2 image files armed as ``arm`` arms them, and records sealed for them.

One-time keyslots are made by :func:`keyhandoff.onetime.add` and records sealed by
:mod:`keyhandoff.record`, the product's own code: the token plugin's tests and the kexec
channel's restore tests start from the state an arming boot leaves, without the transport.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyhandoff import onetime, record
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret
from support.luks_images import format_image
from support.passphrases import make

if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class Armed:
    """A LUKS2 image with a one-time keyslot and its token, as ``arm`` makes them."""

    path: Path
    volume: uuid.UUID
    slot: onetime.OnetimeSlot
    key: Secret  # the raw one-time key

    def entry(self, volume: uuid.UUID | None = None) -> record.Entry:
        return record.Entry(volume or self.volume, record.EntryKind.ONETIME_KEY, self.key.copy())


def arm_image(path: Path, record_key: Secret, *, not_after: int | None = None,
              passphrase: bytes | None = None) -> Armed:
    """Format ``path`` (with ``passphrase``, else a fresh test one) and add a one-time slot."""
    passphrase = passphrase if passphrase is not None else make("token")
    format_image(path, passphrase)
    with LuksHeader.open(str(path)) as header:
        _slot, vk = header.volume_key(Secret.passphrase(passphrase))
        with vk, record_key.copy() as kept:
            slot, key = onetime.add(header, vk, not_after=not_after or int(time.time()) + 3600,
                                    boot_id=str(uuid.uuid4()), record_key=kept)
        volume = uuid.UUID(header.uuid)
    return Armed(path, volume, slot, key)


def seal(entries: list[record.Entry], record_key: Secret, *, created: int | None = None,
         lifetime: int = 3600, boots_left: int = 1, boot: uuid.UUID | None = None,
         channel: record.RecordChannel = record.RecordChannel.EFI) -> bytes:
    """A sealed record of ``entries`` (wiped afterwards), armed in another boot by default."""
    created = int(time.time()) if created is None else created
    handoff = record.HandoffRecord(channel=channel, created=created,
                                   not_after=created + lifetime, boots_left=boots_left,
                                   boot_id=boot or uuid.uuid4(), entries=tuple(entries))
    with handoff:
        return record.seal(handoff, record_key)
