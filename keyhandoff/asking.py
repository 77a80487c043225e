"""The volumes to arm and their passphrases: chosen, asked once, verified with one PBKDF."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Final

from keyhandoff import crypttab
from keyhandoff.cache import PassphraseCache, normalize_uuid
from keyhandoff.cescape import cescape
from keyhandoff.chain import Target
from keyhandoff.errors import ArmRefused, InvalidArgument, KeyUnavailable, UpdateError
from keyhandoff.secret import Secret
from keyhandoff.volumes import resolve_source

__all__ = ["ASK_TIMEOUT", "Ask", "Passphrases", "Progress", "SystemdAsk", "ask_id",
           "ask_with_systemd", "gather", "refuse_wrong", "targets", "verify"]

Progress = Callable[[str], None]
Ask = Callable[[Target], Secret]
#: volume UUID -> (passphrase, where it came from: "cache" or "asked")
Passphrases = dict[str, tuple[Secret, str]]

#: Seconds :class:`SystemdAsk` waits for an answer by default (systemd-ask-password's own).
ASK_TIMEOUT: Final = 90


def targets(sources: Sequence[str] | None = None,
            crypttab_path: str = crypttab.DEFAULT_PATH) -> list[Target]:
    """The volumes to hand over: ``sources`` (paths), else the prompting crypttab entries."""
    if sources is not None:
        named = [(os.path.basename(s), s) for s in sources]
    else:
        named = [(e.name, e.source_path) for e in crypttab.read(crypttab_path)]
    out = []
    for name, path in named:
        volume = resolve_source(path, require_header=True)
        out.append(Target(normalize_uuid(volume), path, name))
    return out


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
    nobody would ever answer, and a daemon calling ``arm`` must not hang for ever.
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


#: The default ``ask`` of ``arm``: the password agents, for :data:`ASK_TIMEOUT` seconds.
ask_with_systemd: Final = SystemdAsk()


def _passphrase(target: Target, cache: PassphraseCache, ask: Ask | None) -> tuple[Secret, str]:
    """A passphrase for ``target`` (unverified) and where it came from: cached, else asked."""
    try:
        return cache.get(target.uuid), "cache"
    except KeyUnavailable:
        if ask is None:
            raise ArmRefused(f"no cached passphrase for {target.name}") from None
        return ask(target), "asked"


def _cached(cache: PassphraseCache, target: Target) -> bool:
    return any(e.volume == target.uuid for e in cache.entries())


def gather(chosen: Sequence[Target], cache: PassphraseCache, ask: Ask | None,
           say: Progress) -> Passphrases:
    """Every volume's passphrase (unverified), asked before any state is touched."""
    got: Passphrases = {}
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


def refuse_wrong(target: Target, cache: PassphraseCache, source: str) -> ArmRefused:
    """The refusal for a passphrase that does not open ``target``; forgets a cached one."""
    if source == "cache":
        cache.forget(target.uuid)  # a cached entry that does not open its volume is junk
    return ArmRefused(f"the passphrase for {target.name} does not open it")


def verify(target: Target, secret: Secret, source: str, cache: PassphraseCache,
           say: Progress) -> None:
    """Check that ``secret`` opens ``target`` (one PBKDF)."""
    from keyhandoff.luks import LuksHeader, WrongPassphrase

    say(f"checking the passphrase for {target.name} ({source})")
    try:
        with LuksHeader.open(target.path) as header:
            header.verify(secret)
    except WrongPassphrase:
        raise refuse_wrong(target, cache, source) from None
