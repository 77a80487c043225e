"""Our keys in the kernel keyring: their payload formats and the one way a key is published.

* :func:`publish` is how every key keyhandoff writes (our cache entries and state, systemd's
  ``cryptsetup`` key, the one-shot login key) becomes reachable: never without its
  permissions and its kernel timeout.
* :func:`pad`/:func:`unpad`: our own secret payloads are stored padded, 4096 bytes whatever
  the secret's length, because ``/proc/key-users`` (world-readable) shows every uid's total
  payload bytes.  The chain state (not secret) and systemd's key (systemd's format) are not
  padded.
* :func:`join_nulstr`/:func:`split_nulstr`: systemd's format, NUL-separated passwords.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Final

from keyhandoff import keyring, names
from keyhandoff.errors import (
    InvalidArgument,
    KeyNotFound,
    KeyringError,
    KeyUnavailable,
    MalformedKey,
)
from keyhandoff.secret import Secret, SecretError

__all__ = [
    "MAX_PADDED",
    "MAX_TIMEOUT",
    "PADDED_SIZE",
    "check_timeout",
    "join_nulstr",
    "pad",
    "publish",
    "split_nulstr",
    "unpad",
]

#: No key of ours lives longer than a day (a handoff chain re-puts its keys).
MAX_TIMEOUT: Final = names.MAX_KEY_TIMEOUT
#: Every padded payload is this long: length (u16, big-endian), secret, zero bytes.
PADDED_SIZE: Final = 4096
MAX_PADDED: Final = PADDED_SIZE - 2
_ZEROS: Final = bytes(PADDED_SIZE)


def check_timeout(timeout: int) -> int:
    """``timeout`` if it is an int number of seconds in 1..:data:`MAX_TIMEOUT`, else raise.

    0 would clear a key's expiry (``KEYCTL_SET_TIMEOUT``): no key of ours is ever without one.
    """
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        raise TypeError("timeout must be an int number of seconds")
    if not 1 <= timeout <= MAX_TIMEOUT:
        raise InvalidArgument(f"timeout must be between 1 and {MAX_TIMEOUT} seconds")
    return timeout


def publish(
    description: str,
    payload: Secret,
    *,
    keyring_serial: int,
    timeout: int,
    perm: int = names.KEY_PERM,
    padded: bool = True,
    replace: bool = True,
) -> int:
    """Make a ``user`` key reachable in ``keyring_serial``; return its serial.

    The key is never visible without its permissions and timeout (the attack: a crash
    between ``add_key`` and ``KEYCTL_SET_TIMEOUT`` leaving a passphrase with no deadline).
    In this order:

    1. ``add_key`` into this thread's keyring, which nobody else possesses; the payload
       :func:`pad`-ded unless ``padded=False`` (the padded copy is wiped at once);
    2. ``perm`` set, then ``timeout`` (:func:`check_timeout`, checked before anything);
    3. with ``replace``, the old key of that description found in ``keyring_serial``
       (trusted: root's, with ``perm``) is invalidated while we still possess it: once
       the link below displaced it we could no longer destroy it, and it would linger
       until the GC ran.  Without ``replace`` the link alone displaces it, in one step
       (readers see the old or the new key, never none), and the kernel destroys the old
       one when nothing references it;
    4. linked into ``keyring_serial``.

    If a step fails the new key is invalidated and the error raised.  It is always
    unlinked from the thread keyring at the end.
    """
    check_timeout(timeout)
    if padded:
        with pad(payload) as stored:
            serial = keyring.add("user", description, stored, keyring.THREAD)
    else:
        serial = keyring.add("user", description, payload, keyring.THREAD)
    try:
        keyring.set_perm(serial, perm)
        keyring.set_timeout(serial, timeout)
        if replace:
            with contextlib.suppress(KeyUnavailable):  # none, or expired/revoked: gone
                keyring.invalidate(keyring.find_trusted("user", description, perm=perm,
                                                        within=keyring_serial))
        keyring.link(serial, keyring_serial)
    except BaseException:
        with contextlib.suppress(KeyringError):
            keyring.invalidate(serial)
        raise
    finally:
        with contextlib.suppress(KeyNotFound):
            keyring.unlink(serial, keyring.THREAD)
    return serial


def pad(secret: Secret) -> Secret:
    """The padded form of ``secret`` (1..4094 bytes): exactly :data:`PADDED_SIZE` bytes.

    Bytes 0-1 are the length as a big-endian u16, then the secret, then zeros; the buffer
    is sized once, so no unwiped partial copy is left behind.
    """
    n = len(secret)
    if not 1 <= n <= MAX_PADDED:
        raise SecretError(f"a stored secret must be 1 to {MAX_PADDED} bytes")
    out = Secret(bytearray(PADDED_SIZE))
    buf = out.buffer()
    buf[0:2] = n.to_bytes(2, "big")
    buf[2 : 2 + n] = secret.view()
    return out


def unpad(raw: Secret) -> Secret:
    """The secret inside a :func:`pad` payload; :class:`MalformedKey` for anything else.

    Refused: another size, a length out of 1..4094, a non-zero padding byte.  ``raw`` is
    left to its owner to wipe.
    """
    view = raw.view()
    try:
        if len(view) != PADDED_SIZE:
            raise MalformedKey(errno.EBADMSG, "stored payload is not padded to its size")
        n = int.from_bytes(view[0:2], "big")
        if not 1 <= n <= MAX_PADDED:
            raise MalformedKey(errno.EBADMSG, "stored payload has an impossible length")
        # the padding is not secret: a plain memcmp (startswith) is enough
        if not raw.buffer().startswith(_ZEROS[: PADDED_SIZE - 2 - n], 2 + n):
            raise MalformedKey(errno.EBADMSG, "stored payload has non-zero padding")
        return Secret(bytearray(view[2 : 2 + n]))
    finally:
        view.release()


def join_nulstr(entries: list[Secret]) -> Secret:
    """``entries`` NUL-separated, no trailing NUL, as systemd writes its ``cryptsetup`` key.

    Sized once: growing a bytearray would leave unwiped copies behind in freed memory.
    """
    size = sum(len(pw) for pw in entries) + len(entries) - 1
    payload = Secret(bytearray(size), allow_empty=True)
    buf, pos = payload.buffer(), 0
    for pw in entries:
        buf[pos : pos + len(pw)] = pw.view()
        pos += len(pw) + 1  # the byte after each entry stays NUL
    return payload


def split_nulstr(data: memoryview) -> list[Secret]:
    """Split a NUL-separated list; a trailing NUL (older writers) does not add an entry."""
    out: list[Secret] = []
    raw = data  # index the view: no immutable copy of the payload
    start = 0
    n = len(raw)
    for i in range(n + 1):
        if i == n or raw[i] == 0:
            if i > start:
                out.append(Secret(bytearray(raw[start:i])))
            start = i + 1
    return out
