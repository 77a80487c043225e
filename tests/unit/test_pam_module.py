"""The Python half of pam_keyhandoff.so without PAM: options, entry selection, key handling.

The keys live in the test's own session keyring (conftest gives each test a fresh one), so
nothing here touches root's @u.
"""

from __future__ import annotations

import pytest
from passphrases import make

from keyhandoff import keyring, pam_module
from keyhandoff.cache import KEY_PERM
from keyhandoff.errors import KeyNotFound, KeyRevoked
from keyhandoff.pam_module import (
    PAM_AUTHINFO_UNAVAIL,
    PAM_SERVICE_ERR,
    PAM_SUCCESS,
    ModuleOptions,
    OptionError,
    last_entry,
    parse_options,
)


def test_options():
    assert parse_options([]) == ModuleOptions("keyhandoff:login", keep=False)
    assert parse_options(["keyname=cryptsetup", "keep"]) == ModuleOptions("cryptsetup", keep=True)
    for bad in (["kep"], ["keyname="], ["keyname"], ["debug"]):
        with pytest.raises(OptionError):
            parse_options(bad)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"a", b"a"),
        (b"a\0b", b"b"),
        (b"wrong\0right\0", b"right"),  # older writers' trailing NUL
        (b"a\0\0", b"a"),
        (b"", None),
        (b"\0", None),
        (b"\0\0b", b"b"),
    ],
)
def test_last_entry(payload, expected):
    buf = bytearray(payload)
    with memoryview(buf) as view:
        entry = last_entry(view)
        got = None if entry is None else bytes(entry)
        if entry is not None:
            entry.release()
    assert got == expected


def _put(description: str, payload: bytes) -> int:
    serial = keyring.add("user", description, payload, keyring.SESSION)
    keyring.set_perm(serial, KEY_PERM)
    keyring.set_timeout(serial, 60)
    return serial


class _Sink:
    def __init__(self) -> None:
        self.token = bytearray()
        self.logged: list[tuple[int, str]] = []

    def deliver(self, entry: memoryview) -> None:
        self.token[:] = entry

    def log(self, priority: int, message: str) -> None:
        self.logged.append((priority, message))


def _run(args: list[str], sink: _Sink, token_size: int = 2049) -> int:
    return pam_module.authenticate(args, token_size=token_size, deliver=sink.deliver,
                                   log=sink.log)


def test_hands_last_entry_and_invalidates():
    first, last = make("unit-a"), make("unit-b")
    desc = "keyhandoff:unit-test"
    _put(desc, first + b"\0" + last)
    sink = _Sink()
    assert _run([f"keyname={desc}"], sink) == PAM_SUCCESS
    assert bytes(sink.token) == last
    # until the GC runs, find's /proc/keys fallback may still list it, as revoked
    with pytest.raises((KeyNotFound, KeyRevoked)):
        keyring.find("user", desc)
    assert all(last.decode() not in m and first.decode() not in m for _p, m in sink.logged)


def test_keep_and_too_long():
    desc = "keyhandoff:unit-test-keep"
    serial = _put(desc, make("unit-keep"))
    sink = _Sink()
    assert _run([f"keyname={desc}", "keep"], sink, token_size=8) == PAM_AUTHINFO_UNAVAIL
    assert sink.token == bytearray()
    assert keyring.find("user", desc) == serial
    keyring.invalidate(serial)


def test_missing_key_and_bad_option():
    sink = _Sink()
    assert _run(["keyname=keyhandoff:unit-missing"], sink) == PAM_AUTHINFO_UNAVAIL
    assert _run(["nonsense"], sink) == PAM_SERVICE_ERR
    assert sink.token == bytearray()
