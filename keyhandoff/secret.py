"""The one owner of passphrase bytes.

A :class:`Secret` holds its bytes in a ``bytearray`` that it overwrites with zeros on
:meth:`Secret.wipe` (also on leaving a ``with`` block).  It has no ``__str__``, a redacted
``repr``, refuses pickling and copying, and compares in constant time.  Python may still
make copies we cannot reach (see SECURITY.md, "What Python cannot do"): the rule in this
code base is that a passphrase only ever exists as a ``Secret`` or as a short-lived view of
one passed straight to C.
"""

from __future__ import annotations

import contextlib
from _operator import _compare_digest
from typing import TYPE_CHECKING, NoReturn, Self

from keyhandoff.errors import (
    SecretError,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["MAX_PASSPHRASE", "Secret", "SecretError"]

#: systemd's querier reads one datagram into a 2049-byte buffer ('+' and up to 2048 bytes).
MAX_PASSPHRASE = 2048


class Secret:
    """Passphrase bytes with a single owner that wipes them.

    Construct from a ``bytearray`` (taken over and wiped by this object) or from a buffer
    (copied; the caller remains responsible for the original).
    """

    __slots__ = ("_buf", "_wiped")

    def __init__(self, data: bytearray | bytes | memoryview, *, allow_empty: bool = False) -> None:
        if isinstance(data, bytearray):
            self._buf = data  # take ownership: the caller's buffer is wiped with us
        else:
            self._buf = bytearray(data)
        self._wiped = False
        if not allow_empty and not self._buf:
            self.wipe()
            raise SecretError("passphrase is empty")

    @classmethod
    def passphrase(cls, data: bytearray | bytes | memoryview) -> Secret:
        """A LUKS/systemd passphrase: 1..2048 bytes, no NUL (NUL separates cache entries)."""
        secret = cls(data)
        try:
            secret.check_passphrase()
        except SecretError:
            secret.wipe()
            raise
        return secret

    def check_passphrase(self) -> None:
        """Raise :class:`SecretError` unless this is 1..2048 bytes without NUL."""
        if self._wiped:
            raise SecretError("secret was wiped")
        if not self._buf:
            raise SecretError("passphrase is empty")
        if len(self._buf) > MAX_PASSPHRASE:
            raise SecretError(f"passphrase is longer than {MAX_PASSPHRASE} bytes")
        if 0 in self._buf:
            raise SecretError("passphrase contains a NUL byte")

    def view(self) -> memoryview:
        """A read-only view of the bytes.  Valid until :meth:`wipe`; do not keep it."""
        if self._wiped:
            raise SecretError("secret was wiped")
        return memoryview(self._buf).toreadonly()

    def buffer(self) -> bytearray:
        """The underlying buffer, for ``ffi.from_buffer``.  Do not keep or copy it."""
        if self._wiped:
            raise SecretError("secret was wiped")
        return self._buf

    def copy(self) -> Secret:
        """An independent Secret with the same bytes (its own buffer, wiped separately)."""
        return Secret(bytearray(self.view()), allow_empty=True)

    def wipe(self) -> None:
        """Overwrite the bytes with zeros and release them.  Idempotent; never raises.

        The zeros are written in place, so a live view (a ``memoryview`` somebody kept, a
        buffer C still holds) sees them too.  Such a view pins the storage: it cannot be
        shrunk then, and the zeroed buffer is released when the last view goes.  Either
        way the Secret is wiped from here on.
        """
        buf = self._buf
        buf[:] = bytes(len(buf))  # same length: a memcpy into place, allowed despite views
        self._wiped = True
        with contextlib.suppress(BufferError):
            del buf[:]

    @property
    def wiped(self) -> bool:
        """True once :meth:`wipe` ran."""
        return self._wiped

    def __len__(self) -> int:
        return 0 if self._wiped else len(self._buf)

    def __bool__(self) -> bool:
        return not self._wiped

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # the C function behind hmac.compare_digest, without loading OpenSSL (+4 MiB RSS)
        return _compare_digest(self._buf, other._buf)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by content

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else f"{len(self._buf)} bytes"
        return f"<Secret {state}>"

    def __str__(self) -> NoReturn:
        raise TypeError("a Secret has no text form")

    def __format__(self, spec: str) -> NoReturn:
        raise TypeError("a Secret has no text form")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("use Secret.copy()")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("use Secret.copy()")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()
