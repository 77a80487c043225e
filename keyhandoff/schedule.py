"""Automatic arming: an offline update is scheduled, so the handoff is armed for it.

No runner has to call :func:`keyhandoff.update.arm`.  systemd's offline-update protocol
(``systemd.offline-updates(7)``) has the runner create ``/system-update`` (or
``/etc/system-update``) before it reboots, and remove it in the update boot before the
final reboot.  ``keyhandoff-schedule.path`` starts ``keyhandoff schedule`` whenever that
link appears or goes, ``keyhandoff-schedule-shutdown.service`` runs it again when a
shutdown stops it, and :func:`reconcile` looks at the machine as it is then:

* an update is scheduled and nothing is armed (``[update] auto_arm``, on by default):
  arm for ``boots=2`` (the update boot and the boot after it), from the passphrases
  captured at boot, never asking anyone and waiting at most :data:`LOCK_WAIT` seconds for
  the state lock.  The channel is the one for the reboot that follows (:func:`channel_for`):
  ``full``, or with ``[update] reboot = "kexec"`` the ``kexec`` channel, while no shutdown
  is under way; at a shutdown, the one for what the manager's job list says is coming
  (:meth:`keyhandoff.host.Host.shutdown_coming`): ``soft`` for a soft reboot, ``kexec``
  only for a kexec of keyhandoff's own loaded image, else ``full`` (an EFI variable lives
  through a kexec of someone else's image, a reboot and a power-off).  The chain state
  records that the arming was automatic and in which boot
  (:attr:`keyhandoff.chain.Chain.auto_boot`);
* the captured passphrases stay in the cache (under their own kernel timeout) until the
  shutdown has been looked at: a soft reboot, known only then, needs them in the kernel
  keyring.  At the shutdown an automatic chain of this boot that does not suit what is
  coming is armed again for it, and then the captured passphrases are taken out of the
  cache (the record carries what the boots need; for a soft reboot the keyring channel
  keeps them as they are, under the chain's deadline);
* scheduled, but a volume's passphrase is not captured (or its capture expired): nothing
  is armed and nothing fails; the journal says so (``NOTHING_CAPTURED``, naming the
  volumes) and the boots will ask as usual;
* something is armed already by a runner, or by an earlier boot: left alone;
* not scheduled any more (the link removed: cancelled): disarm, but only a chain armed
  automatically in *this* boot.  A chain restored from an earlier boot is never touched:
  in the update boot the runner removes the link before its final reboot, and the chain's
  second boot must survive;
* an update boot (``system-update.target`` active, or the chain was restored in this
  boot): nothing at all.

Every outcome is kept, not secret, in ``/run/keyhandoff/schedule`` for ``keyhandoff
status``.  The time the chain may live is the retention policy's
(:attr:`keyhandoff.config.Config.capture_timeout`): the passphrase waits in the record
no longer than it could have waited in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from keyhandoff import chain as chain_mod
from keyhandoff import channels, journal, statelock, timefmt, update
from keyhandoff import config as config_mod
from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import ArmRefused, ChannelUnavailable, KeyhandoffError
from keyhandoff.host import THIS_HOST, Host
from keyhandoff.journal import Event

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.chain import Chain, Reboot, Target

__all__ = ["BOOTS", "LOCK_WAIT", "REBOOT", "ScheduleReport", "channel_for", "last_report",
           "reconcile", "status"]

#: Seconds to wait for another state change (a runner arming): never block for long.
LOCK_WAIT: Final = 5.0
#: The channel and boots of an automatic arming: the update boot and the one after it.
REBOOT: Final[Reboot] = "full"
BOOTS: Final = 2
#: The file, beside the state lock, that keeps the last outcome (no secret).
REPORT_NAME: Final = "schedule"
#: What the reboot that follows is called in words, by :meth:`Host.shutdown_coming`'s value.
_COMING_WORDS: Final = {"soft-reboot": "a soft reboot", "kexec": "a kexec",
                        "reboot": "a reboot", "poweroff": "a power-off", "halt": "a halt"}


def channel_for(coming: str | None, conf: config_mod.Config, host: Host) -> Reboot:
    """The channel an automatic arming uses when ``coming`` (None: no shutdown yet) follows.

    ``soft`` for a soft reboot (the kernel keyring lives on; the root stays open).
    ``kexec`` for the setting's kexec while no shutdown is under way, or for a coming kexec
    of keyhandoff's own image; but never over a kexec image someone else loaded
    (:meth:`Host.kexec_loaded_by_others`): that one is not replaced, and ``full``'s EFI
    variable reaches the kernel it starts as it reaches a rebooted one.  ``full`` otherwise.
    """
    if coming == "soft-reboot":
        return "soft"
    if host.kexec_loaded_by_others():
        return REBOOT
    if coming is None:
        return "kexec" if conf.auto_reboot == "kexec" else REBOOT
    if coming == "kexec" and host.kexec_image_ours():
        return "kexec"
    return REBOOT


@dataclass(frozen=True, slots=True)
class ScheduleReport:
    """What one :func:`reconcile` found and did; never a secret.

    ``action``: ``armed``, ``nothing-captured``, ``left-alone``, ``disarmed``,
    ``not-scheduled``, ``update-boot``, ``disabled``, ``no-volumes``, ``unavailable``
    (the channel, e.g. no EFI), ``refused`` or ``busy``; ``ok`` is False only for the last
    two (a passphrase that does not open its volume, the state lock held too long).
    """

    action: str
    detail: str
    scheduled: str | None = None
    volumes: tuple[str, ...] = ()
    ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"action": self.action, "detail": self.detail, "scheduled": self.scheduled,
                "volumes": list(self.volumes), "ok": self.ok, **self.extra}

    def summary(self) -> str:
        """In words."""
        return self.detail


def reconcile(*, host: Host = THIS_HOST, config: config_mod.Config | None = None,
              lock_wait: float = LOCK_WAIT) -> ScheduleReport:
    """Make what is armed match whether an offline update is scheduled (see module doc).

    Without ``config``, the machine's, read as a boot step reads it: a bad file or setting
    is logged and left out (:func:`keyhandoff.config.load_for_boot`), so a typo never keeps
    a cancelled update's arming from being undone.
    """
    conf = config if config is not None else config_mod.load_for_boot("schedule")
    link = host.scheduled_update()
    if host.in_update_boot():
        return _told(ScheduleReport("update-boot", "this is an update boot "
                                    "(system-update.target is active): nothing to do",
                                    link), host)
    coming = host.shutdown_coming()  # not asked in an update boot, which does nothing
    try:
        with statelock.held("schedule", wait=lock_wait):
            report = _decide(host, conf, link, coming, lock_wait)
            if coming is not None:
                report = dataclasses.replace(report, extra={**report.extra, "coming": coming})
            _keep(report, host)
    except statelock.Busy as exc:
        report = ScheduleReport("busy", f"not looked at: {exc}", link, ok=False)
    return _told(report, host, kept=report.action != "busy")


def _decide(host: Host, conf: config_mod.Config, link: str | None, coming: str | None,
            lock_wait: float) -> ScheduleReport:
    cache = PassphraseCache()
    chain = chain_mod.load(cache)
    boot = host.boot_id()
    if chain is not None and chain.restored_boot == boot:
        return ScheduleReport("update-boot", "the armed chain was restored in this boot "
                              "(an update boot): it is left as it is", link)
    if link is None:
        return _cancelled(chain, boot, host, lock_wait)
    if chain is not None and chain.not_after > host.now():
        if coming is not None and chain.auto_boot == boot:
            return _at_shutdown(host, conf, link, coming, chain, cache, lock_wait)
        how = ("automatically in this boot" if chain.auto_boot == boot
               else "automatically in an earlier boot" if chain.auto_boot
               else "by an update runner")
        return ScheduleReport("left-alone", f"an offline update is scheduled ({link}) and a "
                              f"handoff is armed already ({how}): left as it is", link,
                              tuple(t.name for t in chain.volumes),
                              extra={"armed_automatically": bool(chain.auto_boot)})
    return _disabled(conf, link) or _arm(host, conf, link, cache, lock_wait, coming)


def _disabled(conf: config_mod.Config, link: str) -> ScheduleReport | None:
    """Why the configuration keeps this from arming, or None."""
    if conf.config_error is not None:  # fail-safe: a broken file must not turn arming on
        return ScheduleReport("disabled", f"an offline update is scheduled ({link}); "
                              f"{conf.config_error}: nothing is armed, the boots will ask",
                              link)
    if not conf.auto_arm:
        return ScheduleReport("disabled", f"an offline update is scheduled ({link}); automatic "
                              "arming is off ([update] auto_arm = false): the boots will ask",
                              link)
    return None


def _at_shutdown(host: Host, conf: config_mod.Config, link: str, coming: str, chain: Chain,
                 cache: PassphraseCache, lock_wait: float) -> ScheduleReport:
    """A shutdown is under way and this boot armed automatically: make it fit what is coming.

    The chain's channel suits ``coming``: left as it is.  It does not (a soft reboot of a
    ``full`` chain, a reboot of a ``kexec`` chain): armed again from the captured
    passphrases, which supersedes it.  Either way the captured passphrases then leave the
    cache.  Nothing captured any more: the chain stays, and the journal says what the boots
    will do.
    """
    names = tuple(t.name for t in chain.volumes)
    words = _COMING_WORDS.get(coming, coming)
    want = channel_for(coming, conf, host)
    if chain.reboot == want:
        consumed, kept = _consume(cache, chain.volumes, want)
        return ScheduleReport("left-alone", f"{words} is coming and the handoff armed "
                              f"automatically in this boot ({chain.channel}) carries over it: "
                              f"left as it is; {kept}", link, names,
                              extra={"armed_automatically": True, "consumed": consumed})
    captured = {e.volume for e in cache.entries()}
    refusal = _disabled(conf, link)
    if refusal is not None or any(t.uuid not in captured for t in chain.volumes):
        why = ("the configuration does not allow arming it again" if refusal is not None
               else "the passphrase is no longer captured to arm it again")
        return ScheduleReport("left-alone", f"{words} is coming, which the handoff armed "
                              f"automatically in this boot ({chain.channel}) does not carry "
                              f"over, and {why}: left as it is; the boots it does not reach "
                              "will ask as usual", link, names,
                              extra={"armed_automatically": True})
    return _arm(host, conf, link, cache, lock_wait, coming, want)


def _consume(cache: PassphraseCache, targets: Sequence[Target],
             reboot: Reboot) -> tuple[int, str]:
    """Take the captured passphrases of ``targets`` out of the cache: a record carries them.

    Not for ``soft``: the keyring channel keeps the passphrases as they are, the same keys
    under the chain's deadline (:mod:`keyhandoff.channels.keyring`).  How many, and in words.
    """
    if channels.for_reboot(reboot).keeps_keyring:
        return 0, ("the passphrase stays in the kernel keyring, under the chain's deadline, "
                   "for the soft reboot")
    return (sum(cache.forget(t.uuid) for t in targets),
            "the captured passphrase was taken out of the cache")


def _cancelled(chain: Chain | None, boot: str, host: Host, lock_wait: float) -> ScheduleReport:
    if chain is None or chain.auto_boot != boot:
        detail = "no offline update is scheduled"
        if chain is not None:
            detail += "; the armed handoff was not armed automatically in this boot: left alone"
        return ScheduleReport("not-scheduled", detail)
    names = tuple(t.name for t in chain.volumes)
    counts = update.disarm(quiet=True, volumes=chain.paths(), lock_wait=lock_wait, host=host)
    return ScheduleReport("disarmed", "the scheduled offline update was cancelled: the handoff "
                          f"armed automatically in this boot is disarmed ({counts['keyslots']} "
                          "one-time keyslot(s) destroyed); the next boot asks as usual",
                          None, names, extra={"counts": counts})


def _arm(host: Host, conf: config_mod.Config, link: str, cache: PassphraseCache,
         lock_wait: float, coming: str | None, reboot: Reboot | None = None) -> ScheduleReport:
    """Arm through ``reboot`` (:func:`channel_for` when the caller has not chosen already)."""
    try:
        chosen = update.targets(host=host)
    except (KeyhandoffError, OSError) as exc:
        return ScheduleReport("refused", f"an offline update is scheduled ({link}); the "
                              f"volumes could not be read: {exc}", link, ok=False)
    if not chosen:
        return ScheduleReport("no-volumes", f"an offline update is scheduled ({link}); no "
                              "prompting volume in crypttab: nothing to arm", link)
    captured = {e.volume for e in cache.entries()}
    missing = tuple(t.name for t in chosen if t.uuid not in captured)
    names = tuple(t.name for t in chosen)
    if missing:
        return ScheduleReport("nothing-captured", f"an offline update is scheduled ({link}), "
                              "but no passphrase is captured for "
                              f"{', '.join(missing)} (never typed at this boot, or its "
                              "capture expired): nothing is armed, the update's boots will "
                              "ask for the passphrase as usual", link, missing)
    ttl = max(60, min(conf.capture_timeout, int(update.MAX_TTL.total_seconds())))
    reboot = reboot or channel_for(coming, conf, host)
    try:
        report = update.arm(reboot=reboot, boots=BOOTS, ttl=timedelta(seconds=ttl),
                            login=conf.login_enabled, ask=None, lock_wait=lock_wait,
                            host=host, automatic=True)
    except ChannelUnavailable as exc:
        return ScheduleReport("unavailable", f"an offline update is scheduled ({link}); the "
                              f"{reboot}-reboot channel is unavailable here ({exc}): the boots "
                              "will ask as usual", link, names)
    except ArmRefused as exc:
        return ScheduleReport("refused", f"an offline update is scheduled ({link}); arming "
                              f"was refused: {exc}; the boots will ask as usual", link, names,
                              ok=False)
    if coming is not None:
        consumed, kept = _consume(cache, chosen, reboot)
        kept = f"{_COMING_WORDS.get(coming, coming)} is coming; {kept}"
    else:  # a soft reboot, known only at the shutdown, would need it
        consumed = 0
        kept = ("the captured passphrase stays in the cache under its own timeout until the "
                "shutdown says which reboot is coming")
    return ScheduleReport("armed", f"an offline update is scheduled ({link}): armed "
                          f"{len(chosen)} volume(s) for the update boot and the boot after "
                          f"it via {report.channel}, until {_when(report.deadline)}; {kept}",
                          link, names,
                          extra={"channel": report.channel, "boots": BOOTS,
                                 "deadline": report.deadline, "consumed": consumed})


def _when(unix: int) -> str:
    return timefmt.timestamp(unix)


_EVENTS: Final = {"nothing-captured": (Event.NOTHING_CAPTURED, journal.NOTICE),
                  "disarmed": (Event.SCHEDULE_CANCELLED, journal.NOTICE),
                  "refused": (Event.SCHEDULE, journal.WARNING),
                  "busy": (Event.SCHEDULE, journal.WARNING)}


def _told(report: ScheduleReport, host: Host, *, kept: bool = False) -> ScheduleReport:
    """Journal the outcome (an arming also has the arm's own ``ARMED`` entry)."""
    event, priority = _EVENTS.get(report.action, (Event.SCHEDULE, journal.INFO))
    journal.log(event, report.detail, priority=priority, action=report.action,
                volumes=" ".join(report.volumes))
    if not kept and report.action != "busy":
        with contextlib.suppress(KeyhandoffError, OSError), statelock.held("schedule", wait=0):
            _keep(report, host)
    return report


def _path() -> str:
    return os.path.join(statelock.LOCK_DIR, REPORT_NAME)


def _keep(report: ScheduleReport, host: Host) -> None:
    """Store the outcome with this boot's id and the time (under the state lock)."""
    data = {"boot": host.boot_id(), "at": host.now(), **report.as_dict()}
    path = _path()
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def last_report(*, host: Host = THIS_HOST) -> dict[str, Any] | None:
    """The last outcome of :func:`reconcile` in this boot, or ``None``."""
    try:
        with open(_path(), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("boot") != host.boot_id():
        return None
    return data


def status(*, host: Host = THIS_HOST, config: config_mod.Config | None = None) -> dict[str, Any]:
    """For ``keyhandoff status``: scheduled or not, the policy, armed automatically or not.

    A bad setting is left out here too (``keyhandoff config`` names it): status still shows,
    with the policy the boot steps use, which on any error has capture and automatic arming
    off (``config_error_detail`` says why, :meth:`keyhandoff.config.Loaded.for_boot`).
    """
    conf = config if config is not None else config_mod.read().for_boot()
    chain = chain_mod.load(PassphraseCache())
    last = last_report(host=host)
    out: dict[str, Any] = {
        "update_scheduled": host.scheduled_update(),
        "auto_arm": conf.auto_arm,
        "capture_timeout": conf.capture_timeout,
        "armed": chain is not None,
        "armed_automatically": chain is not None and bool(chain.auto_boot),
        "last_action": None if last is None else last.get("action"),
        "last_detail": None if last is None else last.get("detail"),
        "config_error_detail": conf.config_error,
    }
    if chain is not None and chain.auto_boot:
        out["armed_automatically_in_this_boot"] = chain.auto_boot == host.boot_id()
    return out
