"""The exception tree: one module, sentences for people, the errno kept as a field."""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil

import pytest

import keyhandoff
from keyhandoff import cli, errors, keyring


def test_a_failed_system_call_reads_as_a_sentence_and_keeps_its_errno():
    # A real failure: the kernel has no key under this serial (ENOKEY).
    with pytest.raises(errors.KeyNotFound) as info:
        keyring.read(0x7FFFFFF0)
    assert info.value.errno == errno.ENOKEY
    assert "[Errno" not in str(info.value)
    assert str(info.value).startswith("read key ")


def test_every_key_unavailable_error_shares_one_base():
    for cls in (errors.KeyNotFound, errors.KeyExpired, errors.KeyRevoked, errors.MalformedKey):
        assert issubclass(cls, errors.KeyUnavailable)
    assert not issubclass(errors.PermissionDenied, errors.KeyUnavailable)


def test_every_exception_class_is_defined_in_errors():
    # Private parser-internal control flow (onetime._Refused) is the one exception allowed.
    stray = []
    for info in pkgutil.iter_modules(keyhandoff.__path__, "keyhandoff."):
        if info.name in {"keyhandoff.errors", "keyhandoff.__main__"}:  # __main__ runs the CLI
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not name.startswith("_")):
                stray.append(f"{info.name}.{name}")
    assert stray == []


def test_cli_turns_an_invalid_argument_into_one_line_and_exit_2(monkeypatch, capsys):
    # The command is replaced by one real library call given a value it does not accept
    # (no command line reaches it today: argparse checks every option first).
    monkeypatch.setattr(cli, "cmd_status", lambda _args: keyring.set_timeout(1, -1))
    assert cli.main(["status"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "keyhandoff: timeout must not be negative\n"
