"""The offline-update runner's API: arm, rearm, disarm, status; and the boot-time steps.

A runner, as root, before it reboots into (or out of) ``system-update.target``::

    from datetime import timedelta
    from keyhandoff import update

    report = update.arm(reboot="full", boots=2, ttl=timedelta(minutes=30), login=True)
    print(report.summary())        # what the next boot will do, in plain words

and, inside the update boot, before the next reboot: ``update.rearm()``.  ``disarm()``
wipes everything.  The boot-time half runs from units: :func:`restore` before
``cryptsetup-pre.target``; :func:`finish` after ``cryptsetup.target`` (destroys the
one-time keyslots, re-arms nothing by itself, hands the passphrase to the login path on the
last boot of a chain).

``reboot=`` chooses the channel (:mod:`keyhandoff.channels`): ``"soft"`` keeps the
passphrases in the kernel keyring (RAM only); ``"full"`` writes a sealed record of one-time
keys to an EFI variable; ``"kexec"`` loads the next kernel with that record in a RAM-only
segment of its initrd.  This module does what every channel shares: choosing the
volumes, asking once, the state lock, the chain state (:mod:`keyhandoff.chain`), the
one-time keyslot sweeps (:mod:`keyhandoff.sweep`) and the login hand-off on the last boot.

Every state change (arm, rearm, disarm, restore, finish) holds the state lock
(:mod:`keyhandoff.statelock`), and a failed one undoes only what it did itself.  Each boot
step is idempotent within one boot: a restarted unit does nothing more.  The entry points
that read a secret make the calling process non-dumpable first (not memory-locked: see
:func:`_harden`).  Each takes ``host=`` (:class:`keyhandoff.host.Host`): where the boot id,
the clock and crypttab come from; the running machine by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from keyhandoff import chain as chain_mod
from keyhandoff import channels, journal, names, process, statelock, sweep
from keyhandoff import login as login_mod
from keyhandoff.asking import (
    ASK_TIMEOUT,
    Ask,
    Progress,
    SystemdAsk,
    ask_id,
    ask_with_systemd,
    gather,
)
from keyhandoff.asking import resolve_volume as _resolve_volume
from keyhandoff.asking import targets as _targets
from keyhandoff.cache import PassphraseCache
from keyhandoff.chain import Chain, Reboot, Target
from keyhandoff.errors import (
    AlreadyArmed,
    ArmRefused,
    ChannelUnavailable,
    InvalidArgument,
    KeyhandoffError,
    NotArmed,
    UpdateError,
)
from keyhandoff.host import THIS_HOST, Host
from keyhandoff.journal import Event
from keyhandoff.reports import ArmReport, FinishReport, RestoreReport, VolumeReport

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.kexec import RunningKernel
    from keyhandoff.secret import Secret

__all__ = [
    "ASK_TIMEOUT",
    "AlreadyArmed",
    "ArmRefused",
    "ArmReport",
    "ChannelUnavailable",
    "FinishReport",
    "Host",
    "NotArmed",
    "Reboot",
    "RestoreReport",
    "SystemdAsk",
    "Target",
    "UpdateError",
    "VolumeReport",
    "arm",
    "ask_id",
    "ask_with_systemd",
    "channel_availability",
    "disarm",
    "finish",
    "first_in_boot",
    "rearm",
    "resolve_volume",
    "restore",
    "status",
    "targets",
]

CHAIN_KEY: Final = names.CHAIN_KEY
MAX_TTL: Final = timedelta(days=1)
MAX_BOOTS: Final = 16


def targets(sources: Sequence[str] | None = None, *, host: Host = THIS_HOST,
            skipped: list[tuple[str, str]] | None = None) -> list[Target]:
    """The volumes to hand over: ``sources`` (:func:`resolve_volume`), else crypttab's.

    By default the prompting crypttab entries, less those skipped (``noauto``, not LUKS,
    not plugged in): ``skipped`` receives ``(name, why)`` for each.
    """
    return _targets(sources, host.crypttab_path, skipped=skipped)


def _harden() -> None:
    """Make this process non-dumpable before it reads a secret.

    A runner calling :func:`arm`, :func:`rearm`, :func:`restore` or :func:`finish` holds
    passphrases, volume keys and the record key in its own memory: no core dump of it, no
    ptrace or /proc/<pid>/mem by another process of the same uid.  This is process-wide
    and stays for the caller's lifetime (a root runner does not need to be dumpable).
    Memory is *not* locked here: ``mlockall`` in someone else's daemon would pin all of
    its present and future memory and can make its later allocations fail under
    RLIMIT_MEMLOCK; the keyhandoff command line locks its own memory instead.
    """
    process.harden(lock_memory=False)


def _work(host: Host, progress: Progress | None = None,
          kernel: RunningKernel | None = None) -> channels.Work:
    return channels.Work(PassphraseCache(), host, progress or (lambda _msg: None), kernel)


def _check_args(reboot: str, boots: int, ttl: timedelta) -> int:
    if reboot not in ("soft", "full", "kexec"):
        raise InvalidArgument('reboot must be "soft", "full" or "kexec"')
    if not 1 <= boots <= MAX_BOOTS:
        raise InvalidArgument(f"boots must be 1..{MAX_BOOTS}")
    seconds = int(ttl.total_seconds())
    if not 60 <= seconds <= MAX_TTL.total_seconds():
        raise InvalidArgument("ttl must be between 1 minute and 1 day")
    return seconds


def arm(  # each is a caller's choice, all keyword-only
    *,
    reboot: Reboot,
    boots: int = 1,
    ttl: timedelta,
    login: bool = False,
    volumes: Sequence[str] | None = None,
    ask: Ask | None = ask_with_systemd,
    progress: Progress | None = None,
    lock_wait: float = statelock.DEFAULT_WAIT,
    host: Host = THIS_HOST,
    automatic: bool = False,
    kernel: RunningKernel | None = None,
) -> ArmReport:
    """Arm the handoff for the next ``boots`` boots, until ``ttl`` from now.

    ``volumes`` are source paths (default: the prompting entries of /etc/crypttab).  A
    passphrase comes from the cache (captured and verified at boot) or, if ``ask`` is given,
    is asked once: the default asks the password agents and gives up after
    :data:`ASK_TIMEOUT` seconds (``SystemdAsk(timeout=...)`` for another bound).  Every
    volume must be armable; otherwise :class:`ArmRefused` is raised and what was armed
    before is left as it was (this call undoes only what it did).  Returns what was done;
    ``summary()`` says it in words.

    Passphrases are asked before the state lock is taken (:mod:`keyhandoff.statelock`);
    the rest holds it, waiting up to ``lock_wait`` seconds for another state change.  The
    process is made non-dumpable first (see :func:`_harden`: no memory locking).

    ``reboot="soft"`` is refused (:class:`ChannelUnavailable`, with the reason) where systemd
    is the running init and older than 254, which has no ``systemctl soft-reboot``
    (:meth:`Host.soft_reboot_refusal`).

    ``reboot="kexec"`` loads the next kernel (``kernel``, else the one the boot loader
    would start: :func:`keyhandoff.kexec.next_kernel`) with the record in a RAM-only
    segment of its initrd; then ``systemctl kexec`` starts it.  Refused, with the reason,
    where this machine cannot kexec (:func:`keyhandoff.kexec.state`).  ``kernel`` is for
    that channel only.

    ``automatic``: this is :mod:`keyhandoff.schedule`'s own arming (a scheduled offline
    update, nobody asked); the chain state records it with this boot's id, so a cancelled
    schedule in this boot disarms it and nothing else.  A runner leaves it ``False``.
    """
    seconds = _check_args(reboot, boots, ttl)
    if kernel is not None and reboot != "kexec":
        raise InvalidArgument('a kernel is named only for reboot="kexec"')
    refusal = host.soft_reboot_refusal() if reboot == "soft" else None
    if refusal is not None:  # before anyone is asked for anything
        raise ChannelUnavailable(f"cannot arm for a soft reboot: {refusal}")
    channel = channels.for_reboot(reboot)
    work = _work(host, progress, kernel)
    _harden()
    skipped: list[tuple[str, str]] = []
    chosen = targets(volumes, host=host, skipped=skipped)
    for name, why in skipped:
        work.say(f"skipping {name}: {why}")
    if not chosen:
        raise ArmRefused("no volume to arm (no prompting entry in /etc/crypttab"
                         + (f"; skipped: {', '.join(n for n, _ in skipped)})" if skipped
                            else ")"))
    channel.refuse(work, chosen)  # before anyone is asked for anything
    passphrases = gather(chosen, work.cache, ask, work.say)
    try:
        with statelock.held("arm", wait=lock_wait, progress=work.say):
            previous = chain_mod.load(work.cache)
            now = host.now()
            chain = Chain(channel=channel.name, reboot=reboot, not_after=now + seconds,
                          boots_left=boots, login=login, volumes=tuple(chosen),
                          armed_boot=host.boot_id(),
                          auto_boot=host.boot_id() if automatic else "")
            report, ours = channel.arm(work, chain, chosen, passphrases)
            _supersede(work, channel, previous, chain, ours)
    finally:
        for secret, _source in passphrases.values():
            secret.wipe()
    journal.log(Event.ARMED, f"armed {len(chosen)} volume(s) via {report.channel}",
                channel=report.channel, boots=boots, deadline=chain.not_after)
    if skipped:
        report = dataclasses.replace(report, volumes=report.volumes + tuple(
            VolumeReport("", name, armed=False, how=f"skipped: {why}") for name, why in skipped))
    return report


def _supersede(work: channels.Work, channel: channels.Channel, previous: Chain | None,
               chain: Chain, ours: set[str]) -> None:
    """After a successful arm: remove what the previous arming left (never this one's)."""
    for other in channels.others(channel):
        try:
            other.discard(work.host)  # an earlier arming's record on another channel: superseded
        except (KeyhandoffError, OSError) as exc:  # armed all the same; the boot refuses it
            journal.log(Event.ERROR, f"could not delete an earlier handoff record: {exc}",
                        priority=journal.WARNING)
    paths = sweep.known_paths(previous, work.host)
    paths += [p for p in chain.paths() if p not in paths]
    sweep.destroy_unclaimed(sweep.sweep_paths(paths, work.host), ours)  # ours: this arming's
    uuids = (previous.uuids() if previous else set()) | chain.uuids()
    for each in channels.REGISTRY.values():
        each.forget_keys(work.cache, uuids)


def rearm(*, progress: Progress | None = None, lock_wait: float = statelock.DEFAULT_WAIT,
          host: Host = THIS_HOST) -> ArmReport:
    """Inside an update boot: arm the chain's next boot (once per boot).

    A soft chain counts its boots by its own restores (a soft reboot keeps the boot id).
    Holds the state lock; makes the process non-dumpable first.
    """
    work = _work(host, progress)
    _harden()
    with statelock.held("rearm", wait=lock_wait, progress=work.say):
        chain = chain_mod.load(work.cache)
        if chain is None or chain.not_after <= host.now():
            raise NotArmed("nothing is armed (disarmed, expired, or never armed)")
        if chain.boots_left < 1:
            raise NotArmed("the armed chain has no boot left")
        channel = channels.REGISTRY.get(chain.channel)
        if channel is None:
            raise NotArmed(f"armed through a channel this keyhandoff lacks: {chain.channel}")
        if channel.armed_this_boot(chain, host):
            raise AlreadyArmed("already armed in this boot for the next one: nothing to re-arm",
                               _armed(chain))
        report = channel.rearm(work, chain)
    journal.log(Event.ARMED, f"re-armed for {chain.boots_left} more boot(s)",
                channel=chain.channel, boots=chain.boots_left, deadline=chain.not_after)
    return report


def _armed(chain: Chain) -> ArmReport:
    """What ``chain`` has armed, as the report of the arming that made it."""
    return ArmReport(chain.channel, chain.reboot, chain.not_after, chain.boots_left,
                     "on the last boot" if chain.login else "not requested",
                     tuple(VolumeReport(t.uuid, t.name, armed=True, how="armed already")
                           for t in chain.volumes))


def disarm(*, quiet: bool = False, volumes: Sequence[str] | None = None,
           lock_wait: float = statelock.DEFAULT_WAIT, host: Host = THIS_HOST,
           must_match: bool = False) -> dict[str, int]:
    """Wipe everything armed.

    Every channel's record, our state keys, the one-time keyslots on every LUKS volume of
    the machine (:func:`keyhandoff.sweep.sweep_paths`: also those no chain state names any
    more), and the cached passphrases of the armed volumes (``volumes``, else crypttab and
    the chain's).  ``volumes`` are what ``--volume`` takes (:func:`resolve_volume`: a
    crypttab name, a LUKS UUID, a path); a volume need not be plugged in.
    ``must_match``: raise :class:`NotArmed` before anything is touched when one of
    ``volumes`` is neither in the armed chain nor in the cache (the command line: a
    ``disarm --volume`` that would do nothing for it says so).  Holds the state lock.
    """
    named = ([resolve_volume(v, host=host) for v in volumes]
             if volumes is not None else None)
    with statelock.held("disarm", wait=lock_wait):
        cache = PassphraseCache()
        chain = chain_mod.load(cache)
        if must_match and named:
            held = ((chain.uuids() if chain else set())
                    | {e.volume for e in cache.entries()}
                    | {e.volume for e in cache.onetime_entries()})
            for t in named:
                if t.uuid not in held:
                    who = t.uuid if t.name == t.uuid else f"{t.name} ({t.uuid})"
                    raise NotArmed(f"nothing is armed or cached for {who}")
        known = sweep.known_paths(chain, host)
        paths = [t.path for t in named] if named is not None else known
        counts = {"records": sum(c.discard(host) for c in channels.REGISTRY.values()),
                  "keys": 0, "keyslots": 0}
        # keyslots: on every LUKS volume of the machine; passphrases: only the named volumes'
        seen = chain.uuids() if chain else set()
        counts["keyslots"] = sweep.destroy_all(sweep.sweep_paths([*paths, *known], host), seen)
        for each in channels.REGISTRY.values():
            counts["keys"] += each.forget_keys(cache, seen)
        counts["keys"] += cache.forget_key(CHAIN_KEY)
        uuids = chain.uuids() if chain else set()
        if named is not None:
            uuids |= {t.uuid for t in named}
        else:
            with contextlib.suppress(KeyhandoffError, OSError):
                uuids |= {t.uuid for t in targets(paths, host=host)}
        for u in uuids:
            counts["keys"] += cache.forget(u) + cache.forget_onetime(u)
    if not quiet:
        journal.log(Event.WIPED, "disarmed", **counts)
    return counts


def resolve_volume(spec: str, *, need_header: bool = False,
                   host: Host = THIS_HOST) -> Target:
    """What a ``--volume`` names (crypttab name, LUKS UUID, path), in ``host``'s crypttab."""
    return _resolve_volume(spec, host.crypttab_path, need_header=need_header)


def status(*, host: Host = THIS_HOST) -> dict[str, Any]:
    """What is armed (never a secret)."""
    chain = chain_mod.load(PassphraseCache())
    if chain is None:
        return {"armed": False}
    channel = channels.REGISTRY.get(chain.channel)
    return {
        "armed": True, "channel": chain.channel, "reboot": chain.reboot,
        "deadline": chain.not_after, "boots_left": chain.boots_left, "login": chain.login,
        "volumes": [t.uuid for t in chain.volumes],
        "rearmed_this_boot": channel is not None and channel.armed_this_boot(chain, host),
        "armed_automatically": bool(chain.auto_boot),
    }


def channel_availability() -> dict[str, dict[str, Any]]:
    """Which channels this machine offers, in words (cheap: no write to firmware)."""
    return {c.name: {"reboot": c.reboot, "available": a.available, "detail": a.detail}
            for c in channels.REGISTRY.values() for a in [c.availability()]}


# --- boot time: restore and finish ----------------------------------------------------------


def first_in_boot(step: str, *, lock_wait: float = statelock.DEFAULT_WAIT,
                  host: Host = THIS_HOST) -> bool:
    """Mark ``step`` as done in this boot; ``False`` when it was done in this boot already.

    For boot steps with no chain state of their own to tell (``login-handoff``): a restart
    of their unit must not hand the passphrase over again.  The mark is a file beside the
    state lock holding the boot id (not secret), written before the step runs: a step that
    failed half-way is not retried in the same boot, the person types instead.
    """
    if not step.replace("-", "").isalnum():
        raise InvalidArgument("a step name is letters, digits and dashes")
    boot = host.boot_id()
    with statelock.held(step, wait=lock_wait):
        path = os.path.join(statelock.LOCK_DIR, f"done-{step}")
        with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii") as f:
            if f.read().strip() == boot:
                return False
        tmp = path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(boot + "\n")
        os.replace(tmp, path)
    return True


def restore(
    *, volumes: Sequence[str] | None = None, wait: float = 0,
    lock_wait: float = statelock.DEFAULT_WAIT, host: Host = THIS_HOST,
) -> RestoreReport:
    """Early in boot: load what the channel carried into the cache, wipe the rest.

    ``wait``: seconds to wait for the volumes' devices when a record is there.

    With chain state in our keyring (a soft reboot kept it), the chain's channel restores
    it; without (a full reboot), each channel that can find a handoff after a cold boot
    looks (:func:`keyhandoff.channels.cold`): the ``efi`` record is read and deleted first
    (if it cannot be deleted it is not used), then authenticated and checked, and its
    one-time keys are cached for the agent with a short kernel timeout.  Every boot destroys
    one-time keyslots that no valid record claims, including expired ones, on every LUKS
    volume of the machine (:func:`keyhandoff.sweep.sweep_paths`).

    Idempotent within one boot: in the boot that armed (or re-armed) the chain, the record
    and its keyslots are for the *next* boot and stay; a second restore in the boot that
    restored does nothing more.  Holds the state lock; makes the process non-dumpable.
    """
    _harden()
    with statelock.held("restore", wait=lock_wait):
        work = _work(host)
        chain = chain_mod.load(work.cache)
        owner = channels.REGISTRY.get(chain.channel) if chain is not None else None
        if owner is not None:
            return owner.restore(work, chain, volumes, wait)
        report = RestoreReport(None, (), None, 0)
        for channel in channels.cold():
            report = channel.restore(work, None, volumes, wait)
            if report.channel is not None:
                break
        return report


def finish(*, login_timeout: int = 120, lock_wait: float = statelock.DEFAULT_WAIT,
           host: Host = THIS_HOST) -> FinishReport:
    """After ``cryptsetup.target``: destroy the used one-time keyslots.

    Also every one-time keyslot on the machine not armed in this boot (or expired), with
    or without chain state: its record was consumed by this boot's restore.

    Keeps what the chain needs next (a volume key while boots remain) and, on the last
    boot, hands the passphrase to the login path.  Idempotent: what it handled is no longer
    pending, so a second finish in the same boot does nothing.  Holds the state lock;
    makes the process non-dumpable first.
    """
    _harden()
    with statelock.held("finish", wait=lock_wait):
        work = _work(host)
        chain = chain_mod.load(work.cache)
        channel = channels.REGISTRY.get(chain.channel) if chain is not None else None
        if chain is None or channel is None or not chain.pending:
            # nothing to finish, but a one-time keyslot of an earlier boot can only be stale
            return FinishReport(sweep.destroy_stale(sweep.known_paths(chain, host), host),
                                "nothing armed")
        return _finish(work, channel, chain, login_timeout)


def _finish(work: channels.Work, channel: channels.Channel, chain: Chain,
            login_timeout: int) -> FinishReport:
    last_boot = chain.boots_left <= 0
    passphrases: list[Secret] = []
    try:
        destroyed = channel.finish(work, chain, passphrases)
        destroyed += sweep.destroy_stale(chain.paths(), work.host)
        chain.pending = ()
        if not last_boot:
            chain.save(work.cache, work.host.now())
            login = "on a later boot" if chain.login else "not requested"
        else:
            login = "not requested"
            if chain.login and passphrases:
                login_mod.handoff(passphrases[-1], timeout=login_timeout)
                login = "handed to the login path"
            elif chain.login:
                login = "refused: no passphrase could be recovered for the login"
            disarm(quiet=True, volumes=chain.paths(), host=work.host)
    finally:
        for pw in passphrases:
            pw.wipe()
    if destroyed:
        journal.log(Event.WIPED, f"destroyed {destroyed} used one-time keyslot(s)",
                    keyslots=destroyed)
    return FinishReport(destroyed, login)
