"""The exception tree.  Every error keyhandoff raises derives from :class:`KeyhandoffError`.

Exception texts never contain secrets: they name keys by description or serial only.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "KeyExpired",
    "KeyNotFound",
    "KeyRejected",
    "KeyRevoked",
    "KeyhandoffError",
    "KeyringError",
    "KeyringUnavailable",
    "KeyslotNotFound",
    "LuksBusy",
    "LuksError",
    "LuksPermissionDenied",
    "NoSuchDevice",
    "NotLuks",
    "PermissionDenied",
    "QuotaExceeded",
    "WrongPassphrase",
    "WrongVolumeKey",
]


class KeyhandoffError(Exception):
    """Root of every keyhandoff error."""


class ConfigError(KeyhandoffError):
    """The configuration file or a parameter is invalid."""


class KeyringError(KeyhandoffError, OSError):
    """A kernel keyring call failed; ``errno`` holds the kernel's error number."""


class KeyNotFound(KeyringError):
    """ENOKEY: no such key, or it is not reachable from the caller's keyrings."""


class KeyExpired(KeyringError):
    """EKEYEXPIRED: the key's kernel timeout passed."""


class KeyRevoked(KeyringError):
    """EKEYREVOKED: the key was revoked."""


class KeyRejected(KeyringError):
    """EKEYREJECTED: the key was negatively instantiated and rejected."""


class PermissionDenied(KeyringError):
    """EACCES/EPERM: the caller lacks the permission (possession, uid) for this operation."""


class QuotaExceeded(KeyringError):
    """EDQUOT: the owner's key quota (count or bytes) is exhausted."""


class KeyringUnavailable(KeyringError):
    """ENOSYS/EOPNOTSUPP: the kernel has no keyring support for this call."""


# --- LUKS (libcryptsetup); defined here so that naming them loads no library ----------


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
