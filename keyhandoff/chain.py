"""What is armed: the chain state between the runner's calls and the boot steps.

One key in our keyring, ``keyhandoff:chain`` (:data:`keyhandoff.names.CHAIN_KEY`), holds a
:class:`Chain` as JSON.  It is not secret (volume UUIDs and paths, a deadline, counters) and
is stored unpadded; its kernel timeout is the chain's deadline, so an expired chain is gone
without anyone removing it.  A chain is written only under the state lock
(:mod:`keyhandoff.statelock`).

The JSON keeps the field names of keyhandoff 0.1, so a chain armed before an upgrade of
keyhandoff (the offline update may be that upgrade) is still read after it.  Anything that
does not parse into exactly these types is no chain at all: the boot asks as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast

from keyhandoff import names
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from keyhandoff.cache import PassphraseCache

__all__ = ["CHAIN_KEY", "Chain", "Pending", "Reboot", "Target", "load"]

CHAIN_KEY: Final = names.CHAIN_KEY
Reboot = Literal["soft", "full", "kexec"]


@dataclass(frozen=True, slots=True)
class Target:
    """A volume to hand over: LUKS UUID, the path to its header, a name for messages."""

    uuid: str
    path: str
    name: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A volume restored in this boot and not finished yet.

    ``keyslot``/``token``/``path``: the one-time keyslot its restored key opens (channels
    that make one-time keyslots); ``None`` for a channel that kept the passphrase itself.
    """

    uuid: str
    keyslot: int | None = None
    token: int | None = None
    path: str | None = None


@dataclass(slots=True)
class Chain:
    """An armed handoff: which channel, until when, for how many boots, for which volumes."""

    channel: str
    reboot: Reboot
    not_after: int
    boots_left: int
    login: bool
    volumes: tuple[Target, ...] = ()
    #: boot id of the boot that last armed or re-armed (a full-reboot chain: rearm is once
    #: per boot, and a restore in that boot leaves the record for the next one)
    armed_boot: str = ""
    #: the volumes restored in this boot, to finish once they are open
    pending: tuple[Pending, ...] = ()
    #: boot id of the boot whose restore loaded this chain (a second restore does nothing)
    restored_boot: str = ""
    #: a soft-reboot chain: the boots it has started (its restores).  A soft reboot keeps
    #: the kernel's boot id, so such a chain counts its own boots.
    generation: int = 0
    #: a soft-reboot chain: the generation that last armed or re-armed (once per boot)
    armed_generation: int = 0
    #: a soft-reboot chain: systemd's SoftRebootsCount when armed or last restored (None when
    #: systemd does not say): a restore with the same count is a restarted unit, not a boot
    soft_reboots: int | None = None
    #: boot id of the boot in which ``keyhandoff schedule`` armed this chain by itself (an
    #: offline update was scheduled); "" for a runner's arm.  A cancelled schedule disarms
    #: only such a chain, and only in that boot (:mod:`keyhandoff.schedule`).
    auto_boot: str = ""
    #: not stored: JSON fields of a newer keyhandoff, kept so a save does not drop them
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def uuids(self) -> set[str]:
        """The armed volumes' UUIDs."""
        return {t.uuid for t in self.volumes}

    def paths(self) -> list[str]:
        """The armed volumes' header paths, each once, in order."""
        return list(dict.fromkeys(t.path for t in self.volumes))

    def to_json(self) -> bytes:
        """The stored form."""
        data: dict[str, Any] = dict(self._extra)
        data.update(
            channel=self.channel, reboot=self.reboot, not_after=self.not_after,
            boots_left=self.boots_left, login=self.login,
            volumes=[{"uuid": t.uuid, "path": t.path, "name": t.name} for t in self.volumes],
            armed_boot=self.armed_boot,
            pending=[{"uuid": p.uuid, "keyslot": p.keyslot, "token": p.token, "path": p.path}
                     for p in self.pending],
            restored_boot=self.restored_boot, generation=self.generation,
            armed_generation=self.armed_generation, soft_reboots=self.soft_reboots,
            auto_boot=self.auto_boot,
        )
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Chain | None:
        """Parse the stored form; ``None`` when it is not a chain."""
        try:
            data = json.loads(raw)
            return _parse(data) if isinstance(data, dict) else None
        except (ValueError, TypeError, KeyError):
            return None

    def save(self, cache: PassphraseCache, now: int) -> None:
        """Store (replacing any chain); the key expires at the deadline."""
        with Secret(self.to_json()) as payload:
            cache.put_key(CHAIN_KEY, payload, timeout=max(1, self.not_after - now),
                          padded=False)


_FIELDS: Final = frozenset({
    "channel", "reboot", "not_after", "boots_left", "login", "volumes", "armed_boot",
    "pending", "restored_boot", "generation", "armed_generation", "soft_reboots", "auto_boot",
})


_T = TypeVar("_T")


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(kind.__name__)
    return value


def _slot_number(value: object) -> int | None:
    # 0.1 stored -1 for "no keyslot" (a soft chain); that is None now
    if value is None:
        return None
    number = _typed(value, int)
    return None if number < 0 else number


def _parse(data: dict[str, Any]) -> Chain:
    reboot = _typed(data["reboot"], str)
    if reboot not in ("soft", "full", "kexec"):
        raise ValueError(reboot)
    volumes = tuple(
        Target(_typed(v["uuid"], str), _typed(v["path"], str), _typed(v["name"], str))
        for v in _typed(data["volumes"], list)
    )
    pending = tuple(
        Pending(_typed(p["uuid"], str), _slot_number(p.get("keyslot")),
                _slot_number(p.get("token")),
                None if p.get("path") is None else _typed(p["path"], str))
        for p in _typed(data.get("pending", []), list)
    )
    soft = data.get("soft_reboots")
    return Chain(
        channel=_typed(data["channel"], str), reboot=cast("Reboot", reboot),
        not_after=_typed(data["not_after"], int), boots_left=_typed(data["boots_left"], int),
        login=_typed(data["login"], bool), volumes=volumes,
        armed_boot=_typed(data.get("armed_boot", ""), str), pending=pending,
        restored_boot=_typed(data.get("restored_boot", ""), str),
        generation=_typed(data.get("generation", 0), int),
        armed_generation=_typed(data.get("armed_generation", 0), int),
        soft_reboots=None if soft is None else _typed(soft, int),
        auto_boot=_typed(data.get("auto_boot", ""), str),
        _extra={k: v for k, v in data.items() if k not in _FIELDS},
    )


def load(cache: PassphraseCache) -> Chain | None:
    """The armed chain, or ``None`` (none armed, expired, or not readable as one)."""
    raw = cache.get_key(CHAIN_KEY, padded=False)
    if raw is None:
        return None
    with raw:
        return Chain.from_json(bytes(raw.view()))
