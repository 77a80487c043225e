"""The volumes to arm and their passphrases: chosen, asked once, verified with one PBKDF."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Final

from keyhandoff import crypttab
from keyhandoff.cache import PassphraseCache, normalize_uuid
from keyhandoff.cescape import cescape
from keyhandoff.chain import Target
from keyhandoff.errors import (
    ArmRefused,
    InvalidArgument,
    InvalidVolume,
    KeyhandoffError,
    KeyUnavailable,
    NotLuks,
    UpdateError,
)
from keyhandoff.secret import Secret
from keyhandoff.volumes import BY_UUID, resolve_source

__all__ = ["ASK_TIMEOUT", "Ask", "Passphrases", "Progress", "SystemdAsk", "ask_id",
           "ask_with_systemd", "gather", "refuse_wrong", "resolve_volume", "targets", "verify"]

Progress = Callable[[str], None]
Ask = Callable[[Target], Secret]
#: volume UUID -> (passphrase, where it came from: "cache" or "asked")
Passphrases = dict[str, tuple[Secret, str]]

#: Seconds :class:`SystemdAsk` waits for an answer by default (systemd-ask-password's own).
ASK_TIMEOUT: Final = 90


#: crypttab options of volumes that are not LUKS (systemd-cryptsetup's other types)
_NOT_LUKS_TYPES: Final = ("plain", "tcrypt", "bitlk", "tcrypt-veracrypt")


def targets(sources: Sequence[str] | None = None,
            crypttab_path: str = crypttab.DEFAULT_PATH, *,
            skipped: list[tuple[str, str]] | None = None) -> list[Target]:
    """The volumes to hand over: ``sources`` (:func:`resolve_volume`), else crypttab's.

    Named ``sources`` must each be there (their LUKS header is read), or this raises.  By
    default, the prompting crypttab entries: an entry that is ``noauto``, of another type
    than LUKS, not plugged in or without a LUKS header is skipped and does not stop the
    others; ``skipped`` receives ``(name, why)`` for each.  ``header=`` is honoured: the
    detached header is where the UUID is read and the keyslots are made.
    """
    if sources is not None:
        return [resolve_volume(s, crypttab_path, need_header=True) for s in sources]
    out = []
    for e in crypttab.read(crypttab_path):
        why = _skip_reason(e)
        if why is None:
            try:
                volume = resolve_source(e.luks_path, require_header=True)
            except (KeyhandoffError, OSError) as exc:
                why = _unavailable(e, exc)
            else:
                out.append(Target(normalize_uuid(volume), e.luks_path, e.name))
                continue
        if skipped is not None:
            skipped.append((e.name, why))
    return out


def _skip_reason(e: crypttab.CrypttabEntry) -> str | None:
    if e.option("noauto"):
        return "noauto: the boot does not open it"
    kind = next((o for o in e.options if o in _NOT_LUKS_TYPES), None)
    if kind is not None:
        return f"not LUKS ({kind})"
    return None


def _unavailable(e: crypttab.CrypttabEntry, exc: BaseException) -> str:
    from keyhandoff.errors import describe

    if isinstance(exc, NotLuks):
        return f"not LUKS: {e.luks_path} has no LUKS header"
    flag = " (nofail)" if e.option("nofail") else ""
    return f"not plugged in{flag}: {describe(exc)}"


def _all_entries(crypttab_path: str) -> list[crypttab.CrypttabEntry]:
    try:
        with open(crypttab_path, encoding="utf-8", errors="replace") as f:
            return crypttab.parse(f.read())
    except FileNotFoundError:
        return []


def _uuid_spec(spec: str) -> str | None:
    """The UUID of ``UUID=<uuid>`` or of a bare LUKS UUID, else ``None``."""
    text = spec.removeprefix("UUID=")
    try:
        return normalize_uuid(text)
    except InvalidVolume:
        if spec.startswith("UUID="):
            raise InvalidVolume(f"{spec!r}: UUID= needs a LUKS UUID like "
                                "12345678-1234-1234-1234-123456789abc") from None
        return None


def _header_uuid_or_none(path: str) -> str | None:
    from keyhandoff.volumes import luks_identity

    try:
        return luks_identity(path).uuid
    except (KeyhandoffError, OSError):
        return None


def resolve_volume(spec: str, crypttab_path: str = crypttab.DEFAULT_PATH, *,
                   need_header: bool = False) -> Target:
    """What ``--volume`` names, the same way in every command: a :class:`Target`.

    ``spec`` is a crypttab name, a LUKS UUID (bare or ``UUID=<uuid>``), or a source path
    (a device, a ``/dev/disk/by-*`` link, an image file).  The UUID is the volume's
    identity: for a path it is read from the LUKS header found there; for a crypttab name
    from its source (``UUID=`` as written, a path through its header); a UUID is looked
    up in crypttab (for its name and path), else ``/dev/disk/by-uuid/<uuid>`` is its path.

    ``need_header``: the volume must be there and its header must say that UUID (for what
    reads or writes the header: ``arm``); otherwise a UUID, or a crypttab entry with a
    ``UUID=`` source, need not be plugged in (``cache put``, ``disarm``, ``restore``).
    Raises :class:`~keyhandoff.errors.InvalidVolume` when ``spec`` names nothing, and
    :class:`~keyhandoff.errors.NoSuchDevice`/:class:`~keyhandoff.errors.NotLuks` when
    the header that decides it is not there or not LUKS.
    """
    entries = _all_entries(crypttab_path)
    uuid = _uuid_spec(spec)
    if uuid is not None:
        entry = next((e for e in entries if _uuid_spec_or_none(e.source) == uuid), None)
        if entry is None:
            entry = next((e for e in entries if (e.source.startswith("/") or e.header)
                          and _header_uuid_or_none(e.luks_path) == uuid), None)
        path = entry.luks_path if entry is not None else BY_UUID + uuid
        target = Target(uuid, path, entry.name if entry is not None else uuid)
    elif "/" in spec or (os.path.lexists(spec)
                         and not any(e.name == spec for e in entries)):
        entry = next((e for e in entries if spec in (e.source, e.source_path)), None)
        path = entry.luks_path if entry is not None else spec
        found = normalize_uuid(resolve_source(path, require_header=True))
        return Target(found, path, entry.name if entry is not None else os.path.basename(spec))
    else:
        entry = next((e for e in entries if e.name == spec), None)
        if entry is None:
            raise InvalidVolume(f"no volume {spec!r}: not a name in {crypttab_path}, a LUKS "
                                "UUID or a path")
        known = _uuid_spec_or_none(entry.source) if entry.header is None else None
        if known is not None and not need_header:
            return Target(known, entry.luks_path, entry.name)
        found = normalize_uuid(resolve_source(entry.luks_path, require_header=True))
        target = Target(found, entry.luks_path, entry.name)
    if need_header:
        found = normalize_uuid(resolve_source(target.path, require_header=True))
        if found != target.uuid:
            raise NotLuks(errno.EINVAL, f"{target.path} holds LUKS volume {found}, not "
                          f"{target.uuid}")
    return target


def _uuid_spec_or_none(source: str) -> str | None:
    try:
        return _uuid_spec(source) if source.startswith("UUID=") else None
    except InvalidVolume:
        return None


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
