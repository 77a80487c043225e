"""LUKS headers through libcryptsetup.

This is the only module that calls ``keyhandoff._bindings._cryptsetup``.  Every call that
can fail goes through :func:`_check`, which turns libcryptsetup's ``-errno`` return into an
exception below :class:`LuksError`.  Anything that checks a passphrase fails with the one
detail-free :class:`WrongPassphrase`: it says neither which keyslot was tried nor why, so a
caller (or a log reader) gets no oracle.

Passphrases and volume keys only cross into C as ``ffi.from_buffer`` views of a
:class:`~keyhandoff.secret.Secret`'s buffer; the volume key is read by libcryptsetup
straight into a ``bytearray`` that a new Secret owns.  (libcryptsetup keeps its own copies
in locked, wiped memory; see SECURITY.md.)

**Slow calls.**  :meth:`LuksHeader.verify` and :meth:`LuksHeader.volume_key` run the
keyslot's PBKDF: with argon2id defaults that is about a second and up to 1 GiB of memory.
The agent must run them off its event loop (``loop.run_in_executor``), one at a time, and
only for a passphrase already attributed to the volume, never as a guessing loop.
Everything else here reads or writes the header only (milliseconds).

A :class:`LuksHeader` is not thread-safe: use one handle from one thread at a time.
"""

from __future__ import annotations

import base64
import binascii
import errno as _errno
import json
import os
import threading
import uuid as _uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeAlias

from keyhandoff._bindings._cryptsetup import ffi, lib
from keyhandoff.errors import (
    KeyslotNotFound,
    LuksBusy,
    LuksError,
    LuksPermissionDenied,
    NoSuchDevice,
    NotLuks,
    WrongPassphrase,
    WrongVolumeKey,
)
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from types import TracebackType

__all__ = [
    "ANY_SLOT",
    "ANY_TOKEN",
    "KeyslotNotFound",
    "LuksBusy",
    "LuksError",
    "LuksHeader",
    "LuksPermissionDenied",
    "NoSuchDevice",
    "NotLuks",
    "Pbkdf",
    "WrongPassphrase",
    "WrongVolumeKey",
]

ANY_SLOT: Final[int] = lib.CRYPT_ANY_SLOT
ANY_TOKEN: Final[int] = lib.CRYPT_ANY_TOKEN


_ERRNO_CLASSES: Final[dict[int, type[LuksError]]] = {
    _errno.EACCES: LuksPermissionDenied,
    _errno.EPERM: LuksPermissionDenied,
    _errno.EBUSY: LuksBusy,
    _errno.ENOENT: KeyslotNotFound,
    _errno.ENOTBLK: NoSuchDevice,
    _errno.ENODEV: NoSuchDevice,
}

# Passphrase checks: libcryptsetup 2.6 returns -EPERM when no keyslot accepts the
# passphrase and -ENOENT when the one requested keyslot is inactive.  Both become the same
# WrongPassphrase so "slot 3 is empty" and "wrong passphrase for slot 3" look alike.
_VERIFY_ERRNOS: Final[dict[int, type[LuksError]]] = {
    _errno.EPERM: WrongPassphrase,
    _errno.ENOENT: WrongPassphrase,
}

_WRONG_PASSPHRASE_TEXT: Final = "passphrase refused"  # noqa: S105  # a message, not a secret

_LUKS_VERSIONS: Final[dict[bytes, int]] = {b"LUKS1": 1, b"LUKS2": 2}

_ACTIVE_SLOT_STATES: Final = frozenset(
    {lib.CRYPT_SLOT_ACTIVE, lib.CRYPT_SLOT_ACTIVE_LAST, lib.CRYPT_SLOT_UNBOUND}
)

# --- libcryptsetup's log ------------------------------------------------------------------
#
# Without a callback libcryptsetup prints errors to stderr and the rest to stdout, which in
# the agent means the journal, with no control over what lands there.  We install one
# process-wide default callback instead (every handle without its own callback uses it,
# including crypt_init before a handle exists).  It keeps the messages of the current call
# per thread; _check puts the last error message into the exception text, except for
# passphrase checks.  libcryptsetup never logs passphrases or keys.

_log_state = threading.local()


def _messages() -> list[tuple[int, str]]:
    found: list[tuple[int, str]] | None = getattr(_log_state, "messages", None)
    if found is None:
        found = []
        _log_state.messages = found
    return found


def _log_onerror(_exc_type: object, _exc: object, _tb: object) -> None:
    # A failure inside the callback (e.g. MemoryError) must not print a traceback from C
    # into stderr; the message is simply lost.
    return


@ffi.def_extern(onerror=_log_onerror)  # type: ignore[untyped-decorator]  # cffi is untyped
def _keyhandoff_crypt_log(level: int, msg: Any, _usrptr: Any) -> None:  # noqa: ANN401  # cdata
    if msg == ffi.NULL:
        return
    text = ffi.string(msg).decode("utf-8", "replace").strip()
    if level == lib.CRYPT_LOG_DEBUG:
        sink: list[str] | None = getattr(_log_state, "debug_sink", None)
        if sink is not None:
            sink.append(text)
        return
    _messages().append((level, text))


lib.crypt_set_log_callback(ffi.NULL, lib._keyhandoff_crypt_log, ffi.NULL)  # noqa: SLF001


@contextmanager
def _debug_log() -> Iterator[list[str]]:
    """Collect libcryptsetup's debug messages on this thread (tests count PBKDF runs).

    Raises libcryptsetup's process-wide debug level while active: for tests, not the agent.
    """
    collected: list[str] = []
    _log_state.debug_sink = collected
    lib.crypt_set_debug_level(lib.CRYPT_LOG_DEBUG)
    try:
        yield collected
    finally:
        lib.crypt_set_debug_level(0)
        _log_state.debug_sink = None


def _begin() -> None:
    """Forget libcryptsetup messages left from earlier calls on this thread."""
    _messages().clear()


def _check(
    rc: int,
    what: str,
    *,
    verifying: bool = False,
    overrides: Mapping[int, type[LuksError]] | None = None,
) -> int:
    """Return ``rc`` or raise the exception for ``-rc`` (the single error funnel).

    ``verifying`` marks a passphrase check: its refusals become :class:`WrongPassphrase`
    with a fixed text, and libcryptsetup's own message is dropped.  ``overrides`` maps an
    errno to a more precise class for one call (EINVAL from ``crypt_load`` is "not LUKS").
    Other errors carry libcryptsetup's last error message, which names slots and devices,
    never secrets.
    """
    messages = _messages()
    errors = [text for level, text in messages if level == lib.CRYPT_LOG_ERROR]
    messages.clear()
    if rc >= 0:
        return rc
    err = -rc
    if verifying and err in _VERIFY_ERRNOS:
        # Always EPERM: the errno would otherwise tell "empty slot" from "wrong passphrase".
        raise _VERIFY_ERRNOS[err](_errno.EPERM, _WRONG_PASSPHRASE_TEXT)
    if verifying:  # not a refusal (EINVAL, ENOMEM...): still without libcryptsetup's text
        raise _ERRNO_CLASSES.get(err, LuksError)(err, f"{what}: {os.strerror(err)}")
    cls = (overrides or {}).get(err) or _ERRNO_CLASSES.get(err, LuksError)
    detail = errors[-1] if errors else os.strerror(err)
    raise cls(err, f"{what}: {detail}")


def _path_bytes(path: str | os.PathLike[str]) -> bytes:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("a device path must not contain NUL")
    return raw


Pbkdf: TypeAlias = Literal["pbkdf2", "argon2i", "argon2id"]

_PBKDF_NAMES: Final[dict[str, Any]] = {
    "pbkdf2": lib.CRYPT_KDF_PBKDF2,
    "argon2i": lib.CRYPT_KDF_ARGON2I,
    "argon2id": lib.CRYPT_KDF_ARGON2ID,
}


class LuksHeader:
    """An open LUKS1/LUKS2 header (a ``struct crypt_device`` with the header loaded).

    Use as a context manager: ``with LuksHeader.open(path) as header: ...``.  Leaving the
    block (or :meth:`close`) frees the handle at once; ``ffi.gc`` is only the backstop for
    a handle somebody forgot to close.
    """

    __slots__ = ("_cd", "_path")

    def __init__(self, cd: Any, path: str) -> None:  # noqa: ANN401  # cdata
        self._cd: Any = cd
        self._path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LuksHeader:
        """Open the device or image file at ``path`` and load its LUKS header.

        Raises :class:`NoSuchDevice` when the path is missing or neither a block device
        nor a regular file, :class:`NotLuks` when it holds no LUKS header.
        """
        raw = _path_bytes(path)
        _begin()
        pp = ffi.new("struct crypt_device **")
        _check(lib.crypt_init(pp, raw), f"open {os.fsdecode(raw)}")
        cd = ffi.gc(pp[0], lib.crypt_free)
        header = cls(cd, os.fsdecode(raw))
        try:
            # NULL type = "any LUKS version"; any other format is EINVAL, i.e. not LUKS.
            _check(
                lib.crypt_load(cd, ffi.NULL, ffi.NULL),
                f"read LUKS header of {header._path}",
                overrides={_errno.EINVAL: NotLuks},
            )
        except BaseException:
            header.close()
            raise
        return header

    def close(self) -> None:
        """Free the libcryptsetup handle (idempotent)."""
        cd, self._cd = self._cd, None
        if cd is not None:
            ffi.release(cd)  # runs crypt_free now, and disarms the ffi.gc backstop

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._cd is None else "open"
        return f"<LuksHeader {self._path!r} {state}>"

    @property
    def _handle(self) -> Any:  # noqa: ANN401  # cdata
        if self._cd is None:
            raise LuksError(_errno.EBADF, f"LUKS header of {self._path} is closed")
        _begin()
        return self._cd

    # --- reading the header -------------------------------------------------------------

    @property
    def path(self) -> str:
        """The path this header was opened from."""
        return self._path

    @property
    def device(self) -> str:
        """The device (or image file) libcryptsetup reads, as it names it."""
        return ffi.string(lib.crypt_get_device_name(self._handle)).decode()  # type: ignore[no-any-return]

    @property
    def uuid(self) -> str:
        """The header's UUID in lower case (the ``/dev/disk/by-uuid/`` name).

        Raises :class:`LuksError` (EINVAL) when the header's UUID is not a UUID in the
        canonical 8-4-4-4-12 hex form (upper case is accepted), e.g. not ASCII.
        """
        raw = lib.crypt_get_uuid(self._handle)
        if raw == ffi.NULL:
            raise LuksError(_errno.EINVAL, f"LUKS header of {self._path} has no UUID")
        text = ffi.string(raw)
        try:
            canonical = str(_uuid.UUID(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            canonical = ""
        if not canonical or canonical != text.decode("ascii", "replace").lower():
            # not what cryptsetup writes; a hand-edited header must not pass as a UUID
            raise LuksError(_errno.EINVAL, f"LUKS header of {self._path} has a malformed UUID")
        return canonical

    @property
    def _type(self) -> Any:  # noqa: ANN401  # cdata const char *
        return lib.crypt_get_type(self._handle)

    @property
    def luks_version(self) -> int:
        """1 or 2."""
        return _LUKS_VERSIONS[ffi.string(self._type)]

    @property
    def keyslots(self) -> list[int]:
        """Numbers of the active keyslots (LUKS2 unbound keyslots included), ascending."""
        cd = self._handle
        count = _check(lib.crypt_keyslot_max(lib.crypt_get_type(cd)), "count keyslots")
        return [n for n in range(count) if lib.crypt_keyslot_status(cd, n) in _ACTIVE_SLOT_STATES]

    @property
    def token_texts(self) -> dict[int, bytes]:
        """Token id -> the token's JSON text exactly as stored (LUKS2 only).

        Untrusted bytes: anyone who can write the header chose them (libcryptsetup only
        checks that they are JSON with a ``type`` and a ``keyslots`` array).  Parse them
        with a strict parser of your own (:mod:`keyhandoff.onetime` for ours).
        """
        cd = self._handle
        if self.luks_version != 2:
            return {}
        count = _check(lib.crypt_token_max(lib.crypt_get_type(cd)), "count tokens")
        found: dict[int, bytes] = {}
        text = ffi.new("const char **")
        for token in range(count):
            # EINVAL = inactive token id; nothing else can fail for an in-range id.
            if lib.crypt_token_json_get(cd, token, text) < 0:
                continue
            # Copy now: the pointer is only valid until the next libcryptsetup call.
            found[token] = ffi.string(text[0])
        _begin()  # the inactive ids logged nothing an exception should pick up later
        return found

    @property
    def tokens(self) -> dict[int, dict[str, Any]]:
        """Token id -> parsed token JSON (LUKS2 only; a LUKS1 header has none).

        A token that is not a JSON object in valid UTF-8 (or whose numbers Python refuses,
        e.g. an integer of more than 4300 digits) is left out: never an exception.
        """
        found: dict[int, dict[str, Any]] = {}
        for token, raw in self.token_texts.items():
            try:
                data = json.loads(raw.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                continue
            if isinstance(data, dict):
                found[token] = data
        return found

    def keyslot_salt(self, keyslot: int) -> bytes | None:
        """The random KDF salt of an active LUKS2 keyslot (``None``: no such keyslot/salt).

        Read from libcryptsetup's own dump of the header's JSON (``crypt_dump_json``), so
        it is what libcryptsetup itself would use to open the keyslot.  The salt is made
        when the keyslot is made and differs for every keyslot ever added: it names one
        keyslot instance, also after its number was reused.  The dump also holds every
        token's untrusted text, so it is read leniently (numbers stay text, bad UTF-8 is
        replaced): nothing in a token can make this fail for a valid keyslot.
        """
        cd = self._handle
        if self.luks_version != 2:
            return None
        text = ffi.new("const char **")
        if lib.crypt_dump_json(cd, text, 0) < 0 or text[0] == ffi.NULL:
            _begin()
            return None
        raw = ffi.string(text[0])
        try:
            metadata = json.loads(
                raw.decode("utf-8", "replace"),
                parse_int=str, parse_float=str, parse_constant=str,
            )
            salt = metadata["keyslots"][str(keyslot)]["kdf"]["salt"]
            decoded = base64.b64decode(salt, validate=True) if isinstance(salt, str) else b""
        except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
            return None
        return decoded or None

    def keyslot_pbkdf(self, keyslot: int) -> tuple[str, int]:
        """The PBKDF name and iteration count of an active keyslot (no secret needed)."""
        cd = self._handle
        params = ffi.new("struct crypt_pbkdf_type *")
        _check(lib.crypt_keyslot_get_pbkdf(cd, keyslot, params), f"read keyslot {keyslot}")
        return ffi.string(params.type).decode(), int(params.iterations)

    # --- passphrases (slow: PBKDF) ------------------------------------------------------

    def verify(self, passphrase: Secret, *, keyslot: int = ANY_SLOT) -> int:
        """Check ``passphrase`` against the header; return the keyslot it opens.

        Slow (one PBKDF per keyslot tried; pass ``keyslot`` when it is known so exactly one
        runs).  Run off the event loop.  Activates nothing: libcryptsetup only derives and
        checks the volume key.  Raises :class:`WrongPassphrase` (no detail) on refusal.
        """
        cd = self._handle
        buf = passphrase.buffer()
        return _check(
            lib.crypt_activate_by_passphrase(
                cd, ffi.NULL, keyslot, ffi.from_buffer(buf), len(buf), 0
            ),
            "verify passphrase",
            verifying=True,
        )

    def volume_key(self, passphrase: Secret, *, keyslot: int = ANY_SLOT) -> tuple[int, Secret]:
        """Unlock the volume key with ``passphrase``: return (keyslot used, volume key).

        One PBKDF (when ``keyslot`` is given or the first slot tried matches).  Run off the
        event loop.  The caller owns the returned Secret and must wipe it (``with``).
        """
        cd = self._handle
        size = _check(lib.crypt_get_volume_key_size(cd), "read volume key size")
        key = bytearray(size)
        owner = Secret(key, allow_empty=True)  # owns ``key`` from here, also on failure
        size_p = ffi.new("size_t *", size)
        buf = passphrase.buffer()
        try:
            slot = _check(
                lib.crypt_volume_key_get(
                    cd, keyslot, ffi.from_buffer(key), size_p, ffi.from_buffer(buf), len(buf)
                ),
                "unlock volume key",
                verifying=True,
            )
        except BaseException:
            owner.wipe()
            raise
        del key[size_p[0] :]
        return slot, owner

    # --- changing the header ------------------------------------------------------------

    def add_onetime_keyslot(
        self,
        volume_key: Secret,
        key: Secret,
        *,
        pbkdf: Pbkdf = "pbkdf2",
        iterations: int = 1000,
        memory_kb: int = 32,
    ) -> int:
        """Add a keyslot that ``key`` opens, made from ``volume_key``; return its number.

        Meant for random one-time keys (256 bits need no costly PBKDF, hence the cheap
        defaults).  No existing keyslot is opened, so the person's PBKDF does not run
        again: get ``volume_key`` from :meth:`volume_key` once.  libcryptsetup checks the
        volume key against the header's digest before writing.  ``memory_kb`` and
        parallelism only matter for argon2.
        """
        cd = self._handle
        kind = _PBKDF_NAMES[pbkdf]
        params = ffi.new("struct crypt_pbkdf_type *")
        params.type = kind
        params.hash = ffi.NULL if pbkdf != "pbkdf2" else _SHA256
        params.iterations = iterations
        params.max_memory_kb = memory_kb if pbkdf != "pbkdf2" else 0
        params.parallel_threads = 1 if pbkdf != "pbkdf2" else 0
        # NO_BENCHMARK: take the iterations as given instead of timing the machine.
        params.flags = lib.CRYPT_PBKDF_NO_BENCHMARK
        _check(lib.crypt_set_pbkdf_type(cd, params), f"set {pbkdf} parameters")
        vk = volume_key.buffer()
        secret = key.buffer()
        return _check(
            lib.crypt_keyslot_add_by_volume_key(
                cd, ANY_SLOT, ffi.from_buffer(vk), len(vk), ffi.from_buffer(secret), len(secret)
            ),
            "add keyslot",
            overrides={_errno.EPERM: WrongVolumeKey},
        )

    def destroy_keyslot(self, keyslot: int) -> None:
        """Wipe and disable ``keyslot`` (no passphrase needed; cannot be undone).

        Raises :class:`KeyslotNotFound` (LUKS2) or :class:`LuksError` (EINVAL, LUKS1 or
        out of range) when the slot is not active.
        """
        cd = self._handle
        _check(lib.crypt_keyslot_destroy(cd, keyslot), f"destroy keyslot {keyslot}")

    def set_token(self, token_json: Mapping[str, Any], *, token: int = ANY_TOKEN) -> int:
        """Store a LUKS2 token (``type`` and a ``keyslots`` list of strings are required).

        ``token`` replaces that id; the default allocates a free one.  Returns the id.
        """
        cd = self._handle
        text = json.dumps(dict(token_json), separators=(",", ":")).encode()
        return _check(lib.crypt_token_json_set(cd, token, text), "store token")

    def remove_token(self, token: int) -> None:
        """Remove a LUKS2 token (removing an inactive id succeeds, as in libcryptsetup)."""
        cd = self._handle
        _check(lib.crypt_token_json_set(cd, token, ffi.NULL), f"remove token {token}")

    def assign_token(self, token: int, keyslot: int) -> None:
        """Record in the header that ``token`` belongs to ``keyslot``."""
        cd = self._handle
        _check(
            lib.crypt_token_assign_keyslot(cd, token, keyslot),
            f"assign token {token} to keyslot {keyslot}",
        )

    def token_assigned(self, token: int, keyslot: int) -> bool:
        """True when ``token`` is assigned to ``keyslot``."""
        cd = self._handle
        rc = lib.crypt_token_is_assigned(cd, token, keyslot)
        if rc == -_errno.ENOENT:
            _begin()
            return False
        _check(rc, f"check token {token}")
        return True


# Kept alive for the process: libcryptsetup copies it (strdup) in crypt_set_pbkdf_type.
_SHA256: Final = ffi.new("char[]", b"sha256")
