"""The ``keyring`` channel: a soft reboot keeps the kernel keyring, so the passphrases stay.

``arm(reboot="soft")`` verifies each passphrase and keeps it in our keyring
(``keyhandoff:luks:<UUID>``) with the chain's deadline as its kernel timeout; nothing is
written to disk or firmware, and no one-time keyslot is made.  A soft reboot keeps the
kernel's boot id, so the chain counts its own boots (``generation``) and tells a new boot
from a restarted unit by systemd's ``SoftRebootsCount``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Final

from keyhandoff import journal
from keyhandoff.asking import verify
from keyhandoff.chain import Chain, Pending, Reboot
from keyhandoff.channels import Availability, Work, others
from keyhandoff.errors import KeyhandoffError, KeyUnavailable
from keyhandoff.journal import Event
from keyhandoff.reports import ArmReport, RestoreReport, VolumeReport
from keyhandoff.sweep import destroy_unclaimed, known_paths

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.asking import Passphrases
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.chain import Target
    from keyhandoff.host import Host
    from keyhandoff.secret import Secret

__all__ = ["KeyringChannel"]

_KEPT: Final = "passphrase kept in the kernel keyring (RAM)"


class KeyringChannel:
    """Passphrases in the kernel keyring across ``systemctl soft-reboot``."""

    name: ClassVar[str] = "keyring"
    reboot: ClassVar[Reboot] = "soft"
    keeps_keyring: ClassVar[bool] = True
    cold_restore: ClassVar[bool] = False

    def availability(self) -> Availability:
        """Always: the kernel keyring is there (whether systemd can soft-reboot is its own)."""
        return Availability(available=True, detail="the kernel keyring survives a soft reboot")

    def refuse(self, work: Work, targets: Sequence[Target]) -> None:
        """Any LUKS volume can be carried."""

    def arm(self, work: Work, chain: Chain, targets: Sequence[Target],
            passphrases: Passphrases) -> tuple[ArmReport, set[str]]:
        """Verify every passphrase, then keep them for the chain; on a failure, as they were."""
        cache = work.cache
        for t in targets:
            secret, source = passphrases[t.uuid]
            verify(t, secret, source, cache, work.say)
        chain.soft_reboots = work.host.soft_reboots()
        before = {e.volume: e.seconds_left for e in cache.entries()}
        now = work.host.now()
        put: list[str] = []
        try:
            for t in targets:
                if t.uuid not in put:
                    cache.put(t.uuid, passphrases[t.uuid][0], timeout=chain.not_after - now)
                    put.append(t.uuid)
            chain.save(cache, now)
        except BaseException:
            for u in put:  # what was cached keeps the time it had; what was asked goes
                left = before.get(u)
                with contextlib.suppress(KeyhandoffError, OSError, ValueError):
                    if left:
                        cache.put(u, passphrases[u][0], timeout=left)
                    else:
                        cache.forget(u)
            raise
        reports = tuple(VolumeReport(t.uuid, t.name, armed=True, how=_KEPT) for t in targets)
        login = ("the passphrase goes to the login keyring on the last boot" if chain.login
                 else "not requested")
        return ArmReport(self.name, chain.reboot, chain.not_after, chain.boots_left, login,
                         reports), set()

    def rearm(self, work: Work, chain: Chain) -> ArmReport:
        """Nothing to write: mark this generation armed."""
        chain.armed_generation = chain.generation
        chain.armed_boot = work.host.boot_id()
        chain.save(work.cache, work.host.now())
        reports = tuple(VolumeReport(t.uuid, t.name, armed=True,
                                     how="passphrase still in the kernel keyring")
                        for t in chain.volumes)
        return ArmReport(self.name, chain.reboot, chain.not_after, chain.boots_left,
                         "on the last boot" if chain.login else "not requested", reports)

    def armed_this_boot(self, chain: Chain, host: Host) -> bool:  # noqa: ARG002  # interface
        """The boot id does not change across a soft reboot: the generation does."""
        return chain.armed_generation == chain.generation

    def restore(self, work: Work, chain: Chain | None, volumes: Sequence[str] | None,
                wait: float) -> RestoreReport:  # noqa: ARG002  # nothing to wait for
        """Count the boot down; the passphrases are in the keyring already."""
        if chain is None or chain.pending:
            # restored already and not finished yet (the unit ran twice in one userspace): a
            # soft reboot keeps the boot id, so this marker is what counts each boot once
            return RestoreReport(self.name, (), None, 0)
        count = work.host.soft_reboots()
        if count is not None and count == chain.soft_reboots:
            # no soft reboot since the chain was armed or last restored: the unit was
            # restarted (a package upgrade, systemctl restart) in a boot counted already
            return RestoreReport(self.name, (), None, 0)
        # A soft chain makes no one-time keyslots and needs no record: any there are stale
        # (an earlier full arming, a crash), and are swept as on every boot.
        for other in others(self):
            try:
                other.discard(work.host)
            except (KeyhandoffError, OSError) as exc:
                journal.log(Event.RECORD_REFUSED,
                            f"the record could not be deleted, so it is not used: {exc}",
                            priority=journal.WARNING)
        paths = list(volumes) if volumes is not None else known_paths(chain, work.host)
        destroyed = destroy_unclaimed(paths, set())
        chain.boots_left -= 1
        chain.generation += 1
        chain.soft_reboots = count
        chain.pending = tuple(Pending(t.uuid) for t in chain.volumes)
        chain.save(work.cache, work.host.now())
        journal.log(Event.RESTORED, "restored from the kernel keyring",
                    channel=self.name, volumes=len(chain.volumes), boots_left=chain.boots_left)
        return RestoreReport(self.name, tuple(t.uuid for t in chain.volumes), None, destroyed)

    def finish(self, work: Work, chain: Chain, passphrases: list[Secret]) -> int:
        """On the last boot, the kept passphrases may go to the login; no keyslot to destroy."""
        if chain.boots_left <= 0 and chain.login:
            for item in chain.pending:
                with contextlib.suppress(KeyUnavailable):
                    passphrases.append(work.cache.get(item.uuid))
        return 0

    def discard(self, host: Host) -> int:  # noqa: ARG002  # the interface's
        """Nothing is stored outside the keyring."""
        return 0

    def forget_keys(self, cache: PassphraseCache, uuids: set[str]) -> int:  # noqa: ARG002
        """No keys of its own: the passphrases are the cache's, forgotten by ``disarm``."""
        return 0
