"""The Python half of ``pam_keyhandoff.so`` (built by ``cffi_build/pam.py``).

``pam_sm_authenticate`` (C) starts an isolated interpreter and calls :func:`authenticate`,
which finds the cached passphrase in the kernel keyring and hands its **last**
NUL-separated entry to C through ``deliver`` (C sets ``PAM_AUTHTOK`` from its own buffer
and wipes that buffer).  Like gdm's ``pam_gdm`` it never prompts and answers
``PAM_AUTHINFO_UNAVAIL`` when there is nothing to hand over.

PAM options:

``keyname=<description>``
    The ``user`` key to read.  Default ``keyhandoff:login``: the one-shot key
    :mod:`keyhandoff.login` puts into root's ``@u`` (payload: the passphrase, permissions
    ``0x3f010000``, short timeout).  ``keyname=cryptsetup`` reads systemd's cache instead.
``keep``
    Do not invalidate the key after reading it.  Without it the key is destroyed before
    the passphrase is handed over (one-shot: a second login cannot reuse it).

Nothing here logs, raises or returns the passphrase; only key descriptions, serials and
exception type names reach the log.  This module imports nothing compiled except the
keyutils binding, and has no PAM dependency: it is testable in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import keyring
from keyhandoff.errors import (
    KeyExpired,
    KeyNotFound,
    KeyRejected,
    KeyRevoked,
    KeyringError,
    KeyringUnavailable,
    PermissionDenied,
)
from keyhandoff.secret import MAX_PASSPHRASE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "DEFAULT_KEYNAME",
    "PAM_AUTHINFO_UNAVAIL",
    "PAM_SERVICE_ERR",
    "PAM_SUCCESS",
    "ModuleOptions",
    "OptionError",
    "authenticate",
    "last_entry",
    "parse_options",
]

#: Linux-PAM return codes (``_pam_types.h``); the module's init code checks them against
#: the libpam it was compiled with and refuses to start on a mismatch.
PAM_SUCCESS: Final = 0
PAM_SERVICE_ERR: Final = 3
PAM_AUTHINFO_UNAVAIL: Final = 9

#: syslog priorities (``<syslog.h>``), checked the same way.
LOG_ERR: Final = 3
LOG_WARNING: Final = 4
LOG_INFO: Final = 6
LOG_DEBUG: Final = 7

#: The one-shot key keyhandoff.login puts for this module.
DEFAULT_KEYNAME: Final = "keyhandoff:login"

# A key that is missing, expired, revoked or not readable by us is "nothing to hand over",
# exactly as pam_gdm answers PAM_AUTHINFO_UNAVAIL for all of them.
_UNAVAILABLE: Final = (
    KeyNotFound,
    KeyExpired,
    KeyRevoked,
    KeyRejected,
    PermissionDenied,
    KeyringUnavailable,
)


class OptionError(ValueError):
    """A PAM option in the service file is not understood."""


@dataclass(frozen=True, slots=True)
class ModuleOptions:
    """The module's PAM arguments, parsed once."""

    keyname: str = DEFAULT_KEYNAME
    keep: bool = False


def parse_options(args: Sequence[str]) -> ModuleOptions:
    """Parse the arguments of the PAM service line.

    An unknown option is an error (PAM_SERVICE_ERR), not ignored: a typo such as
    ``keyname-cryptsetup`` would otherwise silently read another key.
    """
    keyname = DEFAULT_KEYNAME
    keep = False
    for arg in args:
        if arg == "keep":
            keep = True
        elif arg.startswith("keyname="):
            keyname = arg.removeprefix("keyname=")
            if not keyname or "\0" in keyname:
                raise OptionError("keyname= needs a key description")
        else:
            raise OptionError(f"unknown option {arg!r}")
    return ModuleOptions(keyname=keyname, keep=keep)


def last_entry(payload: memoryview) -> memoryview | None:
    """The last NUL-separated entry of a key payload (what pam_gdm hands to PAM).

    A trailing NUL (older writers) does not make an empty last entry.  Returns a slice of
    ``payload`` (no copy), or ``None`` when there is no non-empty entry.  The caller must
    release the slice before the payload's owner wipes it.
    """
    end = len(payload)
    while end > 0 and payload[end - 1] == 0:
        end -= 1
    start = end
    while start > 0 and payload[start - 1] != 0:
        start -= 1
    if start == end:
        return None
    return payload[start:end]


def authenticate(
    args: Sequence[str],
    *,
    token_size: int,
    deliver: Callable[[memoryview], None],
    log: Callable[[int, str], None],
) -> int:
    """Hand the cached passphrase to PAM; return a PAM code.

    ``deliver`` copies the entry into the C buffer of ``token_size`` bytes (entry plus
    NUL).  ``log`` takes a syslog priority and a secret-free message.  The key is
    invalidated (unless ``keep``) *before* anything is delivered: if it cannot be destroyed
    nothing is handed over, so a one-shot key is never used twice.
    """
    try:
        options = parse_options(args)
    except OptionError as exc:
        log(LOG_ERR, f"configuration error: {exc}")
        return PAM_SERVICE_ERR

    try:
        serial = keyring.find("user", options.keyname)
        payload = keyring.read(serial)
    except _UNAVAILABLE as exc:
        log(LOG_DEBUG, f"no usable key {options.keyname!r} ({type(exc).__name__})")
        return PAM_AUTHINFO_UNAVAIL

    with payload:
        if not options.keep:
            try:
                keyring.invalidate(serial)
            except KeyringError as exc:
                log(LOG_ERR, f"cannot invalidate key {serial} ({type(exc).__name__}): not used")
                return PAM_SERVICE_ERR
        with payload.view() as view:
            entry = last_entry(view)
            if entry is None:
                log(LOG_WARNING, f"key {options.keyname!r} holds no passphrase")
                return PAM_AUTHINFO_UNAVAIL
            with entry:
                if len(entry) > MAX_PASSPHRASE or len(entry) >= token_size:
                    log(LOG_WARNING, f"key {options.keyname!r}: entry too long, not used")
                    return PAM_AUTHINFO_UNAVAIL
                deliver(entry)
    log(LOG_INFO, f"passphrase from key {options.keyname!r} handed to PAM_AUTHTOK"
        + ("" if options.keep else " (key invalidated)"))
    return PAM_SUCCESS
