"""Hand-edited LUKS headers for tests: a header whose UUID field holds what cryptsetup
would never write (cryptsetup luksUUID --uuid only takes a valid UUID and rewrites it).

LUKS1 has no header checksum; LUKS2 has one per binary header (sha256 over the header
area, the checksum field zeroed), recomputed here so libcryptsetup still loads the header
and hands the edited UUID to whoever asks.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

UUID_AT = 168
UUID_FIELD = 40
CSUM_AT = 448
CSUM_FIELD = 64


def _luks2_rechecksum(area: bytearray) -> None:
    assert area[72:78] == b"sha256"  # cryptsetup's default checksum
    area[CSUM_AT : CSUM_AT + CSUM_FIELD] = bytes(CSUM_FIELD)
    area[CSUM_AT : CSUM_AT + 32] = hashlib.sha256(area).digest()


def set_header_uuid(path: Path, raw: bytes, *, secondary: bool = True) -> None:
    """Write ``raw`` (NUL-padded to 40 bytes) as the header's UUID.

    LUKS2: into the primary header and, unless ``secondary=False``, the secondary one,
    recomputing each one's checksum.
    """
    field = raw.ljust(UUID_FIELD, b"\0")
    assert len(field) == UUID_FIELD
    with path.open("r+b") as f:
        head = bytearray(f.read(4096))
        version = int.from_bytes(head[6:8], "big")
        if version == 1:
            f.seek(UUID_AT)
            f.write(field)
            return
        hdr_size = int.from_bytes(head[8:16], "big")
        for offset in (0, hdr_size) if secondary else (0,):
            f.seek(offset)
            area = bytearray(f.read(hdr_size))
            area[UUID_AT : UUID_AT + UUID_FIELD] = field
            _luks2_rechecksum(area)
            f.seek(offset)
            f.write(area)
