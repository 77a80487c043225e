"""One-time keyslots: finding them on every LUKS header of the machine, and destroying them.

A one-time keyslot is a way into its volume for as long as it exists, so every boot, every
arming and every disarm looks for them on *every* LUKS header it can find
(:func:`sweep_paths`), whether or not any chain state still names the volume: the state may
have expired or been removed, and a keyslot is not.  Tokens of our type that do not parse,
or are not bound to the keyslot they name, are removed (never their keyslot): nothing can
trust what they say.  Each header is opened once per sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyhandoff import journal
from keyhandoff.journal import Event
from keyhandoff.luks_scan import luks_paths

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from keyhandoff.chain import Chain
    from keyhandoff.host import Host
    from keyhandoff.onetime import OnetimeSlot

__all__ = ["FoundSlot", "destroy_all", "destroy_stale", "destroy_unclaimed", "find",
           "known_paths", "sweep_paths"]


@dataclass(frozen=True, slots=True)
class FoundSlot:
    """A one-time keyslot, the header path it was found through and its volume's UUID."""

    path: str
    volume: str
    slot: OnetimeSlot


def known_paths(chain: Chain | None, host: Host) -> list[str]:
    """The prompting crypttab sources, then the chain's volumes."""
    from keyhandoff import crypttab

    paths = [e.source_path for e in crypttab.read(host.crypttab_path)]
    if chain is not None:
        paths += [p for p in chain.paths() if p not in paths]
    return paths


def sweep_paths(given: Sequence[str], host: Host) -> list[str]:
    """Where the sweeps look for one-time keyslots: every LUKS header of the machine.

    ``given`` (crypttab, the chain, the caller's paths: image files are only found this
    way), every crypttab source (prompting or not: ``arm --volume`` takes any), and every
    LUKS block device (keyhandoff.luks_scan), each device once.  Nothing here depends on
    the chain state, which may have expired or been removed.
    """
    return luks_paths([*given, *(e.source_path for e in host.crypttab())])


def find(paths: Sequence[str]) -> list[FoundSlot]:
    """Every one-time keyslot on these volumes."""
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    found: list[FoundSlot] = []
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                found += [FoundSlot(path, header.uuid, s) for s in onetime.slots(header)]
        except (LuksError, OSError, ValueError):
            continue
    return found


def _destroy_where(paths: Sequence[str], doomed: Callable[[OnetimeSlot], bool],
                   seen: set[str] | None = None) -> int:
    """Destroy the one-time keyslots ``doomed`` picks; remove untrusted tokens.

    ``seen`` collects the UUID of every header read (after its keyslots were handled: a
    malformed UUID must not spare a keyslot).
    """
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    destroyed = 0
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                for slot in onetime.slots(header):
                    if doomed(slot):
                        destroyed += onetime.destroy(header, slot)
                onetime.remove_untrusted(header)
                if seen is not None:
                    seen.add(header.uuid)
        except (LuksError, OSError, ValueError):
            continue
    return destroyed


def destroy_unclaimed(paths: Sequence[str], claimed: set[str]) -> int:
    """Destroy one-time keyslots no valid record claims: expired, refused, consumed, crashed.

    ``claimed``: the bindings of the keyslots a record names (a binding names one keyslot
    instance, whichever path reaches its header).
    """
    destroyed = _destroy_where(paths, lambda slot: slot.binding not in claimed)
    if destroyed:
        journal.log(Event.WIPED, f"destroyed {destroyed} unclaimed one-time keyslot(s)",
                    keyslots=destroyed)
    return destroyed


def destroy_stale(paths: Sequence[str], host: Host) -> int:
    """After the volumes are open: destroy every one-time keyslot not armed in this boot.

    Its record was read (and deleted) by this boot's restore, or can no longer be used:
    such a keyslot only stays as a way into the volume.  One armed in this boot waits for
    the next boot; an expired one goes whatever its boot.
    """
    boot_id, now = host.boot_id(), host.now()
    return _destroy_where(
        sweep_paths(paths, host), lambda slot: slot.boot_id != boot_id or slot.not_after <= now,
    )


def destroy_all(paths: Sequence[str], seen: set[str]) -> int:
    """Destroy every one-time keyslot (disarm); add each header's UUID to ``seen``."""
    return _destroy_where(paths, lambda _slot: True, seen)
