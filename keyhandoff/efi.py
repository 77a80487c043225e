"""UEFI variables through libefivar, and the variable that carries the handoff record.

This is the only module that calls ``keyhandoff._bindings._efivar``.  Every call that can
fail goes through :func:`_raise_for_errno`, which turns ``errno`` into a precise exception
under :class:`EfiError`.

Facts this module relies on (libefivar 37, checked in its source, src/lib.c and
src/efivarfs.c):

* The backend is chosen by a library constructor when the shared object is loaded (at the
  first import of the binding): ``LIBEFIVAR_OPS`` and ``EFIVARFS_PATH`` must be in the
  environment before that.  With no backend, ``efi_set_variable`` calls a NULL function
  pointer and the process dies with SIGSEGV, so every public function here checks
  ``efi_variables_supported()`` first and raises :class:`EfiUnavailable`.
* ``efi_set_variable`` writes the 4-byte attributes and the data with a single ``write()``
  (a lone 4-byte write would delete the variable), clears ``FS_IMMUTABLE_FL`` before the
  write and puts it back afterwards; ``efi_del_variable`` clears it before ``unlink``.  Both
  need ``CAP_LINUX_IMMUTABLE``: without it they fail with EPERM (:class:`EfiPermission`).
* ``efi_get_variable`` returns a ``calloc``'d buffer.  We copy it into a ``bytearray``
  owned by a :class:`~keyhandoff.secret.Secret`, zero the C buffer and ``free`` it at once.
  ``efi_set_variable`` copies our data into a heap buffer that it frees without zeroing:
  only data that may rest in NVRAM (the sealed handoff record) is ever written here.
* ``efi_set_variable`` opens an existing variable without ``O_TRUNC`` and accepts a short
  ``write()``: harmless on efivarfs (one write is one SetVariable call), wrong on a plain
  directory, so :meth:`EfiVariable.write` deletes first and checks the stored size.
* The variable-name iterator keeps a static ``DIR*``: :func:`list_variables` always runs it
  to the end, and none of this is thread-safe (the agent has one thread).
"""

from __future__ import annotations

import errno as _errno
import os
import re
from dataclasses import dataclass
from typing import Any, Final

from keyhandoff import names
from keyhandoff._bindings._efivar import ffi, lib
from keyhandoff.errors import (
    EfiError,
    EfiPermission,
    EfiStoreFull,
    EfiUnavailable,
    EfiVariableNotFound,
    EfiWriteRefused,
)
from keyhandoff.secret import Secret

__all__ = [
    "ATTR_APPEND_WRITE",
    "ATTR_BOOTSERVICE_ACCESS",
    "ATTR_NON_VOLATILE",
    "ATTR_RUNTIME_ACCESS",
    "PROBE_NAME",
    "RECORD_ATTRIBUTES_NV",
    "RECORD_ATTRIBUTES_VOLATILE",
    "RECORD_MODE",
    "RECORD_NAME",
    "RECORD_VARIABLE",
    "VENDOR_GUID",
    "EfiCapabilities",
    "EfiError",
    "EfiPermission",
    "EfiStoreFull",
    "EfiUnavailable",
    "EfiValue",
    "EfiVariable",
    "EfiVariableNotFound",
    "EfiWriteRefused",
    "RecordVariable",
    "list_variables",
    "probe",
    "supported",
]

ATTR_NON_VOLATILE: Final[int] = lib.EFI_VARIABLE_NON_VOLATILE
ATTR_BOOTSERVICE_ACCESS: Final[int] = lib.EFI_VARIABLE_BOOTSERVICE_ACCESS
ATTR_RUNTIME_ACCESS: Final[int] = lib.EFI_VARIABLE_RUNTIME_ACCESS
ATTR_APPEND_WRITE: Final[int] = lib.EFI_VARIABLE_APPEND_WRITE

VENDOR_GUID: Final = names.EFI_VENDOR_GUID
RECORD_NAME: Final = names.EFI_RECORD_NAME
PROBE_NAME: Final = names.EFI_PROBE_NAME
#: BS|RT|NV: survives any reboot (the ``efi`` channel).
RECORD_ATTRIBUTES_NV: Final[int] = (
    ATTR_NON_VOLATILE | ATTR_BOOTSERVICE_ACCESS | ATTR_RUNTIME_ACCESS
)
#: BS|RT: firmware RAM only (the ``efi-volatile`` channel, where the firmware accepts it).
RECORD_ATTRIBUTES_VOLATILE: Final[int] = ATTR_BOOTSERVICE_ACCESS | ATTR_RUNTIME_ACCESS
#: File mode at creation.  It lasts only for this boot: after a reboot efivarfs shows every
#: variable as 0644, which is why the record never carries the person's passphrase.
RECORD_MODE: Final = 0o600

# ASCII only, and never a '/' or '..': libefivar builds "<EFIVARFS_PATH><name>-<guid>"
# with no escaping, so a name with a slash would write outside the efivars directory.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
_GUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_GUID_STR_LEN: Final = 36


_ERRNO_CLASSES: Final[dict[int, type[EfiError]]] = {
    _errno.ENOENT: EfiVariableNotFound,
    _errno.EPERM: EfiPermission,
    _errno.EACCES: EfiPermission,
    _errno.ENOSPC: EfiStoreFull,
    _errno.EINVAL: EfiWriteRefused,
    _errno.EROFS: EfiWriteRefused,
    _errno.ENOSYS: EfiUnavailable,
}


def _raise_for_errno(err: int, what: str) -> None:
    """Raise the exception for ``err``; ``what`` names the operation and the variable."""
    lib.efi_error_clear()  # libefivar's error stack grows per thread until cleared
    cls = _ERRNO_CLASSES.get(err, EfiError)
    raise cls(err, f"{what}: {os.strerror(err) if err else 'failed without errno'}")


def _require_backend() -> None:
    # Guards the v37 NULL-pointer call in efi_set_variable (SIGSEGV, not an exception).
    if not lib.efi_variables_supported():
        raise EfiUnavailable(_errno.ENOSYS, "UEFI runtime variables are not available")


def supported() -> bool:
    """True when libefivar found a backend (efivarfs, or ``EFIVARFS_PATH`` in tests)."""
    return bool(lib.efi_variables_supported())


def _parse_guid(guid: str) -> Any:  # noqa: ANN401  (a cffi efi_guid_t *)
    if not _GUID_RE.fullmatch(guid):
        raise ValueError(f"not a lower-case GUID: {guid!r}")
    out = ffi.new("efi_guid_t *")
    if lib.efi_str_to_guid(guid.encode("ascii"), out) < 0:
        lib.efi_error_clear()
        raise ValueError(f"not a GUID: {guid!r}")
    return out


def _guid_to_str(guid_ptr: Any) -> str:  # noqa: ANN401  (a cffi efi_guid_t *)
    text = ffi.new("char **")
    rc = lib.efi_guid_to_str(guid_ptr, text)
    if rc < 0 or text[0] == ffi.NULL:
        _raise_for_errno(ffi.errno, "efi_guid_to_str")
    try:
        return str(ffi.string(text[0]).decode("ascii"))
    finally:
        lib.free(text[0])


@dataclass(frozen=True, slots=True, repr=False)
class EfiValue:
    """A variable's attributes and data.  ``data`` is a :class:`Secret`: wipe it when done."""

    attributes: int
    data: Secret

    def __repr__(self) -> str:
        return f"<EfiValue attributes=0x{self.attributes:x} data={self.data!r}>"


@dataclass(frozen=True, slots=True)
class EfiVariable:
    """One UEFI variable, named by ``name`` and vendor ``guid`` (ASCII name, lower-case GUID)."""

    name: str
    guid: str = VENDOR_GUID

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"unsupported variable name: {self.name!r}")
        _parse_guid(self.guid)

    def _c_args(self) -> tuple[Any, bytes]:
        return _parse_guid(self.guid)[0], self.name.encode("ascii")

    def read(self) -> EfiValue:
        """The attributes and data.  The data's C copy is zeroed and freed before returning."""
        _require_backend()
        guid, name = self._c_args()
        data = ffi.new("uint8_t **")
        size = ffi.new("size_t *")
        attrs = ffi.new("uint32_t *")
        if lib.efi_get_variable(guid, name, data, size, attrs) < 0:
            _raise_for_errno(ffi.errno, f"reading {self}")
        buf = bytearray(size[0])
        try:
            ffi.memmove(buf, data[0], size[0])
        finally:
            # read_file() allocates one byte more for a NUL; zero what we copied.
            ffi.memmove(data[0], bytes(size[0]), size[0])
            lib.free(data[0])
        return EfiValue(attributes=int(attrs[0]), data=Secret(buf, allow_empty=True))

    def write(
        self,
        data: Secret | bytes | bytearray | memoryview,
        attributes: int,
        *,
        mode: int = RECORD_MODE,
    ) -> None:
        """Create or replace the variable: attributes and data in one ``write()``.

        An existing variable is deleted first.  Firmware refuses to change the attributes of
        an existing variable (EINVAL), and libefivar opens an existing file without
        ``O_TRUNC``, so on a plain directory a shorter replacement would keep the old tail.
        A crash between the two leaves no record: the next boot asks for the passphrase.
        """
        _require_backend()
        if self.exists():
            self.delete()
        if attributes & ATTR_APPEND_WRITE:
            raise ValueError("append writes are not supported (they cannot replace a record)")
        if attributes & ~0xFFFFFFFF:
            raise ValueError("attributes do not fit in 32 bits")
        guid, name = self._c_args()
        raw = data.buffer() if isinstance(data, Secret) else bytearray(data)
        # efi_set_variable wants a non-NULL pointer even for zero bytes.
        c_data = ffi.from_buffer("uint8_t[]", raw) if raw else ffi.new("uint8_t[1]")
        try:
            rc = lib.efi_set_variable(guid, name, c_data, len(raw), attributes, mode)
            err = ffi.errno
        finally:
            # Release the buffer export now: a live one (say, kept by a traceback) would make
            # Secret.wipe() fail with BufferError.
            ffi.release(c_data)
            if not isinstance(data, Secret):
                raw[:] = bytes(len(raw))
        if rc < 0:
            _raise_for_errno(err, f"writing {self}")
        # libefivar treats a short write() as success (it only checks for -1).  efivarfs
        # writes all or nothing, a plain directory may not: never leave a cut record behind.
        written = self.size()
        if written != len(raw):
            self.delete()
            raise EfiStoreFull(
                _errno.ENOSPC, f"writing {self}: only {written} of {len(raw)} bytes were stored"
            )

    def delete(self) -> None:
        """Delete the variable (libefivar clears the immutable flag first)."""
        _require_backend()
        guid, name = self._c_args()
        if lib.efi_del_variable(guid, name) < 0:
            _raise_for_errno(ffi.errno, f"deleting {self}")

    def size(self) -> int:
        """Size of the data in bytes (from ``stat``; reads no data)."""
        _require_backend()
        guid, name = self._c_args()
        size = ffi.new("size_t *")
        if lib.efi_get_variable_size(guid, name, size) < 0:
            _raise_for_errno(ffi.errno, f"sizing {self}")
        return int(size[0])

    def attributes(self) -> int:
        """The variable's attribute bits (the data is read, wiped and dropped)."""
        value = self.read()
        value.data.wipe()
        return value.attributes

    def exists(self) -> bool:
        """True when the variable exists."""
        try:
            self.size()
        except EfiVariableNotFound:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}-{self.guid}"


#: The handoff record's variable.
RECORD_VARIABLE: Final = EfiVariable(RECORD_NAME, VENDOR_GUID)


def list_variables() -> list[EfiVariable]:
    """Every variable the backend lists (names libefivar cannot parse are skipped)."""
    _require_backend()
    guid_pp = ffi.new("efi_guid_t **")
    name_pp = ffi.new("char **")
    found: list[EfiVariable] = []
    while True:
        # The iterator keeps a static DIR*; we always run it to the end (rc == 0).
        rc = lib.efi_get_next_variable_name(guid_pp, name_pp)
        if rc == 0:
            return found
        if rc < 0:
            _raise_for_errno(ffi.errno, "listing variables")
        name = ffi.string(name_pp[0]).decode("ascii", "replace")
        guid = _guid_to_str(guid_pp[0])
        if _NAME_RE.fullmatch(name):
            found.append(EfiVariable(name, guid))


@dataclass(frozen=True, slots=True)
class EfiCapabilities:
    """What :func:`probe` found, from real writes of a scratch variable."""

    runtime_variables: bool
    nv_writable: bool
    volatile_accepted: bool
    detail: str


def _try_write(var: EfiVariable, attributes: int) -> str | None:
    """Write, read back, delete; ``None`` on success, else why it failed."""
    marker = b"keyhandoff-probe"
    try:
        var.write(marker, attributes)
    except EfiError as exc:
        return f"{type(exc).__name__} ({exc.strerror})"
    try:
        value = var.read()
        ok = value.attributes == attributes and bytes(value.data.view()) == marker
        value.data.wipe()
    except EfiError as exc:
        ok = False
        why = f"written but not readable: {type(exc).__name__} ({exc.strerror})"
    else:
        why = "read back different data or attributes"
    try:
        var.delete()
    except EfiError as exc:
        # A variable we cannot delete is no place for a record (restore deletes first).
        return f"written but not deletable: {type(exc).__name__} ({exc.strerror})"
    return None if ok else why


def _unusable(detail: str) -> EfiCapabilities:
    return EfiCapabilities(
        runtime_variables=False, nv_writable=False, volatile_accepted=False, detail=detail
    )


def probe() -> EfiCapabilities:
    """Find out, by real attempts, what the firmware accepts.

    Writes a scratch variable (:data:`PROBE_NAME`) non-volatile, then volatile, reads each
    back and deletes it.  Each NV write costs flash wear: call this for ``status`` and before
    arming, not in a loop.
    """
    if not supported():
        return _unusable("no UEFI runtime variables (no backend)")
    scratch = EfiVariable(PROBE_NAME, VENDOR_GUID)
    try:
        if scratch.exists():  # left over by a probe that was killed mid-way
            scratch.delete()
        list_variables()
    except EfiError as exc:
        return _unusable(f"variables not usable: {exc}")
    nv_error = _try_write(scratch, RECORD_ATTRIBUTES_NV)
    volatile_error = _try_write(scratch, RECORD_ATTRIBUTES_VOLATILE)
    parts = [
        "non-volatile: " + ("writable" if nv_error is None else f"refused, {nv_error}"),
        "volatile: " + ("accepted" if volatile_error is None else f"refused, {volatile_error}"),
    ]
    return EfiCapabilities(
        runtime_variables=True,
        nv_writable=nv_error is None,
        volatile_accepted=volatile_error is None,
        detail="; ".join(parts),
    )


class RecordVariable:
    """The ``efi`` / ``efi-volatile`` channel's store: the sealed record in :data:`RECORD_VARIABLE`.

    Holds the record's bytes only; sealing and opening them is :mod:`keyhandoff.record`'s
    (this module never loads the AEAD backend).  Restore order is the design's: read,
    delete, and only then open.
    """

    __slots__ = ("_variable", "volatile")

    def __init__(self, *, volatile: bool = False, variable: EfiVariable | None = None) -> None:
        self.volatile: Final = volatile
        self._variable = variable if variable is not None else RECORD_VARIABLE

    @property
    def attributes(self) -> int:
        """The variable attributes this channel writes (BS|RT, +NV unless volatile)."""
        if self.volatile:
            return RECORD_ATTRIBUTES_VOLATILE
        return RECORD_ATTRIBUTES_NV

    def store(self, blob: bytes) -> None:
        """Write a sealed record (replacing any previous one), mode 0600."""
        self._variable.write(blob, self.attributes, mode=RECORD_MODE)

    def take(self) -> Secret | None:
        """Read the record and delete it; ``None`` when there is none.

        Delete first: if the variable cannot be deleted the record is not returned (the
        exception propagates), so a record can never be used twice.
        """
        try:
            value = self._variable.read()
        except EfiVariableNotFound:
            return None
        try:
            self._variable.delete()
        except BaseException:
            value.data.wipe()
            raise
        return value.data
