"""The kernel keyring through libkeyutils.

This is the only module that calls ``keyhandoff._bindings._keyutils``.  Every call goes
through :func:`_check`, which turns a negative return and ``errno`` into a precise
exception from :mod:`keyhandoff.errors`.  Payloads are read straight into a ``bytearray``
owned by a :class:`~keyhandoff.secret.Secret`; no C heap copy is made.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff._bindings._keyutils import ffi, lib
from keyhandoff.errors import (
    InvalidArgument,
    KeyExpired,
    KeyNotFound,
    KeyRejected,
    KeyRevoked,
    KeyringError,
    KeyringUnavailable,
    PermissionDenied,
    QuotaExceeded,
)
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "PERM_POSSESSOR_ALL",
    "PERM_USER_VIEW",
    "PROCESS",
    "SESSION",
    "THREAD",
    "TRUSTED_UID",
    "USER",
    "USER_SESSION",
    "KeyDescription",
    "KeyInfo",
    "add",
    "clear",
    "describe",
    "find",
    "find_trusted",
    "get_keyring_id",
    "invalidate",
    "join_session_keyring",
    "link",
    "list_keyring",
    "named_keyring",
    "proc_keys",
    "read",
    "revoke",
    "search",
    "set_perm",
    "set_timeout",
    "unlink",
    "update",
]

THREAD: Final[int] = lib.KEY_SPEC_THREAD_KEYRING
PROCESS: Final[int] = lib.KEY_SPEC_PROCESS_KEYRING
SESSION: Final[int] = lib.KEY_SPEC_SESSION_KEYRING
USER: Final[int] = lib.KEY_SPEC_USER_KEYRING
USER_SESSION: Final[int] = lib.KEY_SPEC_USER_SESSION_KEYRING

# Permission bits (keyutils.h KEY_POS_* / KEY_USR_*).
PERM_POSSESSOR_ALL: Final = 0x3F000000
PERM_USER_VIEW: Final = 0x00010000
#: The only owner whose keys are ever read (finding: keys other uids made must not count).
TRUSTED_UID: Final = 0

_ERRNO_CLASSES: Final[dict[int, type[KeyringError]]] = {
    _errno.ENOKEY: KeyNotFound,
    _errno.ENOENT: KeyNotFound,
    _errno.EKEYEXPIRED: KeyExpired,
    _errno.EKEYREVOKED: KeyRevoked,
    _errno.EKEYREJECTED: KeyRejected,
    _errno.EACCES: PermissionDenied,
    _errno.EPERM: PermissionDenied,
    _errno.EDQUOT: QuotaExceeded,
    _errno.ENOSYS: KeyringUnavailable,
    _errno.EOPNOTSUPP: KeyringUnavailable,
}


def _check(rc: int, what: str) -> int:
    """Return ``rc`` or raise the exception matching ``errno`` (the single error funnel)."""
    if rc >= 0:
        return rc
    err = ffi.errno
    cls = _ERRNO_CLASSES.get(err, KeyringError)
    raise cls(err, f"{what}: {os.strerror(err)}")


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise InvalidArgument("key type and description must not contain NUL")
    return raw


def add(key_type: str, description: str, payload: Secret | bytes, keyring: int) -> int:
    """Add (or update in place) a key in ``keyring``; return its serial.

    ``add_key`` replaces the payload of an existing key with the same type and description
    in that keyring, keeping its serial.  Permissions and timeout of a new key are the
    kernel defaults: callers must set both straight away (see :mod:`keyhandoff.cache`).
    """
    buf = payload.buffer() if isinstance(payload, Secret) else payload
    data = ffi.from_buffer(buf)
    return _check(
        lib.add_key(_cstr(key_type), _cstr(description), data, len(buf), keyring),
        f"add {key_type} key {description!r}",
    )


def update(serial: int, payload: Secret | bytes) -> None:
    """Replace a key's payload."""
    buf = payload.buffer() if isinstance(payload, Secret) else payload
    _check(lib.keyctl_update(serial, ffi.from_buffer(buf), len(buf)), f"update key {serial}")


def read(serial: int) -> Secret:
    """Read a key's payload into a new :class:`Secret` (needs read permission or possession).

    The kernel copies straight into the Secret's buffer.  The size is asked first and the
    read repeated if the key grew in between.
    """
    size = _check(lib.keyctl_read(serial, ffi.NULL, 0), f"read key {serial}")
    while True:
        buf = bytearray(size)
        got = lib.keyctl_read(serial, ffi.from_buffer(buf), size)
        if got < 0:
            Secret(buf, allow_empty=True).wipe()
            _check(got, f"read key {serial}")
        if got <= size:
            del buf[got:]
            return Secret(buf, allow_empty=True)
        Secret(buf, allow_empty=True).wipe()
        size = got


def list_keyring(keyring: int) -> list[int]:
    """Serials of the keys linked into ``keyring`` (needs read permission or possession)."""
    with read(keyring) as raw:
        data = bytes(raw.view())  # a list of serials, not a secret
    return [int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, len(data), 4)]


def search(keyring: int, key_type: str, description: str) -> int:
    """Search ``keyring`` recursively for a key the caller may search; return its serial."""
    return _check(
        lib.keyctl_search(keyring, _cstr(key_type), _cstr(description), 0),
        f"search {key_type} key {description!r}",
    )


def find(key_type: str, description: str) -> int:
    """The serial of a key in the caller's possessed keyrings (thread, process, session).

    ``request_key`` without callout information: no upcall, and no ``/proc/keys`` scan (the
    fallback of libkeyutils' ``find_key_by_type_and_desc``, which returns keys of any uid).
    It does **not** apply the trust rule: for telling whether a key exists (tests); never
    read what it returns, use :func:`find_trusted` for that.
    """
    return _check(
        lib.request_key(_cstr(key_type), _cstr(description), ffi.NULL, 0),
        f"find {key_type} key {description!r}",
    )


def find_trusted(key_type: str, description: str, *, perm: int, within: int) -> int:
    """Find a key we may trust and return its serial; :class:`KeyNotFound` for anything else.

    Trusted means all of: found by ``keyctl_search`` starting at ``within`` (a keyring the
    caller possesses, searched recursively; never the ``/proc/keys`` scan that libkeyutils'
    ``find_key_by_type_and_desc`` falls back to, which returns keys of any uid that are
    merely viewable), owned by uid 0, carrying exactly ``perm``, and with exactly this type
    and description.  The attack: another uid makes a key of the same name that grants
    everyone everything; reading it would let that user choose what root uses as a
    passphrase, or watch root try its guesses.  The owner cannot be changed by that user
    afterwards (chown needs CAP_SYS_ADMIN), so checking before the read is enough.
    Expired or revoked keys raise :class:`KeyExpired`/:class:`KeyRevoked` as the kernel
    reports them.
    """
    serial = search(within, key_type, description)
    try:
        found = describe(serial)
    except PermissionDenied:
        found = None  # not even viewable by its possessor: not one of ours
    if (
        found is None
        or found.key_type != key_type
        or found.description != description
        or found.uid != TRUSTED_UID
        or found.perm != perm
    ):
        what = "unviewable" if found is None else f"uid {found.uid}, permissions {found.perm:08x}"
        raise KeyNotFound(
            _errno.ENOKEY, f"{key_type} key {description!r} is not trusted ({what}); ignored",
        )
    return serial


def set_timeout(serial: int, seconds: int) -> None:
    """Set the kernel expiry of a key: it becomes unusable ``seconds`` from now (0 clears it).

    Callers in this package never pass 0 (see :mod:`keyhandoff.cache`).
    """
    if seconds < 0:
        raise InvalidArgument("timeout must not be negative")
    _check(lib.keyctl_set_timeout(serial, seconds), f"set timeout of key {serial}")


def set_perm(serial: int, perm: int) -> None:
    """Set a key's permission mask."""
    _check(lib.keyctl_setperm(serial, perm), f"set permissions of key {serial}")


def revoke(serial: int) -> None:
    """Revoke a key: every further use fails with EKEYREVOKED until it is garbage-collected."""
    _check(lib.keyctl_revoke(serial), f"revoke key {serial}")


def invalidate(serial: int) -> None:
    """Invalidate a key: it is unlinked everywhere and destroyed at once."""
    _check(lib.keyctl_invalidate(serial), f"invalidate key {serial}")


def link(serial: int, keyring: int) -> None:
    """Link a key into a keyring."""
    _check(lib.keyctl_link(serial, keyring), f"link key {serial} into {keyring}")


def unlink(serial: int, keyring: int) -> None:
    """Unlink a key from a keyring."""
    _check(lib.keyctl_unlink(serial, keyring), f"unlink key {serial} from {keyring}")


def clear(keyring: int) -> None:
    """Unlink every key from a keyring."""
    _check(lib.keyctl_clear(keyring), f"clear keyring {keyring}")


def get_keyring_id(spec: int, *, create: bool = False) -> int:
    """Resolve a special keyring id (``USER``, ``SESSION``...) to its serial."""
    return _check(lib.keyctl_get_keyring_ID(spec, int(create)), f"resolve keyring {spec}")


def possesses_user_keyring() -> bool:
    """Whether the caller possesses its user keyring (``@u`` reachable from ``@s``).

    A search of the session keyring for the keyring ``_uid.<euid>``: a unit with
    ``KeyringMode=shared`` or a login session has it linked; ``KeyringMode=private`` (the
    default of system services) or ``keyctl session -`` has not.
    """
    try:
        user = get_keyring_id(USER)
        found = search(SESSION, "keyring", f"_uid.{os.geteuid()}")
    except KeyringError:
        return False
    return found == user


def join_session_keyring(name: str | None = None) -> int:
    """Give the calling process a new (anonymous, or named and shared) session keyring."""
    cname = ffi.NULL if name is None else _cstr(name)
    return _check(lib.keyctl_join_session_keyring(cname), "join a session keyring")


def named_keyring(name: str, parent: int, perm: int | None = None) -> int:
    """Return the keyring ``name`` linked into ``parent``, creating it when missing."""
    try:
        serial = search(parent, "keyring", name)
    except KeyNotFound:
        serial = _check(
            lib.add_key(b"keyring", _cstr(name), ffi.NULL, 0, parent),
            f"create keyring {name!r}",
        )
    if perm is not None:
        set_perm(serial, perm)
    return serial


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """What ``keyctl_describe`` says of a key (never its payload)."""

    key_type: str
    uid: int
    gid: int
    perm: int
    description: str


def describe(serial: int) -> KeyDescription:
    """Describe a key: type, owner, permissions, description."""
    size = 256  # one call for every description we use; asked again when longer
    while True:
        buf = ffi.new("char[]", size)
        need = _check(lib.keyctl_describe(serial, buf, size), f"describe key {serial}")
        if need <= size:
            break
        size = need
    text = ffi.string(buf).decode("utf-8", "replace")
    key_type, uid, gid, perm, description = text.split(";", 4)
    return KeyDescription(key_type, int(uid), int(gid), int(perm, 16), description)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One line of ``/proc/keys``: the kernel's view of a key's expiry and state."""

    serial: int
    flags: str
    expiry: str
    perm: int
    uid: int
    key_type: str
    description: str

    @property
    def dead(self) -> bool:
        """Revoked, invalidated or dead: waiting for the kernel's garbage collector."""
        return any(flag in self.flags for flag in "RDi")

    @property
    def expired(self) -> bool:
        """The kernel timeout passed; the key lingers, unusable, until the GC runs."""
        return self.expiry == "expd"

    @property
    def usable(self) -> bool:
        """Neither dead nor expired: a key a reader could still use."""
        return not self.dead and not self.expired

    @property
    def seconds_left(self) -> int | None:
        """Seconds until the kernel expires the key, ``None`` for no expiry, 0 when expired.

        /proc/keys rounds: ``59s``, ``14m``, ``2h``, ``3d``, ``5w``; we return the lower bound.
        """
        if self.expiry == "perm":
            return None
        if self.expiry == "expd":
            return 0
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[self.expiry[-1]]
        return int(self.expiry[:-1]) * unit


_PROC_KEYS_LINE = re.compile(
    r"^(?P<serial>[0-9a-f]{8}) (?P<flags>\S{7}) +\d+ +(?P<expiry>\S+) +(?P<perm>[0-9a-f]{8}) +"
    r"(?P<uid>\d+) +\d+ (?P<type>\S+) +(?P<desc>.*)$",
)


def proc_keys(serials: set[int] | None = None) -> Iterator[KeyInfo]:
    """Yield the caller-visible keys from ``/proc/keys`` (optionally only ``serials``).

    The description column ends with ``: <summary>``; for ``user`` keys the summary is the
    payload length, never the payload.
    """
    with open("/proc/keys", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _PROC_KEYS_LINE.match(line.rstrip("\n"))
            if m is None:
                continue
            serial = int(m["serial"], 16)
            if serials is not None and serial not in serials:
                continue
            desc = m["desc"]
            head, sep, _summary = desc.rpartition(": ")
            yield KeyInfo(
                serial=serial,
                flags=m["flags"],
                expiry=m["expiry"],
                perm=int(m["perm"], 16),
                uid=int(m["uid"]),
                key_type=m["type"],
                description=head if sep else desc,
            )
