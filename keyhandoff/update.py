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

from keyhandoff import journal
from keyhandoff.cache import PassphraseCache, SystemdCache, normalize_uuid
from keyhandoff.errors import KeyExpired, KeyhandoffError, KeyNotFound, KeyRevoked
from keyhandoff.journal import Event
from keyhandoff.secret import Secret

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

CHAIN_KEY: Final = "keyhandoff:chain"
VK_PREFIX: Final = "keyhandoff:vk:"
SEALED_PREFIX: Final = "keyhandoff:sealed:"
MAX_TTL: Final = timedelta(days=1)
MAX_BOOTS: Final = 16
#: How long a restored one-time key may wait for its prompt.
RESTORE_TIMEOUT: Final = 600


class UpdateError(KeyhandoffError):
    """Root of the runner API's refusals."""


class ArmRefused(UpdateError):
    """Arming was refused; ``report`` says per volume why (nothing was left armed)."""

    def __init__(self, message: str, report: ArmReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class ChannelUnavailable(UpdateError):
    """The machine cannot carry a record for this kind of reboot."""


class NotArmed(UpdateError):
    """``rearm`` without an armed chain (disarmed, expired, or exhausted)."""


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
    #: boot_id of the boot that last wrote a record (rearm is once per boot)
    armed_boot: str = ""
    #: one-time keyslots restored this boot, to destroy once the volumes are open
    pending: list[dict[str, Any]] = field(default_factory=list)

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


# --- volumes and passphrases -----------------------------------------------------------------


def targets(sources: Sequence[str] | None = None) -> list[Target]:
    """The volumes to hand over: ``sources`` (paths), else the prompting crypttab entries."""
    from keyhandoff import crypttab  # noqa: PLC0415
    from keyhandoff.volumes import resolve_source  # noqa: PLC0415

    if sources is not None:
        named = [(os.path.basename(s), s) for s in sources]
    else:
        named = [(e.name, e.source_path) for e in crypttab.read()]
    out = []
    for name, path in named:
        volume = resolve_source(path, require_header=True)
        out.append(Target(normalize_uuid(volume), path, name))
    return out


def ask_with_systemd(target: Target) -> Secret:
    """Ask once through the password-agent protocol, as systemd-cryptsetup would.

    The real ``systemd-ask-password`` shows the prompt to whichever agent runs (plymouth,
    the console, a desktop); the answer comes back on a pipe, never in argv or environ.
    """
    proc = subprocess.run(
        ["systemd-ask-password", "--icon=drive-harddisk", "--timeout=0",
         f"--id=cryptsetup:{target.path}",
         f"Please enter passphrase for disk {target.name} (for the update):"],
        capture_output=True, check=False, timeout=None,
    )
    raw = bytearray(proc.stdout)
    proc.stdout = b""
    if proc.returncode != 0:
        Secret(raw, allow_empty=True).wipe()
        raise UpdateError(f"no passphrase given for {target.name}")
    if raw.endswith(b"\n"):
        del raw[-1:]
    return Secret.passphrase(raw)


def _passphrase(target: Target, cache: PassphraseCache, ask: Ask | None) -> tuple[Secret, str]:
    """A passphrase for ``target`` (unverified) and where it came from: cached, else asked."""
    try:
        return cache.get(target.uuid), "cache"
    except (KeyNotFound, KeyExpired, KeyRevoked):
        if ask is None:
            raise ArmRefused(f"no cached passphrase for {target.name}") from None
        return ask(target), "asked"


def _refuse_wrong(target: Target, cache: PassphraseCache, source: str) -> ArmRefused:
    if source == "cache":
        cache.forget(target.uuid)  # a cached entry that does not open its volume is junk
    return ArmRefused(f"the passphrase for {target.name} does not open it")


def _verified_passphrase(
    target: Target, cache: PassphraseCache, ask: Ask | None, progress: Progress,
) -> Secret:
    """A passphrase for ``target`` that opens it (one PBKDF to check it)."""
    from keyhandoff.luks import LuksHeader, WrongPassphrase  # noqa: PLC0415

    secret, source = _passphrase(target, cache, ask)
    progress(f"checking the passphrase for {target.name} ({source})")
    try:
        with LuksHeader.open(target.path) as header:
            header.verify(secret)
    except WrongPassphrase:
        secret.wipe()
        raise _refuse_wrong(target, cache, source) from None
    return secret


# --- arm ---------------------------------------------------------------------------------------


def _check_args(reboot: str, boots: int, ttl: timedelta) -> int:
    if reboot not in ("soft", "full"):
        raise ValueError('reboot must be "soft" or "full"')
    if not 1 <= boots <= MAX_BOOTS:
        raise ValueError(f"boots must be 1..{MAX_BOOTS}")
    seconds = int(ttl.total_seconds())
    if not 60 <= seconds <= MAX_TTL.total_seconds():
        raise ValueError("ttl must be between 1 minute and 1 day")
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
) -> ArmReport:
    """Arm the handoff for the next ``boots`` boots, until ``ttl`` from now.

    ``volumes`` are source paths (default: the prompting entries of /etc/crypttab).  A
    passphrase comes from the cache (captured and verified at boot) or, if ``ask`` is given,
    is asked once.  Every volume must be armable; otherwise :class:`ArmRefused` is raised
    and nothing is left armed.  Returns what was done; ``summary()`` says it in words.
    """
    seconds = _check_args(reboot, boots, ttl)
    say = progress or (lambda _msg: None)
    chosen = targets(volumes)
    if not chosen:
        raise ArmRefused("no volume to arm (no prompting entry in /etc/crypttab)")
    cache = PassphraseCache()
    _wipe_armed(cache, _Chain.load(cache), [t.path for t in chosen])
    now = _now()
    chain = _Chain(
        channel="keyring" if reboot == "soft" else "efi",
        reboot=reboot, not_after=now + seconds, boots_left=boots, login=login,
        volumes=[asdict(t) for t in chosen], armed_boot=_boot_id(),
    )
    if reboot == "soft":
        report = _arm_keyring(chain, chosen, cache, ask, say)
    else:
        report = _arm_efi(chain, chosen, cache, ask, say)
    journal.log(Event.ARMED, f"armed {len(chosen)} volume(s) via {report.channel}",
                channel=report.channel, boots=boots, deadline=chain.not_after)
    return report


def _arm_keyring(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache, ask: Ask | None,
    say: Progress,
) -> ArmReport:
    now = _now()
    reports = []
    try:
        for t in chosen:
            with _verified_passphrase(t, cache, ask, say) as secret:
                cache.put(t.uuid, secret, timeout=chain.not_after - now)
            reports.append(VolumeReport(t.uuid, t.name, armed=True,
                                        how="passphrase kept in the kernel keyring (RAM)"))
        chain.save(cache, now)
    except BaseException:
        cache.forget_key(CHAIN_KEY)
        raise
    login = "the passphrase goes to the login keyring on the last boot" if chain.login \
        else "not requested"
    return ArmReport("keyring", chain.reboot, chain.not_after, chain.boots_left, login,
                     tuple(reports))


def _arm_efi(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache, ask: Ask | None,
    say: Progress,
) -> ArmReport:
    from keyhandoff import efi  # noqa: PLC0415
    from keyhandoff.luks import LuksHeader  # noqa: PLC0415

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
        report = ArmReport("efi", chain.reboot, chain.not_after, chain.boots_left,
                           "not armed", tuple(refused))
        raise ArmRefused("; ".join(f"{r.name}: {r.how}" for r in refused), report)
    try:
        return _write_efi_record(chain, chosen, cache, ask, say)
    except BaseException:
        _wipe_armed(cache, chain, [t.path for t in chosen])
        raise


def _write_efi_record(
    chain: _Chain, chosen: list[Target], cache: PassphraseCache, ask: Ask | None,
    say: Progress, volume_keys: dict[str, Secret] | None = None,
) -> ArmReport:
    """Add one-time keyslots, seal the record, store it.  ``volume_keys``: a re-arm's."""
    from keyhandoff import onetime, stash  # noqa: PLC0415
    from keyhandoff.luks import LuksHeader, WrongPassphrase  # noqa: PLC0415

    now = _now()
    boot_id = _boot_id()
    entries: list[stash.StashEntry] = []
    reports = []
    record_key = stash.new_record_key()
    try:
        for t in chosen:
            passphrase: Secret | None = None
            with LuksHeader.open(t.path) as header:
                if volume_keys is not None:
                    vk = volume_keys[t.uuid].copy()
                    if chain.login:
                        passphrase = cache.get(t.uuid)
                else:
                    # The volume key is the check: one PBKDF of the person's keyslot, not two.
                    passphrase, source = _passphrase(t, cache, ask)
                    say(f"reading the volume key of {t.name} ({source}; one PBKDF)")
                    try:
                        _slot, vk = header.volume_key(passphrase)
                    except WrongPassphrase:
                        passphrase.wipe()
                        raise _refuse_wrong(t, cache, source) from None
                with vk:
                    say(f"adding a one-time keyslot to {t.name}")
                    slot_info, key = onetime.add(
                        header, vk, not_after=chain.not_after, boot_id=boot_id,
                        record_key=record_key,
                    )
                    volume = _uuid.UUID(t.uuid)
                    entries.append(stash.StashEntry(volume, stash.EntryKind.ONETIME_KEY, key))
                    if chain.login and passphrase is not None:
                        sealed = stash.seal_to_volume_key(vk, passphrase, _login_context(t.uuid))
                        entries.append(stash.StashEntry(
                            volume, stash.EntryKind.SEALED_PASSPHRASE, Secret(sealed)))
                    if passphrase is not None:
                        passphrase.wipe()
            reports.append(VolumeReport(
                t.uuid, t.name, armed=True,
                how=f"one-time keyslot {slot_info.keyslot}; the EFI record holds only its key"))
        record = stash.HandoffRecord(
            channel=stash.Channel.EFI, created=now, not_after=chain.not_after,
            boots_left=chain.boots_left, boot_id=_uuid.UUID(boot_id), entries=tuple(entries),
        )
        blob = stash.seal(record, record_key)
        say("writing the handoff record to the EFI variable")
        stash.EfiChannel().store(blob)
    finally:
        record_key.wipe()
        for e in entries:
            e.wipe()
    chain.armed_boot = boot_id
    chain.save(cache, now)
    login = ("the passphrase travels sealed to the volume key and goes to the login keyring "
             "on the last boot") if chain.login else "not requested"
    return ArmReport("efi", chain.reboot, chain.not_after, chain.boots_left, login,
                     tuple(reports))


def _login_context(volume: str) -> bytes:
    return b"keyhandoff login:" + volume.encode()


# --- rearm / disarm / status -------------------------------------------------------------------


def rearm(*, progress: Progress | None = None) -> ArmReport:
    """Inside an update boot: arm the chain's next boot (once per boot)."""
    say = progress or (lambda _msg: None)
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    now = _now()
    if chain is None or chain.not_after <= now:
        raise NotArmed("nothing is armed (disarmed, expired, or never armed)")
    if chain.boots_left < 1:
        raise NotArmed("the armed chain has no boot left")
    boot_id = _boot_id()
    if chain.armed_boot == boot_id:
        raise NotArmed("already armed in this boot")
    chosen = chain.targets()
    if chain.channel == "keyring":
        chain.armed_boot = boot_id
        chain.save(cache, now)
        reports = tuple(VolumeReport(t.uuid, t.name, armed=True,
                                     how="passphrase still in the kernel keyring")
                        for t in chosen)
        report = ArmReport("keyring", chain.reboot, chain.not_after, chain.boots_left,
                           "on the last boot" if chain.login else "not requested", reports)
    else:
        volume_keys: dict[str, Secret] = {}
        try:
            for t in chosen:
                vk = cache.get_key(VK_PREFIX + t.uuid)
                if vk is None:
                    raise NotArmed(f"the volume key of {t.name} is gone (expired?)")
                volume_keys[t.uuid] = vk
            report = _write_efi_record(chain, chosen, cache, None, say, volume_keys)
        finally:
            for vk in volume_keys.values():
                vk.wipe()
        for t in chosen:
            cache.forget_key(VK_PREFIX + t.uuid)
    journal.log(Event.ARMED, f"re-armed for {chain.boots_left} more boot(s)",
                channel=chain.channel, boots=chain.boots_left, deadline=chain.not_after)
    return report


def disarm(*, quiet: bool = False, volumes: Sequence[str] | None = None) -> dict[str, int]:
    """Wipe everything armed.

    The EFI record, our state keys, one-time keyslots, and the cached passphrases of the
    armed volumes.
    """
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    paths = list(volumes) if volumes is not None else _known_paths(chain)
    counts = _wipe_armed(cache, chain, paths)
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
    from keyhandoff import efi, onetime  # noqa: PLC0415
    from keyhandoff.luks import LuksError, LuksHeader  # noqa: PLC0415

    counts = {"records": 0, "keys": 0, "keyslots": 0}
    if efi.supported():
        with contextlib.suppress(efi.EfiVariableNotFound):
            efi.STASH.delete()
            counts["records"] += 1
    uuids = {v["uuid"] for v in chain.volumes} if chain else set()
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                uuids.add(header.uuid)
                for slot in onetime.slots(header):
                    counts["keyslots"] += onetime.destroy(header, slot)
        except (LuksError, OSError):
            continue
    for u in uuids:
        for desc in (VK_PREFIX + u, SEALED_PREFIX + u):
            counts["keys"] += cache.forget_key(desc)
    counts["keys"] += cache.forget_key(CHAIN_KEY)
    return counts


def _known_paths(chain: _Chain | None) -> list[str]:
    from keyhandoff import crypttab  # noqa: PLC0415

    paths = [e.source_path for e in crypttab.read()]
    if chain is not None:
        paths += [v["path"] for v in chain.volumes if v["path"] not in paths]
    return paths


def status() -> dict[str, Any]:
    """What is armed (never a secret)."""
    chain = _Chain.load(PassphraseCache())
    if chain is None:
        return {"armed": False}
    return {
        "armed": True, "channel": chain.channel, "reboot": chain.reboot,
        "deadline": chain.not_after, "boots_left": chain.boots_left, "login": chain.login,
        "volumes": [v["uuid"] for v in chain.volumes],
        "rearmed_this_boot": chain.armed_boot == _boot_id(),
    }


# --- boot time: restore and finish ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What ``restore`` found and did."""

    channel: str | None
    restored: tuple[str, ...]
    refused: str | None
    keyslots_destroyed: int


def restore(*, volumes: Sequence[str] | None = None, wait: float = 0) -> RestoreReport:
    """Early in boot: load what an armed record carries into the cache, wipe the rest.

    ``wait``: seconds to wait for the volumes' devices when a record is there.

    The ``keyring`` channel needs nothing loaded (the keys survived the soft reboot); its
    boot count goes down.  The ``efi`` record is read and deleted first (if it cannot be
    deleted it is not used), then authenticated and checked; its one-time keys are cached
    for the agent with a short kernel timeout.  Every boot destroys one-time keyslots that no
    valid record claims, including expired ones.
    """
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    if chain is not None and chain.channel == "keyring":
        return _restore_keyring(chain, cache)
    return _restore_efi(cache, volumes, wait)


def _restore_keyring(chain: _Chain, cache: PassphraseCache) -> RestoreReport:
    now = _now()
    if chain.pending:
        # restored already and not finished yet (the unit ran twice in one userspace): a
        # soft reboot keeps the boot id, so this marker is what counts each boot once
        return RestoreReport("keyring", (), None, 0)
    chain.boots_left -= 1
    chain.pending = [{"uuid": v["uuid"], "keyslot": -1, "token": -1} for v in chain.volumes]
    chain.save(cache, now)
    journal.log(Event.RESTORED, "restored from the kernel keyring",
                channel="keyring", volumes=len(chain.volumes), boots_left=chain.boots_left)
    return RestoreReport("keyring", tuple(v["uuid"] for v in chain.volumes), None, 0)


def _wait_for(paths: list[str], seconds: float) -> None:
    """Early in boot the volumes' device links may not exist yet: wait for them, bounded."""
    deadline = time.monotonic() + seconds
    while any(not os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.1)


def _restore_efi(
    cache: PassphraseCache, volumes: Sequence[str] | None, wait: float,
) -> RestoreReport:
    from keyhandoff import stash  # noqa: PLC0415

    paths = list(volumes) if volumes is not None else _known_paths(None)
    blob, refused = _take_record()
    if blob is not None and wait > 0:
        _wait_for(paths, wait)  # only when a record needs the headers: not on every boot
    now = _now()
    found = _onetime_slots(paths)
    claimed: set[tuple[str, int]] = set()
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
    from keyhandoff import efi, stash  # noqa: PLC0415

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
    from keyhandoff import onetime  # noqa: PLC0415
    from keyhandoff.luks import LuksError, LuksHeader  # noqa: PLC0415

    found: list[tuple[str, str, Any]] = []
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                found += [(path, header.uuid, s) for s in onetime.slots(header)]
        except (LuksError, OSError):
            continue
    return found


def _destroy_unclaimed(paths: list[str], claimed: set[tuple[str, int]]) -> int:
    """Destroy one-time keyslots no valid record claims: expired, refused, consumed, crashed.

    Tokens of our type that do not parse are removed too: nothing can trust what they say.
    Each header is opened once.
    """
    from keyhandoff import onetime  # noqa: PLC0415
    from keyhandoff.luks import LuksError, LuksHeader  # noqa: PLC0415

    destroyed = 0
    for path in paths:
        try:
            with LuksHeader.open(path) as header:
                for slot in onetime.slots(header):
                    if (path, slot.token) not in claimed:
                        destroyed += onetime.destroy(header, slot)
                for token in onetime.malformed_tokens(header):
                    header.remove_token(token)
        except (LuksError, OSError):
            continue
    if destroyed:
        journal.log(Event.WIPED, f"destroyed {destroyed} unclaimed one-time keyslot(s)",
                    keyslots=destroyed)
    return destroyed


def _open_efi_record(
    blob: Secret, found: list[tuple[str, str, Any]], now: int,
) -> tuple[Any, set[tuple[str, int]]]:
    from keyhandoff import stash  # noqa: PLC0415

    header = stash.parse_header(blob.view())
    for _path, _vol, slot in found:
        with slot.record_key() as key:
            if len(key) != stash.RECORD_KEY_LEN or stash.record_key_id(key) != header.key_id:
                continue
            record = stash.open_record(blob.view(), key, now=now,
                                       boot_id=_uuid.UUID(_boot_id()), channel=stash.Channel.EFI)
        claimed = {(p, s.token) for p, _v, s in found if s.record_key_b64 == slot.record_key_b64}
        return record, claimed
    raise stash.RecordForeign("no one-time keyslot on this machine's volumes matches it")


def _load_efi_record(
    record: Any, found: list[tuple[str, str, Any]], claimed: set[tuple[str, int]],  # noqa: ANN401
    cache: PassphraseCache, now: int,
) -> list[str]:
    from keyhandoff import onetime, stash  # noqa: PLC0415

    timeout = max(1, min(record.not_after - now, RESTORE_TIMEOUT))
    restored = []
    pending = []
    volumes = []
    for entry in record.entries:
        volume = str(entry.volume)
        slots = [(p, s) for p, v, s in found if v == volume and (p, s.token) in claimed]
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
                   volumes=volumes, armed_boot="", pending=pending)
    chain.save(cache, now)
    journal.log(Event.RESTORED, f"restored one-time keys for {len(restored)} volume(s)",
                channel="efi", volumes=len(restored), boots_left=chain.boots_left)
    return restored


@dataclass(frozen=True, slots=True)
class FinishReport:
    """What ``finish`` did after the volumes were opened."""

    keyslots_destroyed: int
    login: str


def finish(*, login_timeout: int = 120) -> FinishReport:
    """After ``cryptsetup.target``: destroy the used one-time keyslots.

    Keeps what the chain needs next (a volume key while boots remain) and, on the last
    boot, hands the passphrase to the login path.
    """
    cache = PassphraseCache()
    chain = _Chain.load(cache)
    if chain is None or not chain.pending:
        return FinishReport(0, "nothing armed")
    last_boot = chain.boots_left <= 0
    passphrases: list[Secret] = []
    destroyed = 0
    try:
        for item in chain.pending:
            if chain.channel == "keyring":
                if last_boot and chain.login:
                    with contextlib.suppress(KeyNotFound, KeyExpired, KeyRevoked):
                        passphrases.append(cache.get(item["uuid"]))
            else:
                destroyed += _finish_efi_volume(chain, item, cache, passphrases)
        chain.pending = []
        if not last_boot:
            chain.save(cache, _now())
            login = "on a later boot" if chain.login else "not requested"
        else:
            login = "not requested"
            if chain.login and passphrases:
                from keyhandoff import login as login_mod  # noqa: PLC0415

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


def _finish_efi_volume(
    chain: _Chain, item: dict[str, Any], cache: PassphraseCache, passphrases: list[Secret],
) -> int:
    """One volume of an efi chain; return how many keyslots were destroyed."""
    from keyhandoff import onetime  # noqa: PLC0415
    from keyhandoff.luks import LuksError, LuksHeader  # noqa: PLC0415

    volume = item["uuid"]
    try:
        key: Secret | None = cache.get(volume)
    except (KeyNotFound, KeyExpired, KeyRevoked):
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
    from keyhandoff import stash  # noqa: PLC0415

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
