"""Handoff channels: the ways a secret is carried across a reboot, one module each.

A channel is what the person's ``reboot=`` choice selects: ``keyring`` carries the
passphrases across a soft reboot in the kernel keyring (RAM only); ``efi`` carries one-time
keys across a full reboot in a sealed record in an EFI variable; ``kexec`` carries the same
record across ``systemctl kexec`` in a RAM-only segment of the loaded kernel's initrd.
:mod:`keyhandoff.update` does what every channel shares (choosing the volumes, asking once,
the state lock, the chain state, the keyslot sweeps, the login hand-off on the last boot)
and calls the chosen channel for the rest, through the :class:`Channel` interface below.  A
new channel is one module that implements it and one line in :data:`REGISTRY`.

What a channel implements, in the order the runner meets it:

``availability()``
    Cheap, with no write to firmware or flash: whether this machine could use the channel,
    in words.  For ``status`` and for choosing.
``refuse(work, targets)``
    Before any passphrase is asked or read: raise :class:`~keyhandoff.errors.ArmRefused`
    or :class:`~keyhandoff.errors.ChannelUnavailable` when the channel cannot carry these
    volumes (this may test the firmware for real).
``arm(work, chain, targets, passphrases)``
    Verify every passphrase (one PBKDF per volume), store what the next boot needs, save the
    chain; on a failure leave everything as it was.  Returns the report and the bindings of
    the one-time keyslots it made (the sweep that follows must spare them).
``rearm(work, chain)``
    Inside an update boot, once per boot: arm the chain's next boot.
``armed_this_boot(chain, host)``
    Whether the running boot armed or re-armed ``chain`` (what ``rearm`` refuses twice and
    ``restore`` leaves alone).
``restore(work, chain, volumes, wait)``
    Early in boot: load what the channel carried into the cache for the agent, and sweep
    what no valid record claims.  ``chain`` is ``None`` after a boot that lost the keyring.
``finish(work, chain, passphrases)``
    After the volumes are open: destroy what was used, keep what later boots need, append
    the passphrases the login may get to ``passphrases``.  Returns the keyslots destroyed.
``discard(host)``
    Remove what the channel stores outside our keyring (a record in firmware, a loaded
    kexec image); how many.
``forget_keys(cache, uuids)``
    Remove the channel's own keys in our keyring for these volumes; how many.

Where the record key lives is a separate choice (:mod:`keyhandoff.recordkey`): sealing it
to a TPM changes that, not the transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.asking import Passphrases, Progress
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.chain import Chain, Reboot, Target
    from keyhandoff.host import Host
    from keyhandoff.kexec import RunningKernel
    from keyhandoff.reports import ArmReport, RestoreReport
    from keyhandoff.secret import Secret

__all__ = ["REGISTRY", "Availability", "Channel", "Work", "cold", "for_reboot", "others"]


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether a channel could be used here, and why (never from a write)."""

    available: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Work:
    """What every channel call works with: our keyring, the machine, progress words.

    ``kernel``: the kernel a runner named for the ``kexec`` channel (None: the one the boot
    loader would start).
    """

    cache: PassphraseCache
    host: Host
    say: Progress
    kernel: RunningKernel | None = None


class Channel(Protocol):
    """One way to carry a handoff across a reboot (see the module documentation)."""

    #: the chain's ``channel`` and the reports' name for it
    name: ClassVar[str]
    #: the reboot it carries across (``arm(reboot=...)``)
    reboot: ClassVar[Reboot]
    #: whether our keyring survives that reboot (the chain state then survives too)
    keeps_keyring: ClassVar[bool]
    #: whether :func:`cold` calls this channel's ``restore`` after a boot without chain
    #: state (``kexec`` says no: ``efi``'s restore takes every one-time record, its too)
    cold_restore: ClassVar[bool]

    def availability(self) -> Availability:
        """Whether this machine could use the channel (no write to firmware or flash)."""
        ...

    def refuse(self, work: Work, targets: Sequence[Target]) -> None:
        """Raise before any secret is read when these volumes cannot be carried."""
        ...

    def arm(self, work: Work, chain: Chain, targets: Sequence[Target],
            passphrases: Passphrases) -> tuple[ArmReport, set[str]]:
        """Verify, store what the next boot needs, save ``chain``; undo on a failure."""
        ...

    def rearm(self, work: Work, chain: Chain) -> ArmReport:
        """Arm the chain's next boot from inside an update boot."""
        ...

    def armed_this_boot(self, chain: Chain, host: Host) -> bool:
        """Whether the running boot armed or re-armed ``chain``."""
        ...

    def restore(self, work: Work, chain: Chain | None, volumes: Sequence[str] | None,
                wait: float) -> RestoreReport:
        """Load what was carried into the cache; sweep what no valid record claims."""
        ...

    def finish(self, work: Work, chain: Chain, passphrases: list[Secret]) -> int:
        """Destroy what was used; keep what later boots need; collect login passphrases."""
        ...

    def discard(self, host: Host) -> int:
        """Remove what the channel stores outside our keyring; how many records."""
        ...

    def forget_keys(self, cache: PassphraseCache, uuids: set[str]) -> int:
        """Remove the channel's own keys in our keyring for ``uuids``; how many."""
        ...


def for_reboot(reboot: str) -> Channel:
    """The channel that carries across ``reboot`` (``"soft"``, ``"full"`` or ``"kexec"``)."""
    for channel in REGISTRY.values():
        if channel.reboot == reboot:
            return channel
    raise KeyError(reboot)


def cold() -> list[Channel]:
    """The channels that can find a handoff after our keyring was lost (no chain state)."""
    return [c for c in REGISTRY.values() if not c.keeps_keyring and c.cold_restore]


def others(channel: Channel) -> list[Channel]:
    """Every registered channel but ``channel``."""
    return [c for c in REGISTRY.values() if c is not channel]


def _registry() -> dict[str, Channel]:
    from keyhandoff.channels.efi import EfiChannel
    from keyhandoff.channels.kexec import KexecChannel
    from keyhandoff.channels.keyring import KeyringChannel

    channels: list[Channel] = [KeyringChannel(), EfiChannel(), KexecChannel()]
    return {c.name: c for c in channels}


#: Every channel, by name, in the order ``restore`` tries them after a cold boot.
REGISTRY: Final[dict[str, Channel]] = _registry()
