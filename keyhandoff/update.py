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

Channels (DESIGN.md): ``reboot="soft"`` keeps the passphrases in the kernel keyring
(``keyring`` channel: RAM only).  ``reboot="full"`` writes a sealed record to an EFI
variable (``efi`` channel) that carries only one-time keys for one-time LUKS2 keyslots,
plus, for the login, the passphrase sealed under a key derived from the volume key.  LUKS1
volumes and machines without writable EFI variables are refused, never downgraded.

State between the steps lives in our keyring as ``keyhandoff:chain`` (what is armed: not
secret) with the deadline as its kernel timeout, ``keyhandoff:vk:<uuid>`` (a volume key,
only while a chain needs another re-arm) and ``keyhandoff:sealed:<uuid>`` (the sealed login
payload).  Every one of them expires in the kernel at the chain's deadline.

Every state change (arm, rearm, disarm, restore, finish) holds the state lock
(:mod:`keyhandoff.statelock`), and a failed one undoes only what it did itself.  Each boot
step is idempotent within one boot: a restarted unit does nothing more.  The entry points
that read a secret make the calling process non-dumpable first (not memory-locked: see
:func:`_harden`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid as _uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal

from keyhandoff import crypttab, journal, names, process, statelock
from keyhandoff import login as login_mod
from keyhandoff.cache import PassphraseCache, SystemdCache, normalize_uuid
from keyhandoff.cescape import cescape
from keyhandoff.errors import (
    ArmRefused,
    ChannelUnavailable,
    InvalidArgument,
    KeyhandoffError,
    KeyUnavailable,
    NotArmed,
    UpdateError,
)
from keyhandoff.journal import Event
from keyhandoff.luks_scan import luks_paths
from keyhandoff.secret import Secret
from keyhandoff.volumes import resolve_source

__all__ = [
    "ArmRefused",
    "ArmReport",
    "ChannelUnavailable",
    "NotArmed",
    "Target",
    "UpdateError",
    "VolumeReport",
    "arm",
    "disarm",
    "finish",
    "rearm",
    "restore",
    "status",
    "targets",
]

Reboot = Literal["soft", "full"]
Progress = Callable[[str], None]
Ask = Callable[["Target"], Secret]

CHAIN_KEY: Final = names.CHAIN_KEY
VK_PREFIX: Final = names.VK_PREFIX
SEALED_PREFIX: Final = names.SEALED_PREFIX
MAX_TTL: Final = timedelta(days=1)
MAX_BOOTS: Final = 16
#: How long a restored one-time key may wait for its prompt.
RESTORE_TIMEOUT: Final = 600


@dataclass(frozen=True, slots=True)
class Target:
    """A volume to hand over: LUKS UUID, the path to its header, a name for messages."""

    uuid: str
    path: str
    name: str


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
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.deadline))
        armed = [v for v in self.volumes if v.armed]
        lines = [
            (f"Armed {len(armed)} volume(s) through the {self.channel} channel for "
             f"{self.boots} boot(s) of a {self.reboot} reboot, until {when}."),
        ]
        lines += [f"  {v.name} ({v.uuid}): {v.how}" for v in self.volumes]
        lines.append(f"  login: {self.login}")
        lines.append(
            "The next boot unlocks these volumes without asking; after the deadline, or "
            "with `keyhandoff disarm`, the passphrase is asked as usual.",
        )
        return "\n".join(lines)


# --- state in the keyring -----------------------------------------------------------------


@dataclass
class _Chain:
    channel: str
    reboot: str
    not_after: int
    boots_left: int
    login: bool
    volumes: list[dict[str, Any]] = field(default_factory=list)
    #: boot_id of the boot that last wrote a record (rearm is once per boot; restore in
    #: that boot leaves the record for the next one)
    armed_boot: str = ""
    #: one-time keyslots restored this boot, to destroy once the volumes are open
    pending: list[dict[str, Any]] = field(default_factory=list)
    #: boot_id of the boot whose restore loaded this chain (a second restore does nothing)
    restored_boot: str = ""
    #: keyring channel: the boots a soft chain has started (its restores).  A soft reboot
    #: keeps the kernel's boot id, so a soft chain counts its own boots.
    generation: int = 0
    #: keyring channel: the generation that last armed or re-armed (rearm once per boot)
    armed_generation: int = 0
    #: keyring channel: systemd's SoftRebootsCount when armed or last restored (None when
    #: systemd does not say): a restore with the same count is a restarted unit, not a boot
    soft_reboots: int | None = None

    def armed_this_boot(self) -> bool:
        """Whether the running boot armed (or re-armed) this chain."""
        if self.channel == "keyring":
            return self.armed_generation == self.generation
        return self.armed_boot == _boot_id()

    def save(self, cache: PassphraseCache, now: int) -> None:
        with Secret(json.dumps(asdict(self)).encode()) as payload:
            cache.put_key(CHAIN_KEY, payload, timeout=max(1, self.not_after - now), padded=False)

    @classmethod
    def load(cls, cache: PassphraseCache) -> _Chain | None:
        raw = cache.get_key(CHAIN_KEY, padded=False)
        if raw is None:
            return None
        with raw:
            try:
                return cls(**json.loads(bytes(raw.view())))
            except (ValueError, TypeError):
                return None

    def targets(self) -> list[Target]:
        return [Target(v["uuid"], v["path"], v["name"]) for v in self.volumes]


#: Where the running kernel's boot id is read (tests of a "next boot" on one kernel point
#: this at a file of their own: a reboot cannot be produced on the test host).
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    with open(BOOT_ID_PATH, encoding="ascii") as f:
        return f.read().strip()


def _now() -> int:
    return int(time.time())


def _soft_reboots() -> int | None:
    """The number of soft reboots systemd made since the kernel booted (256+), else None."""
    try:
        proc = subprocess.run(["systemctl", "show", "--property=SoftRebootsCount", "--value"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = proc.stdout.strip()
    return int(text) if proc.returncode == 0 and text.isdigit() else None


# --- volumes and passphrases -----------------------------------------------------------------


def targets(sources: Sequence[str] | None = None) -> list[Target]:
    """The volumes to hand over: ``sources`` (paths), else the prompting crypttab entries."""
    if sources is not None:
        named = [(os.path.basename(s), s) for s in sources]
    else:
        named = [(e.name, e.source_path) for e in crypttab.read()]
    out = []
    for name, path in named:
        volume = resolve_source(path, require_header=True)
        out.append(Target(normalize_uuid(volume), path, name))
    return out


#: Seconds :class:`SystemdAsk` waits for an answer by default (systemd-ask-password's own).
ASK_TIMEOUT: Final = 90


def ask_id(target: Target) -> str:
    """The ``Id=`` of a prompt for ``target``, as systemd-cryptsetup makes it.

    ``cryptsetup:`` and the C-escaped source path: an agent unescapes the Id, so a raw
    backslash in a path would not survive that.
    """
    return "cryptsetup:" + cescape(os.fsencode(target.path))


class SystemdAsk:
    """Ask once through the password-agent protocol, as systemd-cryptsetup would.

    The real ``systemd-ask-password`` shows the prompt to whichever agent runs (plymouth,
    the console, a desktop); the answer comes back on a pipe, never in argv or environ.
    It gives up after ``timeout`` seconds (at least 1): with no agent and no terminal
    nobody would ever answer, and a daemon calling :func:`arm` must not hang for ever.
    """

    def __init__(self, timeout: int = ASK_TIMEOUT) -> None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
            raise InvalidArgument("the ask timeout is a whole number of seconds, at least 1")
        self.timeout = timeout

    def __call__(self, target: Target) -> Secret:
        """The passphrase typed for ``target`` (unverified); :class:`UpdateError` if none."""
        try:
            proc = subprocess.run(
                ["systemd-ask-password", "--icon=drive-harddisk", f"--timeout={self.timeout}",
                 f"--id={ask_id(target)}",
                 f"Please enter passphrase for disk {target.name} (for the update):"],
                capture_output=True, check=False, timeout=self.timeout + 15,
            )
        except subprocess.TimeoutExpired as exc:  # killed: it ignored its own timeout
            Secret(bytearray(exc.stdout or b""), allow_empty=True).wipe()
            raise UpdateError(self._none_given(target, "")) from None
        except FileNotFoundError:
            raise UpdateError("systemd-ask-password is not installed: cannot ask for the "
                              f"passphrase of {target.name}") from None
        raw = bytearray(proc.stdout)
        proc.stdout = b""
        if proc.returncode != 0:
            Secret(raw, allow_empty=True).wipe()
            why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise UpdateError(self._none_given(target, why[-1] if why else ""))
        if raw.endswith(b"\n"):
            del raw[-1:]
        return Secret.passphrase(raw)

    def _none_given(self, target: Target, why: str) -> str:
        detail = f" ({why})" if why else ""
        return (f"no passphrase given for {target.name} within {self.timeout} s{detail}: no "
                "password agent answered.  Run it on a terminal, cache the passphrase first "
                "(keyhandoff cache put), or pass a longer ask timeout")


#: The default ``ask`` of :func:`arm`: the password agents, for :data:`ASK_TIMEOUT` seconds.
ask_with_systemd: Final = SystemdAsk()


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


def _passphrase(target: Target, cache: PassphraseCache, ask: Ask | None) -> tuple[Secret, str]:
    """A passphrase for ``target`` (unverified) and where it came from: cached, else asked."""
    try:
        return cache.get(target.uuid), "cache"
    except KeyUnavailable:
        if ask is None:
            raise ArmRefused(f"no cached passphrase for {target.name}") from None
        return ask(target), "asked"


def _gather(
    chosen: list[Target], cache: PassphraseCache, ask: Ask | None, say: Progress,
) -> dict[str, tuple[Secret, str]]:
    """Every volume's passphrase (unverified), asked before any state is touched."""
    got: dict[str, tuple[Secret, str]] = {}
    try:
        for t in chosen:
            if t.uuid in got:
                continue
            if ask is not None and not _cached(cache, t):
                limit = getattr(ask, "timeout", None)
                say(f"asking for the passphrase of {t.name} through the password agents "
                    f"(Id {ask_id(t)}" + (f", for up to {limit} s)" if limit else ")"))
            got[t.uuid] = _passphrase(t, cache, ask)
    except BaseException:
        for secret, _source in got.values():
            secret.wipe()
        raise
    return got


def _cached(cache: PassphraseCache, target: Target) -> bool:
    return any(e.volume == target.uuid for e in cache.entries())


def _refuse_wrong(target: Target, cache: PassphraseCache, source: str) -> ArmRefused:
    if source == "cache":
        cache.forget(target.uuid)  # a cached entry that does not open its volume is junk
    return ArmRefused(f"the passphrase for {target.name} does not open it")


def _verify(target: Target, secret: Secret, source: str, cache: PassphraseCache,
            say: Progress) -> None:
    """Check that ``secret`` opens ``target`` (one PBKDF)."""
    from keyhandoff.luks import LuksHeader, WrongPassphrase

    say(f"checking the passphrase for {target.name} ({source})")
    try:
        with LuksHeader.open(target.path) as header:
            header.verify(secret)
    except WrongPassphrase:
        raise _refuse_wrong(target, cache, source) from None


# --- arm ---------------------------------------------------------------------------------------


def _check_args(reboot: str, boots: int, ttl: timedelta) -> int:
    if reboot not in ("soft", "full"):
        raise InvalidArgument('reboot must be "soft" or "full"')
    if not 1 <= boots <= MAX_BOOTS:
        raise InvalidArgument(f"boots must be 1..{MAX_BOOTS}")
    seconds = int(ttl.total_seconds())
    if not 60 <= seconds <= MAX_TTL.total_seconds():
        raise InvalidArgument("ttl must be between 1 minute and 1 day")
    return seconds


def arm(
    *,
    reboot: Reboot,
    boots: int = 1,
    ttl: timedelta,
    login: bool = False,
    volumes: Sequence[str] | None = None,
    ask: Ask | None = ask_with_systemd,
    progress: Progress | None = None,
    lock_wait: float = statelock.DEFAULT_WAIT,
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
    """
    seconds = _check_args(reboot, boots, ttl)
    say = progress or (lambda _msg: None)
    _harden()
    chosen = targets(volumes)
    if not chosen:
        raise ArmRefused("no volume to arm (no prompting entry in /etc/crypttab)")
    if reboot == "full":
        _check_efi(chosen)  # before anyone is asked for anything
    cache = PassphraseCache()
    passphrases = _gather(chosen, cache, ask, say)
    try:
        with statelock.held("arm", wait=lock_wait, progress=say):
            previous = _Chain.load(cache)
            now = _now()
            chain = _Chain(
                channel="keyring" if reboot == "soft" else "efi",
                reboot=reboot, not_after=now + seconds, boots_left=boots, login=login,
                volumes=[asdict(t) for t in chosen], armed_boot=_boot_id(),
            )
            if reboot == "soft":
                chain.soft_reboots = _soft_reboots()
                report = _arm_keyring(chain, chosen, cache, passphrases, say)
                ours: set[str] = set()
            else:
                report, ours = _arm_efi(chain, chosen, cache, passphrases, say)
            _supersede(cache, previous, chain, ours)
    finally:
        for secret, _source in passphrases.values():
            secret.wipe()
    journal.log(Event.ARMED, f"armed {len(chosen)} volume(s) via {report.channel}",
                channel=report.channel, boots=boots, deadline=chain.not_after)
    return report


def _supersede(
    cache: PassphraseCache, previous: _Chain | None, chain: _Chain, ours: set[str],
) -> None:
    """After a successful arm: remove what the previous arming left (never this one's)."""
    from keyhandoff import efi

    if chain.channel == "keyring" and efi.supported():
        try:
            efi.STASH.delete()  # an earlier full arming's record: superseded
        except efi.EfiVariableNotFound:
            pass
        except efi.EfiError as exc:  # armed all the same; the next boot refuses the record
            journal.log(Event.ERROR, f"could not delete an earlier handoff record: {exc}",
                        priority=journal.WARNING)
    paths = _known_paths(previous)
    paths += [v["path"] for v in chain.volumes if v["path"] not in paths]
    _destroy_unclaimed(_sweep_paths(paths), ours)  # ``ours``: this arming's bindings
    uuids = {v["uuid"] for v in previous.volumes} if previous else set()
    for u in uuids | {v["uuid"] for v in chain.volumes}:
        for desc in (VK_PREFIX + u, SEALED_PREFIX + u):
            cache.forget_key(desc)


def _arm_keyring(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache,
    passphrases: dict[str, tuple[Secret, str]], say: Progress,
) -> ArmReport:
    """Verify every passphrase, then keep them for the chain; on a failure, as they were."""
    for t in chosen:
        secret, source = passphrases[t.uuid]
        _verify(t, secret, source, cache, say)
    before = {e.volume: e.seconds_left for e in cache.entries()}
    now = _now()
    put: list[str] = []
    try:
        for t in chosen:
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
    reports = [VolumeReport(t.uuid, t.name, armed=True,
                            how="passphrase kept in the kernel keyring (RAM)") for t in chosen]
    login = "the passphrase goes to the login keyring on the last boot" if chain.login \
        else "not requested"
    return ArmReport("keyring", chain.reboot, chain.not_after, chain.boots_left, login,
                     tuple(reports))


def _check_efi(chosen: list[Target]) -> None:
    """Refuse before asking: no writable EFI variables, or a LUKS1 volume."""
    from keyhandoff import efi
    from keyhandoff.luks import LuksHeader

    caps = efi.probe()
    if not caps.nv_writable:
        raise ChannelUnavailable(f"cannot carry a record across a full reboot: {caps.detail}")
    refused = []
    for t in chosen:
        with LuksHeader.open(t.path) as header:
            if header.luks_version != 2:
                refused.append(VolumeReport(
                    t.uuid, t.name, armed=False,
                    how="LUKS1 has no tokens for a one-time keyslot; the passphrase would "
                        "have to be stored, which keyhandoff refuses"))
    if refused:
        report = ArmReport("efi", "full", 0, 0, "not armed", tuple(refused))
        raise ArmRefused("; ".join(f"{r.name}: {r.how}" for r in refused), report)


def _arm_efi(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache,
    passphrases: dict[str, tuple[Secret, str]], say: Progress,
) -> tuple[ArmReport, set[str]]:
    """Read every volume key first (the passphrase check: one PBKDF each), then write."""
    from keyhandoff.luks import LuksHeader, WrongPassphrase

    volume_keys: dict[str, Secret] = {}
    try:
        for t in chosen:
            if t.uuid in volume_keys:
                continue
            secret, source = passphrases[t.uuid]
            say(f"reading the volume key of {t.name} ({source}; one PBKDF)")
            with LuksHeader.open(t.path) as header:
                try:
                    _slot, volume_keys[t.uuid] = header.volume_key(secret)
                except WrongPassphrase:
                    raise _refuse_wrong(t, cache, source) from None
        login = {u: s for u, (s, _src) in passphrases.items()} if chain.login else {}
        return _write_efi_record(chain, chosen, cache, say, volume_keys, login)
    finally:
        for vk in volume_keys.values():
            vk.wipe()


def _write_efi_record(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache, say: Progress,
    volume_keys: dict[str, Secret], login_passphrases: dict[str, Secret],
) -> tuple[ArmReport, set[str]]:
    """Add one-time keyslots, seal the record, store it, save the chain.

    On a failure the keyslots this call added are destroyed again.  The EFI variable is
    replaced by delete-then-write: once the store was tried, a previous record may be gone
    (or be this call's, useless without its keyslots), so the chain that needed it goes
    too and nothing claims to be armed that is not.
    """
    from keyhandoff import efi, onetime, stash
    from keyhandoff.luks import LuksError, LuksHeader

    now = _now()
    boot_id = _boot_id()
    entries: list[stash.StashEntry] = []
    reports = []
    created: list[tuple[str, Any]] = []
    record_key = stash.new_record_key()
    stored = "no"
    try:
        for t in chosen:
            with LuksHeader.open(t.path) as header, volume_keys[t.uuid].copy() as vk:
                say(f"adding a one-time keyslot to {t.name}")
                slot_info, key = onetime.add(
                    header, vk, not_after=chain.not_after, boot_id=boot_id,
                    record_key=record_key,
                )
                created.append((t.path, slot_info))
                volume = _uuid.UUID(t.uuid)
                entries.append(stash.StashEntry(volume, stash.EntryKind.ONETIME_KEY, key))
                passphrase = login_passphrases.get(t.uuid)
                if passphrase is not None:
                    sealed = stash.seal_to_volume_key(vk, passphrase, _login_context(t.uuid))
                    entries.append(stash.StashEntry(
                        volume, stash.EntryKind.SEALED_PASSPHRASE, Secret(sealed)))
            reports.append(VolumeReport(
                t.uuid, t.name, armed=True,
                how=f"one-time keyslot {slot_info.keyslot}; the EFI record holds only its key"))
        record = stash.HandoffRecord(
            channel=stash.Channel.EFI, created=now, not_after=chain.not_after,
            boots_left=chain.boots_left, boot_id=_uuid.UUID(boot_id), entries=tuple(entries),
        )
        blob = stash.seal(record, record_key)
        say("writing the handoff record to the EFI variable")
        stored = "tried"
        stash.EfiChannel().store(blob)
        stored = "yes"
        chain.armed_boot = boot_id
        chain.save(cache, now)
    except BaseException:
        for path, slot in created:
            with contextlib.suppress(LuksError, OSError), LuksHeader.open(path) as header:
                onetime.destroy(header, slot)
        if stored != "no":
            with contextlib.suppress(efi.EfiError, OSError):
                if stored == "yes" or not efi.STASH.exists():
                    with contextlib.suppress(efi.EfiVariableNotFound):
                        efi.STASH.delete()
                    cache.forget_key(CHAIN_KEY)
                    journal.log(Event.WIPED, "the EFI record could not be replaced: nothing "
                                "is armed now", priority=journal.WARNING)
        raise
    finally:
        record_key.wipe()
        for e in entries:
            e.wipe()
    login = ("the passphrase travels sealed to the volume key and goes to the login keyring "
             "on the last boot") if chain.login else "not requested"
    report = ArmReport("efi", chain.reboot, chain.not_after, chain.boots_left, login,
                       tuple(reports))
    return report, {slot.binding for _path, slot in created}


def _login_context(volume: str) -> bytes:
    return b"keyhandoff login:" + volume.encode()


# --- rearm / disarm / status -------------------------------------------------------------------


def rearm(*, progress: Progress | None = None,
          lock_wait: float = statelock.DEFAULT_WAIT) -> ArmReport:
    """Inside an update boot: arm the chain's next boot (once per boot).

    A soft chain counts its boots by its own restores (a soft reboot keeps the boot id).
    Holds the state lock; makes the process non-dumpable first.
    """
    say = progress or (lambda _msg: None)
    _harden()
    with statelock.held("rearm", wait=lock_wait, progress=say):
        return _rearm(say)


def _rearm(say: Progress) -> ArmReport:
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    now = _now()
    if chain is None or chain.not_after <= now:
        raise NotArmed("nothing is armed (disarmed, expired, or never armed)")
    if chain.boots_left < 1:
        raise NotArmed("the armed chain has no boot left")
    if chain.armed_this_boot():
        raise NotArmed("already armed in this boot")
    chosen = chain.targets()
    if chain.channel == "keyring":
        chain.armed_generation = chain.generation
        chain.armed_boot = _boot_id()
        chain.save(cache, now)
        reports = tuple(VolumeReport(t.uuid, t.name, armed=True,
                                     how="passphrase still in the kernel keyring")
                        for t in chosen)
        report = ArmReport("keyring", chain.reboot, chain.not_after, chain.boots_left,
                           "on the last boot" if chain.login else "not requested", reports)
    else:
        volume_keys: dict[str, Secret] = {}
        login: dict[str, Secret] = {}
        try:
            for t in chosen:
                vk = cache.get_key(VK_PREFIX + t.uuid)
                if vk is None:
                    raise NotArmed(f"the volume key of {t.name} is gone (expired?)")
                volume_keys[t.uuid] = vk
                if chain.login:
                    login[t.uuid] = cache.get(t.uuid)
            report, _ours = _write_efi_record(chain, chosen, cache, say, volume_keys, login)
        finally:
            for secret in (*volume_keys.values(), *login.values()):
                secret.wipe()
        for t in chosen:
            cache.forget_key(VK_PREFIX + t.uuid)
    journal.log(Event.ARMED, f"re-armed for {chain.boots_left} more boot(s)",
                channel=chain.channel, boots=chain.boots_left, deadline=chain.not_after)
    return report


def disarm(*, quiet: bool = False, volumes: Sequence[str] | None = None,
           lock_wait: float = statelock.DEFAULT_WAIT) -> dict[str, int]:
    """Wipe everything armed.

    The EFI record, our state keys, the one-time keyslots on every LUKS volume of the
    machine (:func:`_sweep_paths`: also those no chain state names any more), and the
    cached passphrases of the armed volumes (``volumes``, else crypttab and the chain's).
    Holds the state lock.
    """
    with statelock.held("disarm", wait=lock_wait):
        cache = PassphraseCache()
        chain = _Chain.load(cache)
        paths = list(volumes) if volumes is not None else _known_paths(chain)
        # keyslots: on every LUKS volume of the machine; passphrases: only the named volumes'
        counts = _wipe_armed(cache, chain, _sweep_paths([*paths, *_known_paths(chain)]))
        uuids = {v["uuid"] for v in chain.volumes} if chain else set()
        with contextlib.suppress(KeyhandoffError, OSError):
            uuids |= {t.uuid for t in targets(paths)}
        for u in uuids:
            counts["keys"] += cache.forget(u)
    if not quiet:
        journal.log(Event.WIPED, "disarmed", **counts)
    return counts


def _wipe_armed(cache: PassphraseCache, chain: _Chain | None, paths: list[str]) -> dict[str, int]:
    """Remove the record, one-time keyslots and chain state (not the cached passphrases)."""
    from keyhandoff import efi, onetime
    from keyhandoff.luks import LuksError, LuksHeader

    counts = {"records": 0, "keys": 0, "keyslots": 0}
    if efi.supported():
        with contextlib.suppress(efi.EfiVariableNotFound):
            efi.STASH.delete()
            counts["records"] += 1
    uuids = {v["uuid"] for v in chain.volumes} if chain else set()
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                for slot in onetime.slots(header):
                    counts["keyslots"] += onetime.destroy(header, slot)
                onetime.remove_untrusted(header)
                uuids.add(header.uuid)  # last: a malformed UUID must not spare a keyslot
        except (LuksError, OSError, ValueError):
            continue
    for u in uuids:
        for desc in (VK_PREFIX + u, SEALED_PREFIX + u):
            counts["keys"] += cache.forget_key(desc)
    counts["keys"] += cache.forget_key(CHAIN_KEY)
    return counts


def _known_paths(chain: _Chain | None) -> list[str]:
    paths = [e.source_path for e in crypttab.read()]
    if chain is not None:
        paths += [v["path"] for v in chain.volumes if v["path"] not in paths]
    return paths


def _sweep_paths(given: Sequence[str]) -> list[str]:
    """Where the sweeps look for one-time keyslots: every LUKS header of the machine.

    ``given`` (crypttab, the chain, the caller's paths: image files are only found this
    way), every crypttab source (prompting or not: ``arm --volume`` takes any), and every
    LUKS block device (keyhandoff.luks_scan), each device once.  Nothing here depends on
    the chain state, which may have expired or been removed.
    """
    try:
        with open(crypttab.DEFAULT_PATH, encoding="utf-8", errors="replace") as f:
            listed = [e.source_path for e in crypttab.parse(f.read())]
    except OSError:
        listed = []
    return luks_paths([*given, *listed])


def status() -> dict[str, Any]:
    """What is armed (never a secret)."""
    chain = _Chain.load(PassphraseCache())
    if chain is None:
        return {"armed": False}
    return {
        "armed": True, "channel": chain.channel, "reboot": chain.reboot,
        "deadline": chain.not_after, "boots_left": chain.boots_left, "login": chain.login,
        "volumes": [v["uuid"] for v in chain.volumes],
        "rearmed_this_boot": chain.armed_this_boot(),
    }


# --- boot time: restore and finish ----------------------------------------------------------


def first_in_boot(step: str, *, lock_wait: float = statelock.DEFAULT_WAIT) -> bool:
    """Mark ``step`` as done in this boot; ``False`` when it was done in this boot already.

    For boot steps with no chain state of their own to tell (``login-handoff``): a restart
    of their unit must not hand the passphrase over again.  The mark is a file beside the
    state lock holding the boot id (not secret), written before the step runs: a step that
    failed half-way is not retried in the same boot, the person types instead.
    """
    if not step.replace("-", "").isalnum():
        raise InvalidArgument("a step name is letters, digits and dashes")
    boot = _boot_id()
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


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What ``restore`` found and did."""

    channel: str | None
    restored: tuple[str, ...]
    refused: str | None
    keyslots_destroyed: int


def restore(
    *, volumes: Sequence[str] | None = None, wait: float = 0,
    lock_wait: float = statelock.DEFAULT_WAIT,
) -> RestoreReport:
    """Early in boot: load what an armed record carries into the cache, wipe the rest.

    ``wait``: seconds to wait for the volumes' devices when a record is there.

    The ``keyring`` channel needs nothing loaded (the keys survived the soft reboot); its
    boot count goes down.  The ``efi`` record is read and deleted first (if it cannot be
    deleted it is not used), then authenticated and checked; its one-time keys are cached
    for the agent with a short kernel timeout.  Every boot destroys one-time keyslots that no
    valid record claims, including expired ones, on either channel and on every LUKS volume
    of the machine (the given paths or crypttab, every crypttab source and every LUKS block
    device: see :func:`_sweep_paths`), whether or not any chain state still names them.

    Idempotent within one boot: in the boot that armed (or re-armed) the chain, the record
    and its keyslots are for the *next* boot and stay; a second restore in the boot that
    restored does nothing more.  Holds the state lock; makes the process non-dumpable.
    """
    _harden()
    with statelock.held("restore", wait=lock_wait):
        cache = PassphraseCache()
        chain = _Chain.load(cache)
        if chain is not None and chain.channel == "keyring":
            return _restore_keyring(chain, cache, volumes)
        if chain is not None and chain.armed_this_boot():
            journal.log(Event.RESTORED, "armed in this boot: the record is for the next boot",
                        channel=chain.channel, volumes=0)
            return RestoreReport(None, (), None, 0)
        if chain is not None and chain.restored_boot == _boot_id():
            return RestoreReport(None, (), None, 0)  # restored already in this boot
        return _restore_efi(cache, volumes, wait)


def _restore_keyring(
    chain: _Chain, cache: PassphraseCache, volumes: Sequence[str] | None,
) -> RestoreReport:
    now = _now()
    if chain.pending:
        # restored already and not finished yet (the unit ran twice in one userspace): a
        # soft reboot keeps the boot id, so this marker is what counts each boot once
        return RestoreReport("keyring", (), None, 0)
    count = _soft_reboots()
    if count is not None and count == chain.soft_reboots:
        # no soft reboot since the chain was armed or last restored: the unit was restarted
        # (a package upgrade, systemctl restart) in a boot that is counted already
        return RestoreReport("keyring", (), None, 0)
    # A soft chain makes no one-time keyslots and needs no record: any there are stale
    # (an earlier full arming, a crash), and are swept as on every boot.
    blob, _refused = _take_record()
    if blob is not None:
        blob.wipe()
    paths = list(volumes) if volumes is not None else _known_paths(chain)
    destroyed = _destroy_unclaimed(paths, set())
    chain.boots_left -= 1
    chain.generation += 1
    chain.soft_reboots = count
    chain.pending = [{"uuid": v["uuid"], "keyslot": -1, "token": -1} for v in chain.volumes]
    chain.save(cache, now)
    journal.log(Event.RESTORED, "restored from the kernel keyring",
                channel="keyring", volumes=len(chain.volumes), boots_left=chain.boots_left)
    return RestoreReport("keyring", tuple(v["uuid"] for v in chain.volumes), None, destroyed)


def _wait_for(paths: list[str], seconds: float) -> None:
    """Early in boot the volumes' device links may not exist yet: wait for them, bounded."""
    deadline = time.monotonic() + seconds
    while any(not os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.1)


def _restore_efi(
    cache: PassphraseCache, volumes: Sequence[str] | None, wait: float,
) -> RestoreReport:
    from keyhandoff import stash

    given = list(volumes) if volumes is not None else _known_paths(None)
    blob, refused = _take_record()
    if blob is not None and wait > 0:
        _wait_for(given, wait)  # only when a record needs the headers: not on every boot
    paths = _sweep_paths(given)
    now = _now()
    found = _onetime_slots(paths)
    claimed: set[str] = set()
    record = None
    if blob is not None:
        with blob:
            try:
                record, claimed = _open_efi_record(blob, found, now)
            except stash.RecordRefused as exc:
                refused = str(exc)
                journal.log(Event.RECORD_REFUSED, f"handoff record refused: {exc}",
                            priority=journal.WARNING, reason=str(exc))
    destroyed = _destroy_unclaimed(paths, claimed)
    restored: list[str] = []
    if record is not None:
        with record:
            restored = _load_efi_record(record, found, claimed, cache, now)
    return RestoreReport("efi" if blob is not None else None, tuple(restored), refused, destroyed)


def _take_record() -> tuple[Secret | None, str | None]:
    """Read and delete the EFI record (not used when it cannot be deleted)."""
    from keyhandoff import efi, stash

    if not efi.supported():
        return None, None
    try:
        return stash.EfiChannel().take(), None
    except efi.EfiError as exc:
        refused = f"the record could not be deleted, so it is not used: {exc}"
        journal.log(Event.RECORD_REFUSED, refused, priority=journal.WARNING)
        return None, refused


def _onetime_slots(paths: list[str]) -> list[tuple[str, str, Any]]:
    """(header path, volume UUID, slot) for every one-time keyslot on these volumes."""
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    found: list[tuple[str, str, Any]] = []
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                found += [(path, header.uuid, s) for s in onetime.slots(header)]
        except (LuksError, OSError, ValueError):
            continue
    return found


def _destroy_unclaimed(paths: list[str], claimed: set[str]) -> int:
    """Destroy one-time keyslots no valid record claims: expired, refused, consumed, crashed.

    ``claimed``: the bindings of the keyslots the record names (a binding names one keyslot
    instance, whichever path reaches its header).  Tokens of our type that do not parse,
    or are not bound to the keyslot they name, are removed (never their keyslot): nothing
    can trust what they say.  Each header is opened once.
    """
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    destroyed = 0
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                for slot in onetime.slots(header):
                    if slot.binding not in claimed:
                        destroyed += onetime.destroy(header, slot)
                onetime.remove_untrusted(header)
        except (LuksError, OSError, ValueError):
            continue
    if destroyed:
        journal.log(Event.WIPED, f"destroyed {destroyed} unclaimed one-time keyslot(s)",
                    keyslots=destroyed)
    return destroyed


def _open_efi_record(
    blob: Secret, found: list[tuple[str, str, Any]], now: int,
) -> tuple[Any, set[str]]:
    from keyhandoff import stash

    header = stash.parse_header(blob.view())
    for _path, _vol, slot in found:
        with slot.record_key() as key:
            if len(key) != stash.RECORD_KEY_LEN or stash.record_key_id(key) != header.key_id:
                continue
            record = stash.open_record(blob.view(), key, now=now,
                                       boot_id=_uuid.UUID(_boot_id()), channel=stash.Channel.EFI)
        claimed = {s.binding for _p, _v, s in found if s.record_key_b64 == slot.record_key_b64}
        return record, claimed
    raise stash.RecordForeign("no one-time keyslot on this machine's volumes matches it")


def _load_efi_record(
    record: Any, found: list[tuple[str, str, Any]], claimed: set[str],  # noqa: ANN401
    cache: PassphraseCache, now: int,
) -> list[str]:
    from keyhandoff import onetime, stash

    timeout = max(1, min(record.not_after - now, RESTORE_TIMEOUT))
    restored = []
    pending = []
    volumes = []
    for entry in record.entries:
        volume = str(entry.volume)
        slots = [(p, s) for p, v, s in found if v == volume and s.binding in claimed]
        if not slots:
            continue
        path, slot = slots[0]
        if entry.kind is stash.EntryKind.ONETIME_KEY:
            with onetime.key_text(entry.payload) as text:
                cache.put(volume, text, timeout=timeout)
            restored.append(volume)
            pending.append({"uuid": volume, "keyslot": slot.keyslot, "token": slot.token,
                            "path": path})
            volumes.append({"uuid": volume, "path": path, "name": os.path.basename(path)})
        elif entry.kind is stash.EntryKind.SEALED_PASSPHRASE:
            cache.put_key(SEALED_PREFIX + volume, entry.payload,
                          timeout=max(1, record.not_after - now))
    chain = _Chain(channel="efi", reboot="full", not_after=record.not_after,
                   boots_left=record.boots_left - 1,
                   login=any(e.kind is stash.EntryKind.SEALED_PASSPHRASE for e in record.entries),
                   volumes=volumes, armed_boot="", pending=pending, restored_boot=_boot_id())
    chain.save(cache, now)
    journal.log(Event.RESTORED, f"restored one-time keys for {len(restored)} volume(s)",
                channel="efi", volumes=len(restored), boots_left=chain.boots_left)
    return restored


@dataclass(frozen=True, slots=True)
class FinishReport:
    """What ``finish`` did after the volumes were opened."""

    keyslots_destroyed: int
    login: str


def finish(*, login_timeout: int = 120,
           lock_wait: float = statelock.DEFAULT_WAIT) -> FinishReport:
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
        return _finish(login_timeout)


def _finish(login_timeout: int) -> FinishReport:
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    if chain is None or not chain.pending:
        # nothing to finish, but a one-time keyslot of an earlier boot can only be stale
        return FinishReport(_destroy_stale(_known_paths(chain)), "nothing armed")
    last_boot = chain.boots_left <= 0
    passphrases: list[Secret] = []
    destroyed = 0
    try:
        for item in chain.pending:
            if chain.channel == "keyring":
                if last_boot and chain.login:
                    with contextlib.suppress(KeyUnavailable):
                        passphrases.append(cache.get(item["uuid"]))
            else:
                destroyed += _finish_efi_volume(chain, item, cache, passphrases)
        destroyed += _destroy_stale([v["path"] for v in chain.volumes])
        chain.pending = []
        if not last_boot:
            chain.save(cache, _now())
            login = "on a later boot" if chain.login else "not requested"
        else:
            login = "not requested"
            if chain.login and passphrases:
                login_mod.handoff(passphrases[-1], timeout=login_timeout)
                login = "handed to the login path"
            elif chain.login:
                login = "refused: no passphrase could be recovered for the login"
            disarm(quiet=True, volumes=[v["path"] for v in chain.volumes])
    finally:
        for pw in passphrases:
            pw.wipe()
    if destroyed:
        journal.log(Event.WIPED, f"destroyed {destroyed} used one-time keyslot(s)",
                    keyslots=destroyed)
    return FinishReport(destroyed, login)


def _destroy_stale(given: list[str]) -> int:
    """After the volumes are open: destroy every one-time keyslot not armed in this boot.

    Its record was read (and deleted) by this boot's restore, or can no longer be used:
    such a keyslot only stays as a way into the volume.  One armed in this boot waits for
    the next boot; an expired one goes whatever its boot.
    """
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    boot_id, now, destroyed = _boot_id(), _now(), 0
    for path in _sweep_paths(given):
        try:
            with LuksHeader.open(path) as header:
                for slot in onetime.slots(header):
                    if slot.boot_id != boot_id or slot.not_after <= now:
                        destroyed += onetime.destroy(header, slot)
                onetime.remove_untrusted(header)
        except (LuksError, OSError, ValueError):
            continue
    return destroyed


def _finish_efi_volume(
    chain: _Chain, item: dict[str, Any], cache: PassphraseCache, passphrases: list[Secret],
) -> int:
    """One volume of an efi chain; return how many keyslots were destroyed."""
    from keyhandoff import onetime
    from keyhandoff.luks import LuksError, LuksHeader

    volume = item["uuid"]
    try:
        key: Secret | None = cache.get(volume)
    except KeyUnavailable:
        key = None
    # The one-time key answered its prompt; it must neither stay in our cache nor in
    # systemd's, where pam_gdm would take it for "the last entry".
    cache.forget(volume)
    sealed = cache.get_key(SEALED_PREFIX + volume)
    cache.forget_key(SEALED_PREFIX + volume)
    destroyed = 0
    try:
        with LuksHeader.open(item["path"]) as header:
            if key is not None:
                try:
                    _slot, vk = header.volume_key(key, keyslot=item["keyslot"])
                except LuksError:
                    vk = None
                if vk is not None:
                    with vk:
                        _carry_on(chain, volume, vk, sealed, cache, passphrases)
            for slot in onetime.slots(header):
                if slot.token == item["token"]:
                    destroyed += onetime.destroy(header, slot)
    except (LuksError, OSError) as exc:
        journal.log(Event.ERROR, f"could not finish the handoff for {volume}: {exc}",
                    priority=journal.WARNING, volume=volume)
    finally:
        if sealed is not None:
            sealed.wipe()
        if key is not None:
            SystemdCache().remove([key])
            key.wipe()
    return destroyed


def _carry_on(
    chain: _Chain, volume: str, vk: Secret, sealed: Secret | None, cache: PassphraseCache,
    passphrases: list[Secret],
) -> None:
    """With the volume key: open the sealed login passphrase; keep what later boots need."""
    from keyhandoff import stash

    deadline_left = max(1, chain.not_after - _now())
    if sealed is not None:
        try:
            pw = stash.open_with_volume_key(vk, sealed.view(), _login_context(volume))
        except stash.SealedPayloadRefused:
            journal.log(Event.ERROR, f"the sealed login passphrase for {volume} did not open",
                        priority=journal.WARNING, volume=volume)
        else:
            if chain.boots_left > 0:
                cache.put(volume, pw, timeout=deadline_left)  # re-sealed by rearm()
            passphrases.append(pw)
    if chain.boots_left > 0:
        cache.put_key(VK_PREFIX + volume, vk, timeout=deadline_left)
