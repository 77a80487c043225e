"""What the agent does with each disk prompt: answer it, check after a retry, capture.

For each systemd-cryptsetup prompt (``Id=cryptsetup:<source>``) the :class:`Responder`:

* **identifies** the volume by the LUKS header at the prompt's own source path (which must
  exist and be a block device or an image file): a ``UUID=`` source, or a
  ``/dev/disk/by-uuid/`` link that is not there, proves nothing and is never answered;
* **answers** it when the cache holds a key for exactly that volume and the prompt accepts
  cached passwords (``AcceptCached=1``: systemd-cryptsetup's first try for a volume; its
  retries, and prompts that ask for a fresh passphrase, say 0), at most once per querier
  and volume.  The key is the volume's **one-time key** when one was restored for it
  (``keyhandoff:onetime:<UUID>``), else its cached passphrase;
* when the same querier asks again for that volume after our answer (a retry: our answer
  did not open it, or something else failed), it does not answer, and **checks** the entry
  it answered from against the header: dropped only if it does not open the volume.  An
  ``AcceptCached=0`` prompt that is not such a retry leaves the entry alone;
* otherwise, when the prompt goes away answered by someone else, **captures** what the
  person typed: the newest entry systemd added to its ``cryptsetup`` key since the prompt
  appeared is attributed to that volume, verified once against the header and cached
  with the configured ``retain`` timeout.  The volume's one-time key is never captured:
  systemd-cryptsetup pushes what we answered into its key too, and a one-time key kept as
  "the passphrase" would outlive its keyslot's purpose.

Checks (one PBKDF each) are handed to the event loop (:mod:`keyhandoff.agent`), which runs
them in a verifier child and brings back the verdict to :meth:`Responder.finished`.  The
bookkeeping is :mod:`keyhandoff.agent_state`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from keyhandoff import askpass, journal, reply
from keyhandoff.agent_state import Answer, Check, Prompt, Stage
from keyhandoff.errors import KeyExpired, KeyhandoffError, KeyNotFound, KeyRevoked, KeyUnavailable
from keyhandoff.journal import Event
from keyhandoff.verifier import Verdict
from keyhandoff.volumes import prompt_volume

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyhandoff.agent_state import State
    from keyhandoff.cache import PassphraseCache, SystemdCache
    from keyhandoff.secret import Secret

__all__ = ["Responder", "loggable_reason"]


def loggable_reason(exc: BaseException) -> str:
    """What may be logged of an exception: our errors' texts name no secret; others by type."""
    if isinstance(exc, KeyhandoffError | OSError):
        return str(exc)
    return type(exc).__name__


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # EPERM: the process exists; we just may not signal it
    return True


class Responder:
    """The prompt handlers of the agent; ``queue`` runs a :class:`Check`, ``notify`` reports."""

    def __init__(
        self,
        state: State,
        *,
        ask_dir: str,
        retain: int,
        cache: PassphraseCache,
        systemd_cache: SystemdCache,
        queue: Callable[[Check], None],
        notify: Callable[[], None],
    ) -> None:
        self.state = state
        self.ask_dir = ask_dir
        self.retain = retain
        self.cache = cache
        self.systemd_cache = systemd_cache
        self._queue = queue
        self._notify = notify

    # --- a prompt appears -------------------------------------------------------------

    def appeared(self, name: str) -> None:
        """Read a new ask file, identify its volume and answer it if we can."""
        state = self.state
        if name in state.prompts:
            return
        try:
            request = askpass.read_ask_file(self.ask_dir, name)
        except FileNotFoundError:
            return
        except (KeyhandoffError, OSError) as exc:
            state.counts.refused += 1
            journal.log(Event.REFUSED, f"refused ask file {name}: {exc}",
                        priority=journal.WARNING, ask_file=name, reason=str(exc))
            return
        prompt = Prompt(name, request)
        try:
            prompt.seen_ns = os.stat(os.path.join(self.ask_dir, name)).st_mtime_ns
        except OSError:
            prompt.seen_ns = time.time_ns()
        state.prompts[name] = prompt
        prompt.systemd_entries = self._systemd_entries()
        try:
            kind = askpass.classify_id(request.id)
        except KeyhandoffError as exc:
            state.counts.refused += 1
            prompt.stage = Stage.IGNORED
            journal.log(Event.REFUSED, f"refused ask file {name}: {exc}",
                        priority=journal.WARNING, ask_file=name, reason=str(exc))
            return
        if not isinstance(kind, askpass.CryptsetupPrompt):
            journal.log(Event.IGNORED, f"not a disk passphrase prompt: {name}",
                        ask_file=name, kind=type(kind).__name__)
            prompt.stage = Stage.IGNORED  # never answered, never captured
            return
        try:
            # The header at the prompt's own source is the volume's identity: a name
            # (UUID=, a by-uuid link that is not there) proves nothing.
            prompt.volume = prompt_volume(kind.source)
        except (KeyhandoffError, OSError, ValueError) as exc:
            journal.log(Event.IGNORED, f"prompt {name}: its source is not a LUKS volume "
                        "whose header says which one it is", ask_file=name,
                        source=kind.source, reason=loggable_reason(exc))
            prompt.stage = Stage.IGNORED
            return
        prompt.source = kind.source
        self.consider(prompt)

    def _systemd_entries(self) -> int:
        entries = self.systemd_cache.read()
        for e in entries:
            e.wipe()
        return len(entries)

    # --- answering --------------------------------------------------------------------

    def consider(self, prompt: Prompt) -> None:
        """Answer ``prompt`` from the cache, leave it to the person, or check after a retry."""
        volume = prompt.volume
        if volume is None or not prompt.waiting_for_key:
            return
        querier = (volume, prompt.request.pid)
        if querier in self.state.answered or not prompt.request.accept_cached:
            # Never answered: systemd-cryptsetup's retries (and prompts that want a fresh
            # passphrase) do not accept cached passwords, and one querier never gets our
            # key twice.  What the person types may still be captured.
            prompt.stage = Stage.LEFT
            answer = self.state.first_retry(querier)
            if answer is not None:
                self._retry_after_answer(prompt, volume, answer)
            else:
                journal.log(Event.IGNORED, f"prompt {prompt.name} for {volume} does not "
                            "accept cached passwords: left to the person",
                            ask_file=prompt.name, volume=volume)
            return
        if volume in self.state.checking:
            return  # its entry is being checked after a retry: answer once we know
        held = self._key_for(volume, prompt.name)
        if held is None:
            return  # nothing held for this volume: the person types; we may capture it
        onetime, serial, secret = held
        try:
            with secret, reply.reply_datagram(secret) as datagram:
                reply.send_reply(self.ask_dir, prompt.name, prompt.request, datagram)
        except (KeyhandoffError, OSError) as exc:
            self.state.counts.refused += 1
            prompt.stage = Stage.IGNORED
            journal.log(Event.REFUSED, f"did not answer {prompt.name}: {exc}",
                        priority=journal.WARNING, ask_file=prompt.name, volume=volume,
                        reason=str(exc))
            return
        prompt.stage = Stage.ANSWERED
        self.state.answered[querier] = Answer(serial, onetime)
        self.state.counts.answered += 1
        journal.log(Event.ANSWERED, f"answered the prompt for volume {volume}",
                    volume=volume, ask_file=prompt.name, onetime=int(onetime),
                    latency_us=(time.time_ns() - prompt.seen_ns) // 1000)

    def _key_for(self, volume: str, ask_file: str) -> tuple[bool, int, Secret] | None:
        """(one-time?, serial, key) to answer ``volume`` with, or ``None`` for nothing held.

        Its one-time key when it has one, else its cached passphrase.
        """
        for onetime, get, what in ((True, self.cache.get_onetime_entry, "one-time key"),
                                   (False, self.cache.get_entry, "cached passphrase")):
            try:
                serial, secret = get(volume)
            except (KeyNotFound, KeyRevoked):
                continue
            except KeyExpired:
                journal.log(Event.EXPIRED, f"{what} for {volume} expired",
                            volume=volume, ask_file=ask_file)
                continue
            return onetime, serial, secret
        return None

    def _entry(self, volume: str, *, onetime: bool) -> tuple[int, Secret]:
        get = self.cache.get_onetime_entry if onetime else self.cache.get_entry
        return get(volume)

    def _retry_after_answer(self, prompt: Prompt, volume: str, answer: Answer) -> None:
        """The querier we answered asks again: check the entry, never drop it on a guess."""
        assert prompt.source is not None  # noqa: S101  # set with prompt.volume
        try:
            serial, secret = self._entry(volume, onetime=answer.onetime)
        except KeyUnavailable:
            return  # nothing left to judge
        if serial != answer.serial:
            secret.wipe()  # replaced since our answer: the new entry was not tried yet
            return
        self.state.checking.add(volume)
        what = "one-time key" if answer.onetime else "cached passphrase"
        journal.log(Event.RETRY, f"volume {volume} asked again after our answer; not "
                    f"answered, checking the {what}", volume=volume, ask_file=prompt.name)
        self._queue(Check("retry", prompt.source, volume, secret, serial=serial,
                          onetime=answer.onetime))

    # --- a prompt goes away -----------------------------------------------------------

    def gone(self, name: str) -> None:
        """The ask file went away: capture what was typed for it, if anything."""
        prompt = self.state.prompts.pop(name, None)
        self.state.forget_queriers(_alive)
        if prompt is None or not prompt.capturable or self.retain <= 0:
            return
        assert prompt.volume is not None  # noqa: S101  # capturable says so
        assert prompt.source is not None  # noqa: S101
        entries = self.systemd_cache.read()
        try:
            if len(entries) <= prompt.systemd_entries:
                return  # cancelled, timed out, or a duplicate of something already cached
            candidate = entries.pop()  # the newest: what was typed for this prompt
        finally:
            for e in entries:
                e.wipe()
        if self._is_onetime(prompt.volume, candidate):
            candidate.wipe()
            return
        self._queue(Check("capture", prompt.source, prompt.volume, candidate))

    def _is_onetime(self, volume: str, candidate: Secret) -> bool:
        """Whether ``candidate`` is ``volume``'s one-time key (logged: never captured)."""
        try:
            onetime = self.cache.get_onetime(volume)
        except KeyUnavailable:
            return False
        with onetime:
            if candidate != onetime:
                return False
        journal.log(Event.NOT_CAPTURED, f"what systemd cached for {volume} is its one-time "
                    "key; not kept as its passphrase", volume=volume,
                    reason="one-time key")
        return True

    # --- verdicts ---------------------------------------------------------------------

    def finished(
        self, check: Check, verdict: int, *, reason: str = "", maxrss_kib: int = 0,
    ) -> None:
        """What a check's verdict means: capture kept or not, retried entry kept or dropped.

        The check's secret is wiped here.
        """
        volume = check.volume
        with check.secret:
            if check.kind == "retry":
                self.state.checking.discard(volume)
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
            if self._is_onetime(volume, check.secret):
                return  # restored while it was checked: still not the passphrase
            self.cache.put(volume, check.secret, timeout=self.retain)
        self.state.counts.captured += 1
        journal.log(Event.CAPTURED, f"kept the passphrase for {volume} for "
                    f"{self.retain} s", volume=volume, retain=self.retain,
                    verifier_maxrss_kib=maxrss_kib)
        self._notify()

    def _finish_retry(self, check: Check, verdict: int, reason: str) -> None:
        volume = check.volume
        what = "one-time key" if check.onetime else "cached passphrase"
        if verdict == Verdict.REFUSED:
            try:
                serial, current = self._entry(volume, onetime=check.onetime)
            except KeyUnavailable:
                return  # gone already
            current.wipe()
            if serial != check.serial:
                return  # replaced while it was checked: the new one was not judged
            if check.onetime:
                self.cache.forget_onetime(volume)
            else:
                self.cache.forget(volume)
            self.state.counts.dropped += 1
            ours = "one-time key" if check.onetime else "passphrase"
            journal.log(Event.DROPPED, f"volume {volume} rejected our {ours} and it does "
                        "not open the volume; dropped it", priority=journal.WARNING,
                        volume=volume, onetime=int(check.onetime))
            self._notify()
            return
        why = {
            Verdict.OPENS: "it opens the volume",
            Verdict.OTHER_VOLUME: "the device no longer holds that volume",
        }.get(Verdict(verdict), "it could not be checked")
        journal.log(Event.KEPT, f"volume {volume} asked again after our answer, but {why}; "
                    f"the {what} is kept", volume=volume, reason=reason or why)
