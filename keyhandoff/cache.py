"""The passphrase cache in the kernel keyring.

Two stores live here:

* :class:`PassphraseCache`: keyhandoff's own keyring ``keyhandoff`` linked into root's user
  keyring, one ``user`` key per LUKS volume named ``keyhandoff:luks:<UUID>`` for its
  passphrase, and ``keyhandoff:onetime:<UUID>`` for a one-time key restored for it.  Every
  key has a kernel timeout; the API has no way to store one without.
* :class:`SystemdCache`: systemd's ``cryptsetup`` key, written and read exactly as
  systemd 252's ``ask-password-api.c`` does, so ``systemd-ask-password --accept-cached``,
  ``systemd-cryptsetup``, gdm's ``pam_gdm`` and ``pam_systemd_loadkey`` interoperate.

Reading either store requires *possession* of root's ``@u`` (it must be linked into the
caller's session keyring: ``KeyringMode=shared`` in a unit).  Keys are created with the
kernel's default permissions for user keys, which are exactly ``0x3f010000``
(possessor: all; owner uid: view only; group, other: nothing), and those are set again
explicitly, with the timeout, before a key becomes reachable.  Only keys found from a
keyring we possess, owned by uid 0 and carrying exactly those permissions are ever read
(:func:`keyhandoff.keyring.find_trusted`).

Both write through :func:`keyhandoff.keys.publish`, the one way a key of ours becomes
reachable.  Our own secret payloads are stored padded (:func:`keyhandoff.keys.pad`): 4096
bytes whatever the secret's length, because ``/proc/key-users`` (world-readable) shows every
uid's total payload bytes.  The chain state (not secret) and systemd's key (systemd's
format) are not padded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid as _uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import keyring, keys, names
from keyhandoff.errors import (
    InvalidArgument,
    InvalidVolume,
    KeyNotFound,
    KeyRevoked,
    KeyringError,
    KeyringNotPossessed,
    KeyUnavailable,
    MalformedKey,
    PermissionDenied,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from keyhandoff.secret import Secret

__all__ = [
    "ASK_PASSWORD_DIR",
    "KEY_PERM",
    "MAX_TIMEOUT",
    "SYSTEMD_PERM",
    "CacheEntry",
    "InvalidVolume",
    "MalformedKey",
    "PassphraseCache",
    "SystemdCache",
    "normalize_uuid",
]

KEY_PERM: Final = names.KEY_PERM
KEYRING_NAME: Final = names.KEYRING_NAME
VOLUME_PREFIX: Final = names.VOLUME_PREFIX
ONETIME_PREFIX: Final = names.ONETIME_PREFIX
#: A cache entry never lives longer than a day (a handoff chain re-puts its keys).
MAX_TIMEOUT: Final = keys.MAX_TIMEOUT
ASK_PASSWORD_DIR: Final = names.ASK_DIR
SYSTEMD_KEYNAME: Final = names.SYSTEMD_KEYNAME
SYSTEMD_TIMEOUT: Final = names.SYSTEMD_TIMEOUT
SYSTEMD_PERM: Final = names.SYSTEMD_PERM


def normalize_uuid(text: str) -> str:
    """Return the canonical lower-case form of a LUKS UUID, or raise :class:`InvalidVolume`."""
    if len(text) != 36:
        raise InvalidVolume("volume must be a UUID like 12345678-1234-1234-1234-123456789abc")
    try:
        value = _uuid.UUID(text)
    except ValueError:
        raise InvalidVolume(
            "volume must be a UUID like 12345678-1234-1234-1234-123456789abc"
        ) from None
    return str(value)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached passphrase as listed: which volume and how long it has left.  No payload."""

    volume: str
    serial: int
    seconds_left: int | None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {"volume": self.volume, "serial": self.serial, "seconds_left": self.seconds_left}


class PassphraseCache:
    """Per-volume passphrases in the kernel keyring, each with a kernel-enforced timeout.

    ``parent`` is the keyring our ``keyhandoff`` keyring is linked into: root's user
    keyring in production; tests pass a keyring of their own.
    """

    def __init__(
        self,
        *,
        parent: int = keyring.USER,
        name: str = KEYRING_NAME,
        ask_dir: str = ASK_PASSWORD_DIR,
    ) -> None:
        self._parent = parent
        self._name = name
        self._ask_dir = ask_dir
        self._serial: int | None = None

    @property
    def keyring_serial(self) -> int:
        """Serial of the ``keyhandoff`` keyring, created (empty) on first use."""
        if self._serial is None:
            if self._parent == keyring.USER and not keyring.possesses_user_keyring():
                # searching @u unpossessed finds nothing, and a keyring created anew
                # there would replace (unlink) the one holding the cached passphrases
                raise KeyringNotPossessed
            serial = keyring.named_keyring(self._name, self._parent, KEY_PERM)
            if keyring.describe(serial).uid != keyring.TRUSTED_UID:
                raise PermissionDenied(errno.EACCES, f"keyring {self._name!r} is not root's")
            self._serial = serial
        return self._serial

    def _find(self, description: str) -> int | None:
        try:
            return keyring.find_trusted("user", description, perm=KEY_PERM,
                                        within=self.keyring_serial)
        except KeyUnavailable:
            # expired or invalidated keys linger until the kernel's GC: they count as gone
            return None

    def put(self, volume: str, passphrase: Secret, *, timeout: int) -> int:
        """Store ``passphrase`` for ``volume`` for ``timeout`` seconds; return the key serial.

        Replaces an existing entry for the same volume (the old key is invalidated).
        """
        volume = normalize_uuid(volume)
        passphrase.check_passphrase()
        return self.put_key(VOLUME_PREFIX + volume, passphrase, timeout=timeout)

    def put_key(
        self, description: str, payload: Secret, *, timeout: int, padded: bool = True,
    ) -> int:
        """Store any keyhandoff key (``keyhandoff:<what>``) in our keyring, with a timeout.

        For the handoff's own state (chain marker, sealed login payloads, volume keys during
        a chain).  Same rules as :meth:`put`: born with permissions and expiry, replacing
        (:func:`keyhandoff.keys.publish`).  Stored padded unless ``padded=False`` (only for
        what is not secret: the chain state); read it back with the same ``padded``.
        """
        if not description.startswith(names.KEY_PREFIX):
            raise InvalidArgument("keyhandoff keys are named keyhandoff:<what>")
        serial = keys.publish(description, payload, keyring_serial=self.keyring_serial,
                              timeout=timeout, padded=padded)
        _touch(self._ask_dir)  # as systemd does: waiting agents look at their prompts again
        return serial

    def get_key(self, description: str, *, padded: bool = True) -> Secret | None:
        """The payload of one of our keys, ``None`` when missing, expired, revoked, malformed."""
        serial = self._find(description)
        if serial is None:
            return None
        try:
            return self._read(serial, padded=padded)
        except KeyUnavailable:
            return None

    @staticmethod
    def _read(serial: int, *, padded: bool) -> Secret:
        raw = keyring.read(serial)
        if not padded:
            return raw
        with raw:
            return keys.unpad(raw)

    def forget_key(self, description: str) -> bool:
        """Destroy one of our keys (and unlink dead ones of that name); whether one was live."""
        return self._sweep(lambda d: d == description) > 0

    def get(self, volume: str) -> Secret:
        """The passphrase for ``volume``; :class:`KeyNotFound`/:class:`KeyExpired` if none."""
        return self.get_entry(volume)[1]

    def get_entry(self, volume: str) -> tuple[int, Secret]:
        """The key serial and passphrase for ``volume`` (the serial tells entries apart).

        :class:`KeyNotFound` (:class:`MalformedKey` for a payload not in the padded format)
        when there is no usable entry, :class:`KeyExpired` when it timed out.
        """
        return self._entry(VOLUME_PREFIX, volume, "cached passphrase")

    def _entry(self, prefix: str, volume: str, what: str) -> tuple[int, Secret]:
        volume = normalize_uuid(volume)
        try:
            serial = keyring.find_trusted("user", prefix + volume, perm=KEY_PERM,
                                          within=self.keyring_serial)
        except KeyRevoked:
            # forgotten (invalidated) and not yet collected: to callers it is simply gone
            # (the message names the key, as keyring.find_trusted's does for a missing key)
            raise KeyNotFound(errno.ENOKEY,
                              f"no {what} for {volume} (key {prefix}{volume})") from None
        return serial, self._read(serial, padded=True)

    # --- one-time keys: restored for one boot's prompt, never "the passphrase" -----------

    def put_onetime(self, volume: str, key_text: Secret, *, timeout: int) -> int:
        """Store a restored one-time key (its text form) for ``volume``; return the key serial.

        Under ``keyhandoff:onetime:<UUID>``, padded, beside (never over) the volume's cached
        passphrase; replaces an earlier one-time key of that volume.  The agent answers the
        volume's prompt from it first; ``finish`` forgets it.
        """
        volume = normalize_uuid(volume)
        key_text.check_passphrase()
        return self.put_key(ONETIME_PREFIX + volume, key_text, timeout=timeout)

    def get_onetime(self, volume: str) -> Secret:
        """The one-time key for ``volume``; raises like :meth:`get` when there is none."""
        return self.get_onetime_entry(volume)[1]

    def get_onetime_entry(self, volume: str) -> tuple[int, Secret]:
        """The key serial and one-time key for ``volume``; raises like :meth:`get_entry`."""
        return self._entry(ONETIME_PREFIX, volume, "one-time key")

    def forget_onetime(self, volume: str) -> bool:
        """Destroy the one-time key for ``volume``; return whether there was one."""
        return self.forget_key(ONETIME_PREFIX + normalize_uuid(volume))

    # --- listing and forgetting -----------------------------------------------------------

    def _listed(self) -> list[keyring.KeyInfo]:
        """/proc/keys lines of the keys linked into our keyring, dead and expired included."""
        serials = set(keyring.list_keyring(self.keyring_serial))
        return list(keyring.proc_keys(serials))

    def entries(self) -> list[CacheEntry]:
        """The volumes we hold a usable passphrase for, with seconds left.  Never reads a payload.

        Passphrases only (``keyhandoff:luks:*``): a one-time key is not a passphrase (see
        :meth:`onetime_entries`).  Expired and revoked keys (which linger until the kernel's
        GC) are not listed, nor keys that are not ours (another owner or other permissions).
        """
        return self._entries(VOLUME_PREFIX)

    def onetime_entries(self) -> list[CacheEntry]:
        """The volumes we hold a usable one-time key for, as :meth:`entries` lists passphrases."""
        return self._entries(ONETIME_PREFIX)

    def _entries(self, prefix: str) -> list[CacheEntry]:
        out = []
        for info in self._listed():
            if not info.usable or info.uid != keyring.TRUSTED_UID or info.perm != KEY_PERM:
                continue
            if info.key_type == "user" and info.description.startswith(prefix):
                out.append(
                    CacheEntry(info.description[len(prefix) :], info.serial, info.seconds_left),
                )
        return sorted(out, key=lambda e: e.volume)

    def forget(self, volume: str) -> bool:
        """Destroy the passphrase entry for ``volume``; return whether there was one.

        Its one-time key, if any, stays: :meth:`forget_onetime`.
        """
        return self.forget_key(VOLUME_PREFIX + normalize_uuid(volume))

    def forget_all(self) -> int:
        """Destroy every cached passphrase and one-time key; return how many usable ones went.

        Both answer prompts, so ``cache forget --all`` leaves neither (a one-time key left
        would still open its volume until ``finish`` destroys its keyslot).  Not the chain
        state, volume keys and sealed payloads: they name what is armed and are removed by
        ``disarm`` alone.  Expired and revoked entries are unlinked too, so nothing of them
        waits for the GC in our keyring.
        """
        return self._sweep(lambda d: d.startswith((VOLUME_PREFIX, ONETIME_PREFIX)))

    def _sweep(self, wanted: Callable[[str], bool]) -> int:
        """Remove every user key in our keyring whose description is ``wanted``.

        A usable key is invalidated (destroyed at once); one the kernel no longer lets us
        invalidate (expired, revoked) is unlinked.  Every key is tried even when one fails;
        the first failure is raised at the end.  Returns how many usable keys went.
        """
        count = 0
        failure: KeyringError | None = None
        for info in self._listed():
            if info.key_type != "user" or not wanted(info.description):
                continue
            try:
                keyring.invalidate(info.serial)
            except KeyNotFound:
                continue  # collected meanwhile
            except KeyringError:
                try:
                    keyring.unlink(info.serial, self.keyring_serial)
                except KeyNotFound:
                    continue
                except KeyringError as exc:
                    failure = failure or exc
                    continue
            count += info.usable
        if failure is not None:
            raise failure
        return count


class SystemdCache:
    """systemd's ``cryptsetup`` key: NUL-separated passwords in root's user keyring.

    Matches systemd 252 ``add_to_keyring()``: existing entries first, new ones appended,
    duplicates skipped, no trailing NUL, empty passwords never stored, the 150 s timeout set
    only when something was added, and the ask directory touched afterwards so waiting
    queriers look again.
    """

    def __init__(
        self,
        *,
        keyname: str = SYSTEMD_KEYNAME,
        keyring_id: int = keyring.USER,
        ask_dir: str = ASK_PASSWORD_DIR,
    ) -> None:
        self.keyname = keyname
        self._keyring = keyring_id
        self._ask_dir = ask_dir

    def _serial(self) -> int:
        # systemd writes its key into @u; only root's, with systemd's permissions, is read
        return keyring.find_trusted("user", self.keyname, perm=SYSTEMD_PERM,
                                    within=self._keyring)

    def info(self) -> keyring.KeyInfo | None:
        """The kernel's view of the key (expiry, never the payload); ``None`` if not usable."""
        try:
            serial = self._serial()
        except KeyUnavailable:
            return None
        infos = [i for i in keyring.proc_keys({serial}) if i.usable]
        return infos[0] if infos else None

    def read(self) -> list[Secret]:
        """All cached passwords, oldest first (empty list when the key is missing/expired)."""
        try:
            raw = keyring.read(self._serial())
        except KeyUnavailable:
            return []
        with raw:
            return keys.split_nulstr(raw.view())

    def last(self) -> Secret | None:
        """The newest entry, the one pam_gdm and pam_systemd_loadkey hand to PAM."""
        entries = self.read()
        if not entries:
            return None
        for e in entries[:-1]:
            e.wipe()
        return entries[-1]

    def add(self, passwords: Iterable[Secret], *, timeout: int = SYSTEMD_TIMEOUT) -> bool:
        """Append ``passwords`` (skipping empty ones and duplicates); return whether it changed."""
        current = self.read()
        try:
            added = False
            for pw in passwords:
                if len(pw) == 0 or any(pw == c for c in current):
                    continue
                pw.check_passphrase()
                current.append(pw.copy())
                added = True
            if not added:
                return False
            self._write(current, timeout)
        finally:
            for c in current:
                c.wipe()
        _touch(self._ask_dir)
        return True

    def remove(self, unwanted: Iterable[Secret]) -> bool:
        """Drop the entries equal to any of ``unwanted``; return whether it changed.

        Used after a handoff: one-time keys the agent answered with were pushed into this
        cache by systemd-cryptsetup, and must neither linger nor be what pam_gdm takes as
        "the last entry".  The key keeps the time it had left.
        """
        unwanted = list(unwanted)
        current = self.read()
        try:
            keep = [c for c in current if not any(c == u for u in unwanted)]
            if len(keep) == len(current):
                return False
            if not keep:
                self.clear()
                return True
            info = self.info()
            left = info.seconds_left if info is not None else None
            self._write(keep, max(1, min(left or SYSTEMD_TIMEOUT, SYSTEMD_TIMEOUT)))
        finally:
            for c in current:
                c.wipe()
        return True

    def _write(self, entries: list[Secret], timeout: int) -> None:
        """Replace the key with ``entries``; it is never visible without its timeout.

        Made in this thread's keyring with its permissions and timeout, then linked into
        ``@u``: linking displaces the old key of the same name in one step (readers see the
        old or the new key, never none), and the old key, referenced by nothing any more,
        is destroyed by the kernel.  Until the link nobody else can reach the new key.
        """
        with keys.join_nulstr(entries) as payload:
            keys.publish(self.keyname, payload, keyring_serial=self._keyring, timeout=timeout,
                         perm=SYSTEMD_PERM, padded=False, replace=False)

    def clear(self) -> bool:
        """Destroy the key; return whether there was one."""
        try:
            keyring.invalidate(self._serial())
        except KeyUnavailable:
            return False
        return True


def _touch(ask_dir: str) -> None:
    """Update the ask directory's times (inotify IN_ATTRIB); never create it."""
    with contextlib.suppress(OSError):
        os.utime(ask_dir)
