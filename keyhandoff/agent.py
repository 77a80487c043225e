"""The keyhandoff agent: one event loop that answers and learns systemd's disk prompts.

It watches the ask-password directory with inotify, and for each systemd-cryptsetup prompt
(``Id=cryptsetup:<source>``):

* **answers** it when the cache holds a verified passphrase for exactly that volume (the
  UUID read from the source's LUKS header), at most once per prompt; a retry prompt
  (``AcceptCached=0``) for a volume we answered means our answer was wrong: the entry is
  dropped and the person types;
* otherwise, when the prompt goes away answered by someone else, **captures** what the
  person typed: the newest entry systemd added to its ``cryptsetup`` key since the prompt
  appeared is attributed to that volume, verified once against the header (off the loop,
  in the single worker thread) and cached with the configured ``retain`` timeout.

Verification and PIN prompts (``cryptsetup-verification:``, no ``Id=``) and anything else
are never answered.  The loop multiplexes inotify, the udev monitor (when udevd runs),
signals and the worker's completions in one ``selectors`` loop; idle, it sleeps without a
timeout.  The protocol lives in :mod:`keyhandoff.askpass`; this module is the wiring.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyhandoff import askpass, journal
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.errors import KeyExpired, KeyhandoffError, KeyNotFound, KeyRevoked
from keyhandoff.journal import Event

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from keyhandoff.config import Config
    from keyhandoff.secret import Secret

__all__ = ["Agent"]


@dataclass
class _Prompt:
    """What the agent knows of one ask file."""

    name: str
    request: askpass.AskRequest
    source: str | None = None
    volume: str | None = None
    answered: bool = False
    #: how many entries systemd's cache had when the prompt appeared (for capture)
    cache_entries: int = 0
    #: when the querier wrote the ask file (its mtime, CLOCK_REALTIME ns)
    seen_ns: int = 0


@dataclass
class _Stats:
    answered: int = 0
    captured: int = 0
    refused: int = 0
    dropped: int = 0
    pending: dict[str, _Prompt] = field(default_factory=dict)


def _verify(source: str, volume: str, secret: Secret) -> bool:
    """Check ``secret`` against the volume's header: one PBKDF, in the worker thread."""
    from keyhandoff.luks import LuksHeader, WrongPassphrase  # noqa: PLC0415  # lazy import

    try:
        with LuksHeader.open(source) as header:
            if header.uuid != volume:
                return False  # the device changed under us: attribute nothing
            header.verify(secret)
    except WrongPassphrase:
        return False
    return True


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
        #: volumes we answered, with the serial of the cache key we answered from
        self._answered: dict[str, int] = {}
        self._selector = selectors.DefaultSelector()
        self._worker: ThreadPoolExecutor | None = None
        self._futures: list[tuple[Future[bool], _Prompt, Secret]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._inotify: Any = None
        self._last_status = ""
        self._monitor: Any = None

    # --- set-up -----------------------------------------------------------------------

    def _setup(self) -> None:
        from keyhandoff import process  # noqa: PLC0415  # lazy: compiled module

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
            from keyhandoff.volumes import UdevUnavailable, monitor  # noqa: PLC0415

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
        self._rescan()
        self._notify("READY=1")
        from keyhandoff import process  # noqa: PLC0415

        journal.log(Event.STARTED, "keyhandoff agent serving " + self.ask_dir,
                    ask_dir=self.ask_dir, udev=int(self._monitor is not None),
                    dumpable=int(process.is_dumpable()))
        try:
            while not self._stopping:
                for key, _mask in self._selector.select(timeout=None):
                    key.data()
                if self._stopping:
                    break
        finally:
            self._notify("STOPPING=1")
            journal.log(Event.STOPPING, "keyhandoff agent stopping")
            self._teardown()
        return 0

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
        for _fut, _prompt, secret in self._futures:
            secret.wipe()
        self._futures.clear()
        self._selector.close()
        if self._inotify is not None:
            self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _notify(self, state: str | None = None) -> None:
        """Tell systemd our state; a STATUS line only when the counts changed."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        s = self.stats
        status = (f"STATUS=answered {s.answered}, captured {s.captured}, "
                  f"refused {s.refused}, dropped {s.dropped}, waiting {len(s.pending)}")
        if state is None and status == self._last_status:
            return
        self._last_status = status
        from systemd import daemon  # noqa: PLC0415  # lazy: start-up time

        with contextlib.suppress(OSError):  # a status line is never worth dying for
            daemon.notify(f"{state}\n{status}" if state else status)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        done = [item for item in self._futures if item[0].done()]
        for item in done:
            self._futures.remove(item)
            self._finish_capture(*item)
        if not self._stopping:
            self._rescan()  # SIGHUP, or a completion that may let a waiting prompt through

    def _on_udev(self) -> None:
        while self._monitor.poll(timeout=0) is not None:
            pass
        self._reconsider()

    def _on_inotify(self) -> None:
        from keyhandoff import process  # noqa: PLC0415

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
                self._gone(ev.name)
            elif ev.mask & (process.IN_MOVED_TO | process.IN_CLOSE_WRITE):
                self._appeared(ev.name)
        self._notify()

    # --- prompts ----------------------------------------------------------------------

    def _rescan(self) -> None:
        try:
            names = set(askpass.list_ask_files(self.ask_dir))
        except OSError:
            return
        for name in list(self.stats.pending):
            if name not in names:
                self._gone(name)
        for name in sorted(names):
            if name not in self.stats.pending:
                self._appeared(name)

    def _reconsider(self) -> None:
        for prompt in list(self.stats.pending.values()):
            if not prompt.answered:
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
        prompt.cache_entries = self._systemd_entries()
        self.stats.pending[name] = prompt
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
        prompt.source = kind.source
        try:
            from keyhandoff.volumes import resolve_source  # noqa: PLC0415

            prompt.volume = resolve_source(kind.source)
        except (KeyhandoffError, OSError) as exc:
            journal.log(Event.IGNORED, f"prompt {name}: source is not a LUKS volume we know",
                        ask_file=name, source=kind.source, reason=str(exc))
            prompt.answered = True
            return
        self._consider(prompt)

    def _systemd_entries(self) -> int:
        entries = self.systemd_cache.read()
        for e in entries:
            e.wipe()
        return len(entries)

    def _consider(self, prompt: _Prompt) -> None:
        volume = prompt.volume
        if volume is None or prompt.answered:
            return
        try:
            serial, secret = self.cache.get_entry(volume)
        except (KeyNotFound, KeyRevoked):
            return  # nothing held for this volume: the person types; we may capture it
        except KeyExpired:
            journal.log(Event.EXPIRED, f"cached passphrase for {volume} expired",
                        volume=volume, ask_file=prompt.name)
            return
        if not prompt.request.accept_cached and self._answered.get(volume) == serial:
            # systemd-cryptsetup asks again after our answer: it was wrong for this volume.
            secret.wipe()
            self.cache.forget(volume)
            del self._answered[volume]
            self.stats.dropped += 1
            journal.log(Event.DROPPED, f"volume {volume} rejected our passphrase; dropped it",
                        priority=journal.WARNING, volume=volume, ask_file=prompt.name)
            return
        try:
            with secret, askpass.reply_datagram(secret) as datagram:
                askpass.send_reply(self.ask_dir, prompt.name, prompt.request, datagram)
        except (KeyhandoffError, OSError) as exc:
            self.stats.refused += 1
            prompt.answered = True
            journal.log(Event.REFUSED, f"did not answer {prompt.name}: {exc}",
                        priority=journal.WARNING, ask_file=prompt.name, volume=volume,
                        reason=str(exc))
            return
        prompt.answered = True
        self._answered[volume] = serial
        self.stats.answered += 1
        journal.log(Event.ANSWERED, f"answered the prompt for volume {volume}",
                    volume=volume, ask_file=prompt.name,
                    latency_us=(time.time_ns() - prompt.seen_ns) // 1000)

    def _gone(self, name: str) -> None:
        prompt = self.stats.pending.pop(name, None)
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
        if self._worker is None:
            # the only thread, made on the first capture: an idle agent has none
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        future = self._worker.submit(_verify, prompt.source, prompt.volume, candidate)
        future.add_done_callback(self._wake_loop)
        self._futures.append((future, prompt, candidate))

    def _wake_loop(self, _future: object) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"v")

    def _finish_capture(self, future: Future[bool], prompt: _Prompt, candidate: Secret) -> None:
        volume = prompt.volume
        assert volume is not None  # noqa: S101  # set for every prompt that reaches capture
        with candidate:
            try:
                ok = future.result()
            except (KeyhandoffError, OSError) as exc:
                journal.log(Event.NOT_CAPTURED, f"could not verify for {volume}: {exc}",
                            priority=journal.WARNING, volume=volume)
                return
            if not ok:
                journal.log(Event.NOT_CAPTURED,
                            f"what was typed for {volume} does not open it; not kept",
                            volume=volume)
                return
            self.cache.put(volume, candidate, timeout=self.config.retain)
        self._answered.pop(volume, None)
        self.stats.captured += 1
        journal.log(Event.CAPTURED, f"kept the passphrase for {volume} for "
                    f"{self.config.retain} s", volume=volume, retain=self.config.retain)
        self._notify()
