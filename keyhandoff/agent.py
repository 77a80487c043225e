"""The keyhandoff agent: one event loop that answers and learns systemd's disk prompts.

It watches the ask-password directory with inotify; what it does with each
systemd-cryptsetup prompt (answer it from the cache, preferring the volume's one-time key;
check the entry after a retry; capture what the person typed) is
:class:`keyhandoff.responder.Responder`, and what it keeps between events is
:mod:`keyhandoff.agent_state`.

Checks (one PBKDF each) run in a short-lived hardened child (:mod:`keyhandoff.verifier`),
one at a time, so libcryptsetup never enters the agent's address space.  Verification and
PIN prompts (``cryptsetup-verification:``, no ``Id=``) and anything else are never
answered.  The loop multiplexes inotify, the udev monitor (when udevd runs), signals, the
verifier's pidfd and the notify socket in one ``selectors`` loop; idle, it sleeps without
a timeout.  No event handler can end the agent: whatever a prompt, header or cache entry
holds, the prompt is refused and logged, and the loop goes on.  The protocol lives in
:mod:`keyhandoff.askpass` and :mod:`keyhandoff.reply`; this module is the wiring.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from typing import TYPE_CHECKING, Any

from keyhandoff import askpass, journal, process, verifier
from keyhandoff.agent_state import Stage, State
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.errors import KeyhandoffError
from keyhandoff.journal import Event
from keyhandoff.responder import Responder, loggable_reason
from keyhandoff.verifier import Verdict
from keyhandoff.volumes import UdevUnavailable, monitor

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyhandoff.agent_state import Check
    from keyhandoff.config import Config

__all__ = ["Agent"]


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
        self.state = State()
        self.responder = Responder(
            self.state, ask_dir=self.ask_dir, retain=config.capture_timeout, cache=self.cache,
            systemd_cache=self.systemd_cache, queue=self._queue, notify=self._notify,
        )
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
            self._notifier.final("STOPPING=1", self.state.status_line())
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
                            reason=loggable_reason(exc))

    def _timeout(self) -> float | None:
        """Sleep without a timeout unless a verifier child has a deadline."""
        running = self.state.running
        if running is None or running.child is None:
            return None
        return max(0.0, running.child.deadline - time.monotonic())

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        running = self.state.running
        if running is not None and running.child is not None:
            running.child.kill()
            with contextlib.suppress(OSError):
                running.child.result()
        for check in self.state.drain_checks():
            check.secret.wipe()
        self._selector.close()
        if self._inotify is not None:
            self._inotify.close()
        self._notifier.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- sd_notify --------------------------------------------------------------------

    def _notify(self, state: str | None = None) -> None:
        """Tell systemd our state; a STATUS line only when the counts changed.  Never blocks."""
        if not self._notifier.enabled or (state is None and not self._last_status):
            return  # nothing before READY=1 (which carries the first status line)
        status = self.state.status_line()
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
                self._per_prompt(ev.name, self.responder.gone)
            elif ev.mask & (process.IN_MOVED_TO | process.IN_CLOSE_WRITE):
                self._per_prompt(ev.name, self.responder.appeared)
        self._notify()

    def _per_prompt(self, name: str, handler: Callable[[str], None]) -> None:
        """Handle one ask file; a failure refuses that prompt only."""
        try:
            handler(name)
        except Exception as exc:  # noqa: BLE001  # one bad prompt must not end the agent
            prompt = self.state.prompts.get(name)
            if prompt is not None:
                prompt.stage = Stage.IGNORED  # never looked at again
            self.state.counts.refused += 1
            journal.log(Event.REFUSED, f"refused ask file {name}: {loggable_reason(exc)}",
                        priority=journal.WARNING, ask_file=name, reason=loggable_reason(exc))

    # --- prompts ----------------------------------------------------------------------

    def _rescan(self) -> None:
        try:
            names = set(askpass.list_ask_files(self.ask_dir))
        except OSError:
            return
        for name in list(self.state.prompts):
            if name not in names:
                self._per_prompt(name, self.responder.gone)
        for name in sorted(names):
            if name not in self.state.prompts:
                self._per_prompt(name, self.responder.appeared)
        self._notify()

    def _reconsider(self) -> None:
        """A cache changed or a check ended: the prompts waiting for a key may be answered."""
        for prompt in self.state.pending():
            self._per_prompt(prompt.name, self._consider_pending)
        self._notify()

    def _consider_pending(self, name: str) -> None:
        prompt = self.state.prompts.get(name)
        if prompt is not None:
            self.responder.consider(prompt)

    # --- checks in a verifier child ---------------------------------------------------

    def _queue(self, check: Check) -> None:
        self.state.queued.append(check)
        self._start_next_check()

    def _start_next_check(self) -> None:

        while (check := self.state.next_check()) is not None:
            try:
                check.child = verifier.start(check.source, check.volume, check.secret)
            except (KeyhandoffError, OSError, ValueError) as exc:
                self.responder.finished(check, verifier.Verdict.FAILED,
                                        reason=loggable_reason(exc))
                continue
            self.state.running = check
            self._selector.register(check.child.fileno(), selectors.EVENT_READ,
                                    self._on_check_done)

    def _check_deadline(self) -> None:
        running = self.state.running
        if running is not None and running.child is not None and (
            time.monotonic() >= running.child.deadline
        ):
            running.child.kill()  # its pidfd turns readable: reaped as FAILED

    def _on_check_done(self) -> None:

        check, self.state.running = self.state.running, None
        if check is None or check.child is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(check.child.fileno())
        try:
            try:
                verdict, reason = check.child.result(), ""
            except OSError as exc:
                verdict, reason = Verdict.FAILED, loggable_reason(exc)
            self.responder.finished(check, verdict, reason=reason,
                                    maxrss_kib=check.child.maxrss_kib)
        finally:
            check.secret.wipe()
            if check.kind == "retry":
                self.state.checking.discard(check.volume)
            self._start_next_check()  # a failure above must not stall the queue
            self._reconsider()  # a prompt may have waited for this check
