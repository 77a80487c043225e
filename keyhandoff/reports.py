"""What the runner API's calls did, as values: for the runner's log and ``--json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from keyhandoff import timefmt

__all__ = ["ArmReport", "FinishReport", "RestoreReport", "VolumeReport"]


@dataclass(frozen=True, slots=True)
class VolumeReport:
    """What arming did for one volume."""

    uuid: str
    name: str
    armed: bool
    how: str


@dataclass(frozen=True, slots=True)
class ArmReport:
    """What ``arm``/``rearm`` did, and what the next boot will do."""

    channel: str
    reboot: str
    deadline: int
    boots: int
    login: str
    volumes: tuple[VolumeReport, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    def summary(self) -> str:
        """Plain words for the person or the runner's log."""
        when = timefmt.timestamp(self.deadline)
        armed = [v for v in self.volumes if v.armed]
        lines = [
            (f"Armed {len(armed)} volume(s) through the {self.channel} channel for "
             f"{self.boots} boot(s) of a {self.reboot} reboot, until {when}."),
        ]
        lines += [f"  {v.name} ({v.uuid}): {v.how}" if v.uuid else f"  {v.name}: {v.how}"
                  for v in self.volumes]
        lines.append(f"  login: {self.login}")
        lines.append(
            "The next boot unlocks these volumes without asking; after the deadline, or "
            "with `keyhandoff disarm`, the passphrase is asked as usual.",
        )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What ``restore`` found and did."""

    channel: str | None
    restored: tuple[str, ...]
    refused: str | None
    keyslots_destroyed: int


@dataclass(frozen=True, slots=True)
class FinishReport:
    """What ``finish`` did after the volumes were opened."""

    keyslots_destroyed: int
    login: str
