"""The keyhandoff agent: one event loop that answers and learns systemd's disk prompts.

It watches the ask-password directory with inotify, and for each systemd-cryptsetup prompt
(``Id=cryptsetup:<source>``):

* **identifies** the volume by the LUKS header at the prompt's own source path (which must
  exist and be a block device or an image file): a ``UUID=`` source, or a
  ``/dev/disk/by-uuid/`` link that is not there, proves nothing and is never answered;
* **answers** it when the cache holds a passphrase for exactly that volume and the prompt
  accepts cached passwords (``AcceptCached=1``: systemd-cryptsetup's first try for a
  volume; its retries, and prompts that ask for a fresh passphrase, say 0), at most once
  per querier and volume;
* when the same querier asks again for that volume after our answer (a retry: our answer
  did not open it, or something else failed), it does not answer, and **checks** the
  cached entry against the header: dropped only if it does not open the volume.  An
  ``AcceptCached=0`` prompt that is not such a retry leaves the entry alone;
* otherwise, when the prompt goes away answered by someone else, **captures** what the
  person typed: the newest entry systemd added to its ``cryptsetup`` key since the prompt
  appeared is attributed to that volume, verified once against the header and cached
  with the configured ``retain`` timeout.

Checks (one PBKDF each) run in a short-lived hardened child (:mod:`keyhandoff.verifier`),
one at a time, so libcryptsetup never enters the agent's address space.  Verification and
PIN prompts (``cryptsetup-verification:``, no ``Id=``) and anything else are never
answered.  The loop multiplexes inotify, the udev monitor (when udevd runs), signals, the
verifier's pidfd and the notify socket in one ``selectors`` loop; idle, it sleeps without
a timeout.  No event handler can end the agent: whatever a prompt, header or cache entry
holds, the prompt is refused and logged, and the loop goes on.  The protocol lives in
:mod:`keyhandoff.askpass`; this module is the wiring.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from keyhandoff import askpass, journal, process, reply, verifier
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.errors import KeyExpired, KeyhandoffError, KeyNotFound, KeyRevoked, KeyUnavailable
from keyhandoff.journal import Event
from keyhandoff.verifier import Verdict
from keyhandoff.volumes import UdevUnavailable, monitor, prompt_volume

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyhandoff.config import Config
    from keyhandoff.secret import Secret
    from keyhandoff.verifier import Verification

__all__ = ["Agent"]


@dataclass
class _Prompt:
    """What the agent knows of one ask file."""

    name: str
    request: askpass.AskRequest
    source: str | None = None
    volume: str | None = None
    #: answered by us, or never to be answered nor captured
    answered: bool = False
    #: never answered by us (AcceptCached=0, a retry); what the person types may be captured
    passive: bool = False
    #: how many entries systemd's cache had when the prompt appeared (for capture)
    cache_entries: int = 0
    #: when the querier wrote the ask file (its mtime, CLOCK_REALTIME ns)
    seen_ns: int = 0


@dataclass
class _Check:
    """One passphrase to check against a header, queued or running in a verifier child."""

    kind: Literal["capture", "retry"]
    source: str
    volume: str
    secret: Secret
    #: for a retry check: the serial of the cache entry under test
    serial: int = 0
    running: Verification | None = None


@dataclass
class _Stats:
    answered: int = 0
    captured: int = 0
    refused: int = 0
    dropped: int = 0
    pending: dict[str, _Prompt] = field(default_factory=dict)


def _reason(exc: BaseException) -> str:
    """What may be logged of an exception: our errors' texts name no secret; others by type."""
    if isinstance(exc, KeyhandoffError | OSError):
        return str(exc)
    return type(exc).__name__


class Agent:
    """The daemon.  ``run()`` blocks until SIGTERM/SIGINT (or :meth:`stop`)."""

    def __init__(
        self,
        config: Config,
        *,
        cache: PassphraseCache | None = None,
        systemd_cache: SystemdCache | None = None,
    ) -> None:

        self.config = config
        self.ask_dir = config.ask_dir
        self.cache = cache or PassphraseCache()
        self.systemd_cache = systemd_cache or SystemdCache(
            keyname=config.systemd_keyname, ask_dir=config.ask_dir,
        )
        self.stats = _Stats()
        #: (volume, querier PID) we answered, with the serial of the entry we answered from
        self._answered: dict[tuple[str, int], int] = {}
        #: of those, the ones that asked again (their entry was checked)
        self._retried: set[tuple[str, int]] = set()
        #: volumes whose entry is being checked after a retry: not answered meanwhile
        self._checking: set[str] = set()
        self._checks: collections.deque[_Check] = collections.deque()
        self._running: _Check | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._inotify: Any = None
        self._last_status = ""
        self._monitor: Any = None
        self._notifier = process.Notifier()
        #: (descriptor, connection) registered for EVENT_WRITE; (-1, 0) for none
        self._notify_fd = (-1, 0)
        self._notify_drop_logged = False

    # --- set-up -----------------------------------------------------------------------

    def _setup(self) -> None:

        os.makedirs(self.ask_dir, mode=0o755, exist_ok=True)
        self._inotify = process.Inotify()
        self._inotify.watch(
            self.ask_dir,
            process.IN_CLOSE_WRITE | process.IN_MOVED_TO | process.IN_MOVED_FROM
            | process.IN_DELETE | process.IN_ATTRIB,
        )
        self._selector.register(self._inotify.fileno(), selectors.EVENT_READ, self._on_inotify)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: None)  # wakes the loop: rescan
        try:

            self._monitor = monitor()
            self._monitor.start()
            self._selector.register(self._monitor.fileno(), selectors.EVENT_READ, self._on_udev)
        except (ImportError, UdevUnavailable, OSError):
            self._monitor = None  # no udevd (containers): prompts still name their devices

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def stop(self) -> None:
        """Ask the loop to end (thread-safe: wakes it through the pipe)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve prompts until stopped; return the exit status."""
        self._setup()
        self._guarded(self._rescan)
        self._notify("READY=1")

        journal.log(Event.STARTED, "keyhandoff agent serving " + self.ask_dir,
                    ask_dir=self.ask_dir, udev=int(self._monitor is not None),
                    dumpable=int(process.is_dumpable()))
        try:
            while not self._stopping:
                for key, _mask in self._selector.select(timeout=self._timeout()):
                    self._guarded(key.data)
                    if self._stopping:
                        break
                self._guarded(self._check_deadline)
                self._sync_notify()
        finally:
            self._notifier.final("STOPPING=1", self._status_line())
            journal.log(Event.STOPPING, "keyhandoff agent stopping",
                        notify_dropped=self._notifier.dropped)
            self._teardown()
        return 0

    def _guarded(self, handler: Callable[[], None]) -> None:
        """Run one event handler; whatever it raises is logged, and the loop goes on."""
        try:
            handler()
        except Exception as exc:  # noqa: BLE001  # bad data must never end the agent
            with contextlib.suppress(Exception):  # not even when logging it fails
                journal.log(Event.ERROR, "an event handler failed; the agent goes on",
                            priority=journal.ERR, handler=getattr(handler, "__name__", "?"),
                            reason=_reason(exc))

    def _timeout(self) -> float | None:
        """Sleep without a timeout unless a verifier child has a deadline."""
        if self._running is None or self._running.running is None:
            return None
        return max(0.0, self._running.running.deadline - time.monotonic())

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        running, self._running = self._running, None
        if running is not None and running.running is not None:
            running.running.kill()
            with contextlib.suppress(OSError):
                running.running.result()
        for check in [*self._checks, *([running] if running else [])]:
            check.secret.wipe()
        self._checks.clear()
        self._selector.close()
        if self._inotify is not None:
            self._inotify.close()
        self._notifier.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- sd_notify --------------------------------------------------------------------

    def _status_line(self) -> str:
        s = self.stats
        return (f"answered {s.answered}, captured {s.captured}, refused {s.refused}, "
                f"dropped {s.dropped}, waiting {len(s.pending)}")

    def _notify(self, state: str | None = None) -> None:
        """Tell systemd our state; a STATUS line only when the counts changed.  Never blocks."""
        if not self._notifier.enabled or (state is None and not self._last_status):
            return  # nothing before READY=1 (which carries the first status line)
        status = self._status_line()
        if state is None and status == self._last_status:
            return
        self._last_status = status
        self._notifier.notify(state=state, status=status)
        self._sync_notify()

    def _sync_notify(self) -> None:
        """Wait for the notify socket to become writable only while something is queued."""
        fd = self._notifier.fileno() if self._notifier.wants_write else -1
        wanted = (fd, self._notifier.connections if fd >= 0 else 0)
        if wanted != self._notify_fd:
            if self._notify_fd[0] >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(self._notify_fd[0])
            if fd >= 0:
                self._selector.register(fd, selectors.EVENT_WRITE, self._on_notify_writable)
            self._notify_fd = wanted
        if self._notifier.dropped and not self._notify_drop_logged:
            self._notify_drop_logged = True  # once: a stuck reader must not flood the journal
            journal.log(Event.NOTIFY_DROPPED,
                        "the service manager does not read our status lines; they are "
                        "coalesced or dropped, prompts are still answered",
                        priority=journal.WARNING)

    def _on_notify_writable(self) -> None:
        self._notifier.flush()

    # --- events -----------------------------------------------------------------------

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        if not self._stopping:
            self._rescan()  # SIGHUP

    def _on_udev(self) -> None:
        while self._monitor.poll(timeout=0) is not None:
            pass
        self._reconsider()

    def _on_inotify(self) -> None:

        for ev in self._inotify.read():
            if ev.mask & process.IN_Q_OVERFLOW:
                self._rescan()
            elif not ev.name:
                # IN_ATTRIB on the directory: someone (systemd, keyhandoff restore) added
                # to a cache and touched it, so prompts we could not answer may be answerable
                self._reconsider()
            elif not ev.name.startswith("ask."):
                continue
            elif ev.mask & (process.IN_DELETE | process.IN_MOVED_FROM):
                self._per_prompt(ev.name, self._gone)
            elif ev.mask & (process.IN_MOVED_TO | process.IN_CLOSE_WRITE):
                self._per_prompt(ev.name, self._appeared)
        self._notify()

    def _per_prompt(self, name: str, handler: Callable[[str], None]) -> None:
        """Handle one ask file; a failure refuses that prompt only."""
        try:
            handler(name)
        except Exception as exc:  # noqa: BLE001  # one bad prompt must not end the agent
            prompt = self.stats.pending.get(name)
            if prompt is not None:
                prompt.answered = True  # never looked at again
            self.stats.refused += 1
            journal.log(Event.REFUSED, f"refused ask file {name}: {_reason(exc)}",
                        priority=journal.WARNING, ask_file=name, reason=_reason(exc))

    # --- prompts ----------------------------------------------------------------------

    def _rescan(self) -> None:
        try:
            names = set(askpass.list_ask_files(self.ask_dir))
        except OSError:
            return
        for name in list(self.stats.pending):
            if name not in names:
                self._per_prompt(name, self._gone)
        for name in sorted(names):
            if name not in self.stats.pending:
                self._per_prompt(name, self._appeared)
        self._notify()

    def _reconsider(self) -> None:
        for prompt in list(self.stats.pending.values()):
            if not (prompt.answered or prompt.passive):
                self._per_prompt(prompt.name, self._consider_pending)
        self._notify()

    def _consider_pending(self, name: str) -> None:
        prompt = self.stats.pending.get(name)
        if prompt is not None:
            self._consider(prompt)

    def _appeared(self, name: str) -> None:
        if name in self.stats.pending:
            return
        try:
            request = askpass.read_ask_file(self.ask_dir, name)
        except FileNotFoundError:
            return
        except (KeyhandoffError, OSError) as exc:
            self.stats.refused += 1
            journal.log(Event.REFUSED, f"refused ask file {name}: {exc}",
                        priority=journal.WARNING, ask_file=name, reason=str(exc))
            return
        prompt = _Prompt(name, request)
        try:
            prompt.seen_ns = os.stat(os.path.join(self.ask_dir, name)).st_mtime_ns
        except OSError:
            prompt.seen_ns = time.time_ns()
        self.stats.pending[name] = prompt
        prompt.cache_entries = self._systemd_entries()
        try:
            kind = askpass.classify_id(request.id)
        except KeyhandoffError as exc:
            self.stats.refused += 1
            prompt.answered = True
            journal.log(Event.REFUSED, f"refused ask file {name}: {exc}",
                        priority=journal.WARNING, ask_file=name, reason=str(exc))
            return
        if not isinstance(kind, askpass.CryptsetupPrompt):
            journal.log(Event.IGNORED, f"not a disk passphrase prompt: {name}",
                        ask_file=name, kind=type(kind).__name__)
            prompt.answered = True  # never answered, never captured
            return
        try:

            # The header at the prompt's own source is the volume's identity: a name
            # (UUID=, a by-uuid link that is not there) proves nothing.
            prompt.volume = prompt_volume(kind.source)
        except (KeyhandoffError, OSError, ValueError) as exc:
            journal.log(Event.IGNORED, f"prompt {name}: its source is not a LUKS volume "
                        "whose header says which one it is", ask_file=name,
                        source=kind.source, reason=_reason(exc))
            prompt.answered = True
            return
        prompt.source = kind.source
        self._consider(prompt)

    def _systemd_entries(self) -> int:
        entries = self.systemd_cache.read()
        for e in entries:
            e.wipe()
        return len(entries)

    def _consider(self, prompt: _Prompt) -> None:
        volume = prompt.volume
        if volume is None or prompt.answered or prompt.passive:
            return
        querier = (volume, prompt.request.pid)
        if querier in self._answered or not prompt.request.accept_cached:
            # Never answered: systemd-cryptsetup's retries (and prompts that want a fresh
            # passphrase) do not accept cached passwords, and one querier never gets our
            # passphrase twice.  What the person types may still be captured.
            prompt.passive = True
            if querier in self._answered and querier not in self._retried:
                self._retried.add(querier)  # its entry is checked once
                self._retry_after_answer(prompt, volume, self._answered[querier])
            else:
                journal.log(Event.IGNORED, f"prompt {prompt.name} for {volume} does not "
                            "accept cached passwords: left to the person",
                            ask_file=prompt.name, volume=volume)
            return
        if volume in self._checking:
            return  # its entry is being checked after a retry: answer once we know
        try:
            serial, secret = self.cache.get_entry(volume)
        except (KeyNotFound, KeyRevoked):
            return  # nothing held for this volume: the person types; we may capture it
        except KeyExpired:
            journal.log(Event.EXPIRED, f"cached passphrase for {volume} expired",
                        volume=volume, ask_file=prompt.name)
            return
        try:
            with secret, reply.reply_datagram(secret) as datagram:
                reply.send_reply(self.ask_dir, prompt.name, prompt.request, datagram)
        except (KeyhandoffError, OSError) as exc:
            self.stats.refused += 1
            prompt.answered = True
            journal.log(Event.REFUSED, f"did not answer {prompt.name}: {exc}",
                        priority=journal.WARNING, ask_file=prompt.name, volume=volume,
                        reason=str(exc))
            return
        prompt.answered = True
        self._answered[querier] = serial
        self.stats.answered += 1
        journal.log(Event.ANSWERED, f"answered the prompt for volume {volume}",
                    volume=volume, ask_file=prompt.name,
                    latency_us=(time.time_ns() - prompt.seen_ns) // 1000)

    def _retry_after_answer(self, prompt: _Prompt, volume: str, answered_serial: int) -> None:
        """The querier we answered asks again: check the entry, never drop it on a guess."""
        assert prompt.source is not None  # noqa: S101  # set with prompt.volume
        try:
            serial, secret = self.cache.get_entry(volume)
        except KeyUnavailable:
            return  # nothing left to judge
        if serial != answered_serial:
            secret.wipe()  # replaced since our answer: the new entry was not tried yet
            return
        self._checking.add(volume)
        journal.log(Event.RETRY, f"volume {volume} asked again after our answer; not "
                    "answered, checking the cached passphrase", volume=volume,
                    ask_file=prompt.name)
        self._queue(_Check("retry", prompt.source, volume, secret, serial=serial))

    def _gone(self, name: str) -> None:
        prompt = self.stats.pending.pop(name, None)
        self._forget_dead_queriers()
        if prompt is None or prompt.answered or prompt.volume is None or prompt.source is None:
            return
        if self.config.retain <= 0:
            return
        entries = self.systemd_cache.read()
        try:
            if len(entries) <= prompt.cache_entries:
                return  # cancelled, timed out, or a duplicate of something already cached
            candidate = entries.pop()  # the newest: what was typed for this prompt
        finally:
            for e in entries:
                e.wipe()
        self._queue(_Check("capture", prompt.source, prompt.volume, candidate))

    def _forget_dead_queriers(self) -> None:
        for querier in list(self._answered):
            try:
                os.kill(querier[1], 0)
            except ProcessLookupError:
                del self._answered[querier]  # it cannot retry any more
                self._retried.discard(querier)
            except PermissionError:
                pass

    # --- checks in a verifier child ---------------------------------------------------

    def _queue(self, check: _Check) -> None:
        self._checks.append(check)
        self._start_next_check()

    def _start_next_check(self) -> None:

        while self._running is None and self._checks:
            check = self._checks.popleft()
            try:
                check.running = verifier.start(check.source, check.volume, check.secret)
            except (KeyhandoffError, OSError, ValueError) as exc:
                self._finish_check(check, verifier.Verdict.FAILED, reason=_reason(exc))
                continue
            self._running = check
            self._selector.register(check.running.fileno(), selectors.EVENT_READ,
                                    self._on_check_done)

    def _check_deadline(self) -> None:
        running = self._running
        if running is not None and running.running is not None and (
            time.monotonic() >= running.running.deadline
        ):
            running.running.kill()  # its pidfd turns readable: reaped as FAILED

    def _on_check_done(self) -> None:

        check, self._running = self._running, None
        if check is None or check.running is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(check.running.fileno())
        try:
            try:
                verdict, reason = check.running.result(), ""
            except OSError as exc:
                verdict, reason = Verdict.FAILED, _reason(exc)
            self._finish_check(check, verdict, reason=reason,
                               maxrss_kib=check.running.maxrss_kib)
        finally:
            check.secret.wipe()
            if check.kind == "retry":
                self._checking.discard(check.volume)
            self._start_next_check()  # a failure above must not stall the queue
            self._reconsider()  # a prompt may have waited for this check

    def _finish_check(
        self, check: _Check, verdict: int, *, reason: str = "", maxrss_kib: int = 0,
    ) -> None:

        volume = check.volume
        with check.secret:
            if check.kind == "retry":
                self._checking.discard(volume)
                self._finish_retry(check, Verdict(verdict), reason)
                return
            if verdict != Verdict.OPENS:
                why = {
                    Verdict.REFUSED: "does not open it",
                    Verdict.OTHER_VOLUME: "was typed for a device that no longer holds it",
                }.get(Verdict(verdict), "could not be checked")
                journal.log(Event.NOT_CAPTURED, f"what was typed for {volume} {why}; not kept",
                            priority=journal.INFO if verdict == Verdict.REFUSED
                            else journal.WARNING, volume=volume, reason=reason or why)
                return
            self.cache.put(volume, check.secret, timeout=self.config.retain)
        self.stats.captured += 1
        journal.log(Event.CAPTURED, f"kept the passphrase for {volume} for "
                    f"{self.config.retain} s", volume=volume, retain=self.config.retain,
                    verifier_maxrss_kib=maxrss_kib)
        self._notify()

    def _finish_retry(self, check: _Check, verdict: int, reason: str) -> None:

        volume = check.volume
        if verdict == Verdict.REFUSED:
            try:
                serial, current = self.cache.get_entry(volume)
            except KeyUnavailable:
                return  # gone already
            current.wipe()
            if serial != check.serial:
                return  # replaced while it was checked: the new one was not judged
            self.cache.forget(volume)
            self.stats.dropped += 1
            journal.log(Event.DROPPED, f"volume {volume} rejected our passphrase and it does "
                        "not open the volume; dropped it", priority=journal.WARNING,
                        volume=volume)
            self._notify()
            return
        why = {
            Verdict.OPENS: "it opens the volume",
            Verdict.OTHER_VOLUME: "the device no longer holds that volume",
        }.get(Verdict(verdict), "it could not be checked")
        journal.log(Event.KEPT, f"volume {volume} asked again after our answer, but {why}; "
                    "the cached passphrase is kept", volume=volume, reason=reason or why)
