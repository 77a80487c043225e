"""The ``efi`` channel: one-time keys across a full reboot, in a sealed EFI-variable record.

``arm(reboot="full")`` reads each volume key (the passphrase check: one PBKDF), adds a
one-time LUKS2 keyslot with its bound token, and writes a record (:mod:`keyhandoff.record`)
holding only the one-time keys, sealed under a record key kept beside the keyslots
(:mod:`keyhandoff.recordkey`).  For the login, the passphrase travels sealed to the volume
key (:mod:`keyhandoff.sealing`): it opens only once the disk is open.  LUKS1 volumes and
machines without writable EFI variables are refused, never downgraded.

At boot ``restore`` takes the record from ``keyhandoff:record`` in our keyring when the token
plugin (which opened a volume with its one-time key in the initramfs) left it there, else
from the EFI variable; either way it is removed before it is opened.

Between the boots of a chain our keyring holds ``keyhandoff:vk:<UUID>`` (a volume key, only
while another re-arm is needed) and ``keyhandoff:sealed:<UUID>`` (the sealed login
passphrase), each expiring in the kernel at the chain's deadline.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid as _uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

from keyhandoff import journal, names
from keyhandoff.asking import refuse_wrong
from keyhandoff.cache import SystemdCache
from keyhandoff.chain import CHAIN_KEY, Chain, Pending, Reboot, Target
from keyhandoff.channels import Availability, Work
from keyhandoff.errors import ArmRefused, ChannelUnavailable, KeyUnavailable, NotArmed
from keyhandoff.journal import Event
from keyhandoff.recordkey import STORE
from keyhandoff.reports import ArmReport, RestoreReport, VolumeReport
from keyhandoff.secret import Secret
from keyhandoff.sweep import FoundSlot, destroy_unclaimed, find, known_paths, sweep_paths

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.asking import Passphrases
    from keyhandoff.cache import PassphraseCache
    from keyhandoff.host import Host
    from keyhandoff.record import HandoffRecord

__all__ = ["EfiChannel"]

VK_PREFIX: Final = names.VK_PREFIX
SEALED_PREFIX: Final = names.SEALED_PREFIX
#: How long a restored one-time key may wait for its prompt.
RESTORE_TIMEOUT: Final = 600


def login_context(volume: str) -> bytes:
    """The context a login passphrase is sealed to, besides the volume key."""
    return b"keyhandoff login:" + volume.encode()


class EfiChannel:
    """One-time keys in a sealed EFI-variable record across a full reboot."""

    name: ClassVar[str] = "efi"
    reboot: ClassVar[Reboot] = "full"
    keeps_keyring: ClassVar[bool] = False
    #: this channel's restore takes every one-time record there is, the kexec channel's too
    cold_restore: ClassVar[bool] = True
    #: the record's channel byte (a :class:`keyhandoff.record.RecordChannel` name)
    record_channel: ClassVar[str] = "EFI"
    #: where the record travels, for the reports
    carrier: ClassVar[str] = "the EFI record"

    # --- choosing -------------------------------------------------------------------------

    def availability(self) -> Availability:
        """Whether runtime variables are there (reads only: a probe write wears flash)."""
        from keyhandoff import efi

        if not efi.supported():
            return Availability(available=False, detail="no UEFI runtime variables")
        return Availability(available=True, detail="UEFI runtime variables present "
                            "(writability is tested when arming)")

    def refuse(self, work: Work, targets: Sequence[Target]) -> None:  # noqa: ARG002
        """Refuse before asking: no writable EFI variables, or a LUKS1 volume."""
        from keyhandoff import efi

        caps = efi.probe()
        if not caps.nv_writable:
            raise ChannelUnavailable(f"cannot carry a record across a full reboot: {caps.detail}")
        self._refuse_luks1(targets)

    def _refuse_luks1(self, targets: Sequence[Target]) -> None:
        """A one-time keyslot needs a LUKS2 token: refuse LUKS1 volumes, never downgrade."""
        from keyhandoff.luks import LuksHeader

        refused = []
        for t in targets:
            with LuksHeader.open(t.path) as header:
                if header.luks_version != 2:
                    refused.append(VolumeReport(
                        t.uuid, t.name, armed=False,
                        how="LUKS1 has no tokens for a one-time keyslot; the passphrase would "
                            "have to be stored, which keyhandoff refuses"))
        if refused:
            report = ArmReport(self.name, self.reboot, 0, 0, "not armed", tuple(refused))
            raise ArmRefused("; ".join(f"{r.name}: {r.how}" for r in refused), report)

    # --- arming ---------------------------------------------------------------------------

    def arm(self, work: Work, chain: Chain, targets: Sequence[Target],
            passphrases: Passphrases) -> tuple[ArmReport, set[str]]:
        """Read every volume key first (the passphrase check: one PBKDF each), then write."""
        from keyhandoff.luks import LuksHeader, WrongPassphrase

        volume_keys: dict[str, Secret] = {}
        try:
            for t in targets:
                if t.uuid in volume_keys:
                    continue
                secret, source = passphrases[t.uuid]
                work.say(f"reading the volume key of {t.name} ({source}; one PBKDF)")
                with LuksHeader.open(t.path) as header:
                    try:
                        _slot, volume_keys[t.uuid] = header.volume_key(secret)
                    except WrongPassphrase:
                        raise refuse_wrong(t, work.cache, source) from None
            login = {u: s for u, (s, _src) in passphrases.items()} if chain.login else {}
            return self._write(work, chain, volume_keys, login)
        finally:
            for vk in volume_keys.values():
                vk.wipe()

    def rearm(self, work: Work, chain: Chain) -> ArmReport:
        """A new record and new one-time keyslots from the volume keys kept since finish."""
        cache = work.cache
        volume_keys: dict[str, Secret] = {}
        login: dict[str, Secret] = {}
        try:
            for t in chain.volumes:
                vk = cache.get_key(VK_PREFIX + t.uuid)
                if vk is None:
                    raise NotArmed(f"the volume key of {t.name} is gone (expired?)")
                volume_keys[t.uuid] = vk
                if chain.login:
                    login[t.uuid] = cache.get(t.uuid)
            report, _ours = self._write(work, chain, volume_keys, login)
        finally:
            for secret in (*volume_keys.values(), *login.values()):
                secret.wipe()
        for t in chain.volumes:
            cache.forget_key(VK_PREFIX + t.uuid)
        return report

    def _write(self, work: Work, chain: Chain, volume_keys: dict[str, Secret],
               login_passphrases: dict[str, Secret]) -> tuple[ArmReport, set[str]]:
        """Add one-time keyslots, seal the record, store it, save the chain.

        On a failure the keyslots this call added are destroyed again.  The EFI variable is
        replaced by delete-then-write: once the store was tried, a previous record may be
        gone (or be this call's, useless without its keyslots), so the chain that needed it
        goes too and nothing claims to be armed that is not.
        """
        from keyhandoff import onetime, record, sealing
        from keyhandoff.luks import LuksError, LuksHeader

        now, boot_id = work.host.now(), work.host.boot_id()
        entries: list[record.Entry] = []
        reports = []
        created: list[tuple[str, onetime.OnetimeSlot]] = []
        record_key = STORE.new_key()
        stored = "no"
        try:
            for t in chain.volumes:
                with LuksHeader.open(t.path) as header, volume_keys[t.uuid].copy() as vk, \
                        STORE.beside_keyslot(record_key) as kept:
                    work.say(f"adding a one-time keyslot to {t.name}")
                    slot_info, key = onetime.add(header, vk, not_after=chain.not_after,
                                                 boot_id=boot_id, record_key=kept)
                    created.append((t.path, slot_info))
                    volume = _uuid.UUID(t.uuid)
                    entries.append(record.Entry(volume, record.EntryKind.ONETIME_KEY, key))
                    passphrase = login_passphrases.get(t.uuid)
                    if passphrase is not None:
                        sealed = sealing.seal_to_volume_key(vk, passphrase, login_context(t.uuid))
                        entries.append(record.Entry(
                            volume, record.EntryKind.SEALED_PASSPHRASE, Secret(sealed)))
                reports.append(VolumeReport(
                    t.uuid, t.name, armed=True,
                    how=f"one-time keyslot {slot_info.keyslot}; {self.carrier} holds only "
                        "its key"))
            sealed_record = record.HandoffRecord(
                channel=record.RecordChannel[self.record_channel], created=now,
                not_after=chain.not_after,
                boots_left=chain.boots_left, boot_id=_uuid.UUID(boot_id), entries=tuple(entries),
            )
            blob = record.seal(sealed_record, record_key)
            stored = "tried"
            self._store(work, blob)
            stored = "yes"
            chain.armed_boot = boot_id
            chain.save(work.cache, now)
        except BaseException:
            for path, slot in created:
                with contextlib.suppress(LuksError, OSError), LuksHeader.open(path) as header:
                    onetime.destroy(header, slot)
            if stored != "no":
                self._unstore(work, stored=stored == "yes")
            raise
        finally:
            record_key.wipe()
            for e in entries:
                e.wipe()
        login = ("the passphrase travels sealed to the volume key and goes to the login "
                 "keyring on the last boot") if chain.login else "not requested"
        report = ArmReport(self.name, chain.reboot, chain.not_after, chain.boots_left, login,
                           tuple(reports))
        return report, {slot.binding for _path, slot in created}

    def _store(self, work: Work, blob: bytes) -> None:
        """Store the sealed record where the next boot finds it (here: the EFI variable)."""
        from keyhandoff import efi

        work.say("writing the handoff record to the EFI variable")
        efi.RecordVariable().store(blob)

    def _unstore(self, work: Work, *, stored: bool) -> None:
        """After a failed arm that tried to store: remove the record and the chain with it.

        ``stored``: the store had succeeded.  When it had not, a previous record may be gone
        all the same (the variable is replaced by delete-then-write).
        """
        from keyhandoff import efi

        with contextlib.suppress(efi.EfiError, OSError):
            if stored or not efi.RECORD_VARIABLE.exists():
                with contextlib.suppress(efi.EfiVariableNotFound):
                    efi.RECORD_VARIABLE.delete()
                work.cache.forget_key(CHAIN_KEY)
                journal.log(Event.WIPED, "the EFI record could not be replaced: "
                            "nothing is armed now", priority=journal.WARNING)

    def armed_this_boot(self, chain: Chain, host: Host) -> bool:
        """A full reboot (or a kexec) changes the boot id."""
        return chain.armed_boot == host.boot_id()

    # --- boot time ------------------------------------------------------------------------

    def restore(self, work: Work, chain: Chain | None, volumes: Sequence[str] | None,
                wait: float) -> RestoreReport:
        """Take the record (read and delete), check it, cache its one-time keys; sweep."""
        from keyhandoff import record

        if chain is not None and self.armed_this_boot(chain, work.host):
            journal.log(Event.RESTORED, "armed in this boot: the record is for the next boot",
                        channel=self.name, volumes=0)
            return RestoreReport(None, (), None, 0)
        if chain is not None and chain.restored_boot == work.host.boot_id():
            return RestoreReport(None, (), None, 0)  # restored already in this boot
        given = list(volumes) if volumes is not None else known_paths(None, work.host)
        blob, refused, source = _take_record(work.cache, work.host)
        if blob is not None and wait > 0:
            _wait_for(given, wait)  # only when a record needs the headers: not on every boot
        paths = sweep_paths(given, work.host)
        now = work.host.now()
        found = find(paths)
        claimed: set[str] = set()
        opened = None
        if blob is not None:
            with blob:
                try:
                    opened, claimed = _open_record(blob, found, now, work.host, source)
                except record.RecordRefused as exc:
                    refused = str(exc)
                    journal.log(Event.RECORD_REFUSED, f"handoff record refused: {exc}",
                                priority=journal.WARNING, reason=str(exc))
        destroyed = destroy_unclaimed(paths, claimed)
        restored: list[str] = []
        name = source.channel if blob is not None else None
        if opened is not None:
            name = _CHANNELS[opened.channel.name][0]
            with opened:
                restored = self._load(work, opened, found, claimed, now)
        return RestoreReport(name, tuple(restored), refused, destroyed)

    def _load(self, work: Work, opened: HandoffRecord, found: list[FoundSlot],
              claimed: set[str], now: int) -> list[str]:
        from keyhandoff import onetime, record

        cache = work.cache
        timeout = max(1, min(opened.not_after - now, RESTORE_TIMEOUT))
        restored: list[str] = []
        pending: list[Pending] = []
        volumes: list[Target] = []
        for entry in opened.entries:
            volume = str(entry.volume)
            slots = [f for f in found if f.volume == volume and f.slot.binding in claimed]
            if not slots:
                continue
            path, slot = slots[0].path, slots[0].slot
            if entry.kind is record.EntryKind.ONETIME_KEY:
                with onetime.key_text(entry.payload) as text:
                    cache.put_onetime(volume, text, timeout=timeout)
                restored.append(volume)
                pending.append(Pending(volume, slot.keyslot, slot.token, path))
                volumes.append(Target(volume, path, os.path.basename(path)))
            elif entry.kind is record.EntryKind.SEALED_PASSPHRASE:
                cache.put_key(SEALED_PREFIX + volume, entry.payload,
                              timeout=max(1, opened.not_after - now))
        login = any(e.kind is record.EntryKind.SEALED_PASSPHRASE for e in opened.entries)
        name, reboot = _CHANNELS[opened.channel.name]
        chain = Chain(channel=name, reboot=reboot, not_after=opened.not_after,
                      boots_left=opened.boots_left - 1, login=login, volumes=tuple(volumes),
                      pending=tuple(pending), restored_boot=work.host.boot_id())
        chain.save(cache, now)
        journal.log(Event.RESTORED, f"restored one-time keys for {len(restored)} volume(s)",
                    channel=name, volumes=len(restored), boots_left=chain.boots_left)
        return restored

    def finish(self, work: Work, chain: Chain, passphrases: list[Secret]) -> int:
        """Destroy each used one-time keyslot; keep the volume key while boots remain."""
        return sum(self._finish_volume(work, chain, item, passphrases) for item in chain.pending)

    def _finish_volume(self, work: Work, chain: Chain, item: Pending,
                       passphrases: list[Secret]) -> int:
        from keyhandoff.luks import LuksError

        cache, volume = work.cache, item.uuid
        try:
            key: Secret | None = cache.get_onetime(volume)
        except KeyUnavailable:
            key = None
        # The one-time key answered its prompt; it must neither stay in our cache nor in
        # systemd's, where pam_gdm would take it for "the last entry".
        cache.forget_onetime(volume)
        sealed = cache.get_key(SEALED_PREFIX + volume)
        cache.forget_key(SEALED_PREFIX + volume)
        try:
            return self._use_and_destroy(work, chain, item, key, sealed, passphrases)
        except (LuksError, OSError) as exc:
            journal.log(Event.ERROR, f"could not finish the handoff for {volume}: {exc}",
                        priority=journal.WARNING, volume=volume)
            return 0
        finally:
            if sealed is not None:
                sealed.wipe()
            if key is not None:
                SystemdCache().remove([key])
                key.wipe()

    def _use_and_destroy(self, work: Work, chain: Chain, item: Pending, key: Secret | None,
                         sealed: Secret | None, passphrases: list[Secret]) -> int:
        """Open the volume key with the one-time key, carry on, destroy the keyslot."""
        from keyhandoff import onetime
        from keyhandoff.luks import LuksError, LuksHeader

        if item.path is None or item.keyslot is None:
            return 0  # not a one-time keyslot of ours (a chain of another channel)
        destroyed = 0
        with LuksHeader.open(item.path) as header:
            if key is not None:
                try:
                    _slot, vk = header.volume_key(key, keyslot=item.keyslot)
                except LuksError:
                    vk = None
                if vk is not None:
                    with vk:
                        self._carry_on(work, chain, item.uuid, vk, sealed, passphrases)
            for slot in onetime.slots(header):
                if slot.token == item.token:
                    destroyed += onetime.destroy(header, slot)
        return destroyed

    def _carry_on(self, work: Work, chain: Chain, volume: str, vk: Secret,
                  sealed: Secret | None, passphrases: list[Secret]) -> None:
        """With the volume key: open the sealed login passphrase; keep what later boots need."""
        from keyhandoff import sealing

        cache = work.cache
        deadline_left = max(1, chain.not_after - work.host.now())
        if sealed is not None:
            try:
                pw = sealing.open_with_volume_key(vk, sealed.view(), login_context(volume))
            except sealing.SealedPayloadRefused:
                journal.log(Event.ERROR, f"the sealed login passphrase for {volume} did not open",
                            priority=journal.WARNING, volume=volume)
            else:
                if chain.boots_left > 0:
                    cache.put(volume, pw, timeout=deadline_left)  # re-sealed by rearm()
                passphrases.append(pw)
        if chain.boots_left > 0:
            cache.put_key(VK_PREFIX + volume, vk, timeout=deadline_left)

    # --- wiping ---------------------------------------------------------------------------

    def discard(self, host: Host) -> int:  # noqa: ARG002  # the interface's
        """Delete the record variable and the initramfs's copy of it; how many there were."""
        from keyhandoff import efi
        from keyhandoff.cache import PassphraseCache

        count = int(PassphraseCache().forget_key(names.RECORD_BLOB_KEY))  # the initramfs's copy
        if not efi.supported():
            return count
        try:
            efi.RECORD_VARIABLE.delete()
        except efi.EfiVariableNotFound:
            return count
        return count + 1

    def forget_keys(self, cache: PassphraseCache, uuids: set[str]) -> int:
        """The kept volume keys and sealed login payloads of these volumes."""
        return sum(cache.forget_key(prefix + u) for u in uuids
                   for prefix in (VK_PREFIX, SEALED_PREFIX))


def _wait_for(paths: list[str], seconds: float) -> None:
    """Early in boot the volumes' device links may not exist yet: wait for them, bounded."""
    deadline = time.monotonic() + seconds
    while any(not os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record was taken from, and the channel bytes a record from there may carry."""

    #: the channel a refused record from here is reported under
    channel: str
    accepts: frozenset[str]


#: The record's channel byte (a RecordChannel name): the channel and reboot it restores as.
_CHANNELS: Final[dict[str, tuple[str, Reboot]]] = {"EFI": ("efi", "full"),
                                                   "KEXEC": ("kexec", "kexec")}
#: The token plugin publishes a record of either channel there, after checking its source.
PUBLISHED: Final = Source("efi", frozenset(_CHANNELS))
KEXEC_FILE: Final = Source("kexec", frozenset({"KEXEC"}))
EFI_VARIABLE: Final = Source("efi", frozenset({"EFI"}))
NO_SOURCE: Final = Source("", frozenset())


def _take_record(cache: PassphraseCache,
                 host: Host) -> tuple[Secret | None, str | None, Source]:
    """The sealed record, taken so it is never used twice; why one was refused; its source.

    Three sources, newest first, each read and removed before anything is opened:

    1. ``keyhandoff:record`` (:data:`~keyhandoff.names.RECORD_BLOB_KEY`) in our keyring:
       where the token plugin in the initramfs put the record when it opened a volume (it
       removed the record's source before it answered).  Read only under the trust rule
       (:func:`keyhandoff.keyring.find_trusted`: root's, exactly our permissions, found
       from our keyring; a key of that name that fails it is ignored and left alone).
    2. The kexec channel's file (``host.kexec_record_path``), which the initramfs moved
       there from the loaded initrd segment: only root's own private regular file is read.
    3. The EFI variable.

    The first one there is used and the others, stale, are deleted; whichever cannot be
    removed, nothing is used.
    """
    taken: list[tuple[Secret, Source]] = []
    refusals: list[str] = []
    for (blob, why), source in ((_take_published(cache), PUBLISHED),
                                (_take_file(host.kexec_record_path), KEXEC_FILE),
                                (_take_variable(), EFI_VARIABLE)):
        if blob is not None:
            taken.append((blob, source))
        if why is not None:
            refusals.append(why)
    if refusals:
        for blob, _source in taken:
            blob.wipe()
        return None, refusals[0], NO_SOURCE
    if not taken:
        return None, None, NO_SOURCE
    for stale, source in taken[1:]:
        stale.wipe()
        journal.log(Event.WIPED, f"deleted a stale {source.channel} record (a newer one was "
                    "taken first)")
    return taken[0][0], None, taken[0][1]


def _take_variable() -> tuple[Secret | None, str | None]:
    """The EFI variable's record, read and deleted; or why it is not used."""
    from keyhandoff import efi

    if not efi.supported():
        return None, None
    try:
        return efi.RecordVariable().take(), None
    except efi.EfiError as exc:
        why = f"the record could not be deleted, so it is not used: {exc}"
        journal.log(Event.RECORD_REFUSED, why, priority=journal.WARNING)
        return None, why


def _take_file(path: str) -> tuple[Secret | None, str | None]:
    """The kexec record at ``path``, removed before it is returned; or why it is not used.

    Only a regular file owned by root, with no permission for group or others, and no
    larger than a record can be, is read (opened without following a link).  Anything else
    of that name is refused and left alone for someone to look at.
    """
    from keyhandoff import record

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        why = f"the kexec record {path} cannot be opened, so it is not used: {exc.strerror}"
        journal.log(Event.RECORD_REFUSED, why, priority=journal.WARNING)
        return None, why
    try:
        info = os.fstat(fd)
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o077
                or info.st_size > record.MAX_RECORD_SIZE):
            why = (f"the kexec record {path} is not root's private file of a record's size, "
                   "so it is not used (left as it is)")
            journal.log(Event.RECORD_REFUSED, why, priority=journal.WARNING)
            return None, why
        blob = _read_all(fd, record.MAX_RECORD_SIZE)
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # taken meanwhile: it was read, and is gone
    except OSError as exc:
        blob.wipe()
        why = f"the kexec record could not be removed, so it is not used: {exc.strerror}"
        journal.log(Event.RECORD_REFUSED, why, priority=journal.WARNING)
        return None, why
    return blob, None


def _take_published(cache: PassphraseCache) -> tuple[Secret | None, str | None]:
    """The record the token plugin left in our keyring, invalidated once read."""
    from keyhandoff import keyring
    from keyhandoff.errors import KeyringError

    try:
        serial = keyring.find_trusted("user", names.RECORD_BLOB_KEY, perm=names.KEY_PERM,
                                      within=cache.keyring_serial)
        blob = keyring.read(serial)  # not padded: ciphertext, exactly the variable's bytes
    except KeyUnavailable:
        return None, None  # none, expired, revoked, or not ours (then left alone)
    try:
        keyring.invalidate(serial)
    except KeyringError as exc:
        blob.wipe()
        refused = f"the record in the keyring could not be removed, so it is not used: {exc}"
        journal.log(Event.RECORD_REFUSED, refused, priority=journal.WARNING)
        return None, refused
    # An invalidated key stays linked until the kernel's garbage collector runs, and a search
    # meanwhile says EKEYREVOKED; unlinked now, the record is gone from our keyring at once.
    with contextlib.suppress(KeyringError):  # collected already: nothing left to unlink
        keyring.unlink(serial, cache.keyring_serial)
    return blob, None


def _read_all(fd: int, limit: int) -> Secret:
    """At most ``limit`` bytes of ``fd``, read straight into a Secret's buffer."""
    buf = bytearray(limit)
    view = memoryview(buf)
    got = 0
    try:
        while got < limit:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
    finally:
        view.release()
    del buf[got:]
    return Secret(buf, allow_empty=True)


def _open_record(blob: Secret, found: list[FoundSlot], now: int, host: Host,
                 source: Source) -> tuple[HandoffRecord, set[str]]:
    from keyhandoff import record

    header = record.parse_header(blob.view())
    if header.channel.name not in source.accepts:
        raise record.RecordForeign(f"sealed for channel {header.channel.name}, found where "
                                   f"only {' or '.join(sorted(source.accepts))} records go")
    located = STORE.find(header.key_id, found)
    if located is None:
        raise record.RecordForeign("no one-time keyslot on this machine's volumes matches it")
    key, claimed = located
    with key:
        opened = record.open_record(blob.view(), key, now=now, boot_id=_uuid.UUID(host.boot_id()),
                                    channel=header.channel)
    return opened, claimed
