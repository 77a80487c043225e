"""The exception tree.  Every error keyhandoff raises derives from :class:`KeyhandoffError`.

Every exception class of the package is defined here (so that naming one loads no library);
the modules that raise them re-export them under their old names (``update.ArmRefused``,
``efi.EfiStoreFull``, ``cache.MalformedKey``, ...).

Texts are sentences for people: ``str(exc)`` never shows ``[Errno N]``; an error that came
from a system call keeps its number in ``exc.errno``.  Texts never contain secrets: they
name keys by description or serial only.
"""

from __future__ import annotations

import errno
import os
import re
from typing import TYPE_CHECKING, ClassVar, Final

if TYPE_CHECKING:
    from keyhandoff.reports import ArmReport

__all__ = [
    "AlreadyArmed",
    "ArmRefused",
    "AskPasswordError",
    "Busy",
    "ChannelUnavailable",
    "ConfigError",
    "EfiError",
    "EfiPermission",
    "EfiStoreFull",
    "EfiUnavailable",
    "EfiVariableNotFound",
    "EfiWriteRefused",
    "HostileAskFile",
    "InvalidArchiveEntry",
    "InvalidArgument",
    "InvalidEscape",
    "InvalidVolume",
    "KexecError",
    "KexecRefused",
    "KeyExpired",
    "KeyNotFound",
    "KeyRejected",
    "KeyRevoked",
    "KeyUnavailable",
    "KeyhandoffError",
    "KeyringError",
    "KeyringNotPossessed",
    "KeyringUnavailable",
    "KeyslotNotFound",
    "LuksBusy",
    "LuksError",
    "LuksPermissionDenied",
    "MalformedKey",
    "NoSuchDevice",
    "NotArmed",
    "NotLuks",
    "NotRoot",
    "PermissionDenied",
    "QuotaExceeded",
    "RecordError",
    "RecordExhausted",
    "RecordExpired",
    "RecordForeign",
    "RecordMalformed",
    "RecordNotYetValid",
    "RecordRefused",
    "RecordSameBoot",
    "RecordTampered",
    "RecordUnknownFormat",
    "Refused",
    "ReplyFailed",
    "SealedPayloadRefused",
    "SecretError",
    "UdevUnavailable",
    "UnsafeLock",
    "UpdateError",
    "WrongPassphrase",
    "WrongVolumeKey",
    "describe",
]


class KeyhandoffError(Exception):
    """Root of every keyhandoff error.

    For the ones that are also :class:`OSError` (raised as ``cls(errno, text)``), ``str()``
    is the text alone: the number stays in ``errno``, out of what people read.
    """

    def __str__(self) -> str:
        if isinstance(self, OSError) and self.strerror:
            return str(self.strerror)
        return super().__str__()


class InvalidArgument(KeyhandoffError, ValueError):
    """A caller passed a value outside what the call accepts (a timeout, a count, a name).

    The command line prints it as one line and exits 2 (a usage error).
    """


class NotRoot(KeyhandoffError):
    """A command that needs root runs as another user (the command line exits 4)."""


class ConfigError(KeyhandoffError):
    """The configuration file or a parameter is invalid."""


# --- the kernel keyring ---------------------------------------------------------------


class KeyringError(KeyhandoffError, OSError):
    """A kernel keyring call failed; ``errno`` holds the kernel's error number."""


class KeyUnavailable(KeyringError):
    """There is no usable key: not found, expired, revoked, or not in our format.

    Catch this one where "no key" is the only thing that matters.
    """


class KeyNotFound(KeyUnavailable):
    """ENOKEY: no such key, or it is not reachable from the caller's keyrings."""


class KeyExpired(KeyUnavailable):
    """EKEYEXPIRED: the key's kernel timeout passed."""


class KeyRevoked(KeyUnavailable):
    """EKEYREVOKED: the key was revoked."""


class MalformedKey(KeyNotFound):
    """A stored payload is not in the padded format: to every caller, no usable key."""


class KeyRejected(KeyringError):
    """EKEYREJECTED: the key was negatively instantiated and rejected."""


class PermissionDenied(KeyringError):
    """EACCES/EPERM: the caller lacks the permission (possession, uid) for this operation."""


class KeyringNotPossessed(PermissionDenied):
    """Root's user keyring is not linked into the caller's session keyring (not possessed).

    Without possession the ``keyhandoff`` keyring in it can be neither searched nor read,
    and creating it anew would replace the one that holds the cached passphrases.
    """

    TEXT: ClassVar[str] = ("root's user keyring is not possessed (run from a unit with "
                           "KeyringMode=shared, or `keyctl link @u @s`)")

    def __init__(self) -> None:
        super().__init__(errno.EACCES, self.TEXT)


class QuotaExceeded(KeyringError):
    """EDQUOT: the owner's key quota (count or bytes) is exhausted."""


class KeyringUnavailable(KeyringError):
    """ENOSYS/EOPNOTSUPP: the kernel has no keyring support for this call."""


# --- secrets and the passphrase cache ---------------------------------------------------


class SecretError(KeyhandoffError, ValueError):
    """A passphrase was refused (empty, too long, contains NUL).  Never carries the value."""


class InvalidVolume(KeyhandoffError, ValueError):
    """A volume identifier is not a LUKS UUID."""


# --- LUKS (libcryptsetup) ---------------------------------------------------------------


class LuksError(KeyhandoffError, OSError):
    """A libcryptsetup call failed; ``errno`` holds the (positive) error number."""


class NotLuks(LuksError):
    """The device or file has no LUKS1/LUKS2 header."""


class NoSuchDevice(LuksError):
    """The path does not exist or is not a block device or regular file."""


class WrongPassphrase(LuksError):
    """The passphrase opens no keyslot it was tried against.

    Deliberately carries no detail (not the keyslot, not the reason, never the value).
    """


class LuksPermissionDenied(LuksError):
    """EACCES: the caller may not read or write the header."""


class LuksBusy(LuksError):
    """EBUSY: the device or its metadata lock is held by someone else."""


class WrongVolumeKey(LuksError):
    """The volume key given does not match the header's digest."""


class KeyslotNotFound(LuksError):
    """ENOENT: the keyslot or token named is not active."""


# --- UEFI variables -----------------------------------------------------------------------


class EfiError(KeyhandoffError, OSError):
    """A UEFI variable operation failed; ``errno`` holds the error number when there is one."""


class EfiUnavailable(EfiError):
    """No UEFI runtime variables here (no backend: legacy BIOS, no efivarfs, a container)."""


class EfiVariableNotFound(EfiError):
    """ENOENT: the variable does not exist."""


class EfiPermission(EfiError):
    """EPERM/EACCES: not allowed (not root, or no CAP_LINUX_IMMUTABLE to clear ``chattr +i``)."""


class EfiStoreFull(EfiError):
    """ENOSPC: the variable store (or the kernel's reserve on x86) has no room."""


class EfiWriteRefused(EfiError):
    """EINVAL/EROFS: the firmware refused the write.

    The usual case: creating a volatile (no NON_VOLATILE) variable after
    ExitBootServices, which UEFI-compliant firmware refuses.
    """


# --- systemd's password agent protocol ------------------------------------------------------


class AskPasswordError(KeyhandoffError):
    """Root of the ask-password errors.  ``reason`` is a fixed text; it never quotes content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostileAskFile(AskPasswordError, ValueError):
    """An ask file systemd would not write: refuse the whole query, answer nothing."""


class InvalidEscape(HostileAskFile):
    """A C escape systemd's ``cunescape`` would refuse (also raised for a bad ``Id=``)."""


class Refused(AskPasswordError):
    """:func:`keyhandoff.reply.send_reply` found a check failing and sent nothing."""


class ReplyFailed(AskPasswordError):
    """Every check passed but the kernel refused the datagram (``errno`` says why)."""

    def __init__(self, reason: str, errno_: int) -> None:
        super().__init__(reason)
        self.errno = errno_


# --- the handoff record ---------------------------------------------------------------------


class RecordError(KeyhandoffError):
    """Root of handoff-record errors."""


class RecordRefused(RecordError):
    """The record must not be used.  ``reason`` is a short stable code for logs and tests.

    The channel wipes a refused record; messages never contain key material.
    """

    reason: ClassVar[str] = "refused"

    def __init__(self, detail: str) -> None:
        super().__init__(f"handoff record refused ({self.reason}): {detail}")
        self.detail = detail


class RecordMalformed(RecordRefused):
    """Truncated, oversized, or a field or entry outside what version 1 allows."""

    reason = "malformed"


class RecordUnknownFormat(RecordRefused):
    """Not a keyhandoff record (magic) or a version this code does not read."""

    reason = "unknown-format"


class RecordForeign(RecordRefused):
    """Sealed under another record key, or for another channel than the one read."""

    reason = "foreign"


class RecordTampered(RecordRefused):
    """Authentication failed.  Deliberately says nothing about where (no oracle)."""

    reason = "tampered"


class RecordExpired(RecordRefused):
    """The deadline (``not_after``) has passed."""

    reason = "expired"


class RecordNotYetValid(RecordRefused):
    """The clock reads earlier than the arming time: the clock cannot be trusted."""

    reason = "clock-before-arming"


class RecordSameBoot(RecordRefused):
    """Opened in the boot that armed it: no reboot happened, so this is not a handoff."""

    reason = "no-reboot"


class RecordExhausted(RecordRefused):
    """``boots_left`` is zero: the record was already used for every boot it was armed for."""

    reason = "no-boots-left"


class SealedPayloadRefused(RecordError):
    """A volume-key-sealed payload did not open.  No detail, on purpose (no oracle)."""


# --- the runner API, the state lock, udev -------------------------------------------------


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


class AlreadyArmed(NotArmed):
    """``rearm`` in the boot that armed (or re-armed) the chain: nothing to do.

    A :class:`NotArmed` for callers of 0.1; ``report`` is what is armed (the command line
    shows it and exits 0).
    """

    def __init__(self, message: str, report: ArmReport) -> None:
        super().__init__(message)
        self.report = report


class Busy(KeyhandoffError):
    """Another keyhandoff state change held the lock for longer than the wait allowed."""


class UnsafeLock(KeyhandoffError):
    """The lock directory is not root's own private directory: it is not used."""


class UdevUnavailable(KeyhandoffError):
    """libudev cannot be used, or udevd is not running (no device events will come)."""


# --- kexec: an initramfs archive, kexec_file_load ------------------------------------------


class InvalidArchiveEntry(InvalidArgument):
    """A name, mode or size that a newc (initramfs cpio) archive must not carry.

    The text names the entry (names are never secret) and never its data.
    """


class KexecError(KeyhandoffError, OSError):
    """``kexec_file_load`` failed, or what it needs (a kernel image, an initrd) is missing.

    ``errno`` holds the kernel's error number when there is one.
    """


class KexecRefused(KexecError):
    """The kernel refused by policy, not for the image's format.

    EPERM (no CAP_SYS_BOOT, ``kernel.kexec_load_disabled``, no loads left, lockdown and an
    unsigned kernel) or a signature that did not verify (EKEYREJECTED, EBADMSG, ENOKEY, ...).
    """


_ERRNO_PREFIX: Final = re.compile(r"^\[Errno -?\d+\] ")


def describe(exc: BaseException) -> str:
    """One line for people about ``exc``: never ``[Errno N]``, naming the file when known.

    The one place the command line turns an error into its message.  A keyhandoff error
    is its own text; any other :class:`OSError` is the system's text with the file (and the
    second file of a rename) it was about, as ``open()`` and ``os.*`` record them.
    """
    if isinstance(exc, KeyhandoffError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = exc.strerror or _ERRNO_PREFIX.sub("", str(exc)) or type(exc).__name__
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        if names:
            text = " -> ".join(os.fsdecode(n) if isinstance(n, (bytes, str)) else str(n)
                               for n in names) + ": " + text
    else:
        text = str(exc) or type(exc).__name__
    return _ERRNO_PREFIX.sub("", text.replace("\n", " ").strip())
