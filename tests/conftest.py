"""Fixtures shared by every test.

* Each test runs in a fresh anonymous session keyring with root's ``@u`` linked into it
  (what ``KeyringMode=shared`` gives a unit), and fails if it leaves a key in ``@u`` or in
  our ``keyhandoff`` keyring that was not there before.
* Whatever a test printed or logged is scanned for test passphrases (tests/passphrases.py);
  a hit fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from passphrases import MARKER  # noqa: E402

from keyhandoff import keyring  # noqa: E402
from keyhandoff.errors import KeyNotFound  # noqa: E402

IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, what: str, install: str) -> None:
    """Skip loudly with the install command when a real part is missing (fail in CI)."""
    if condition:
        return
    message = f"{what} is missing; install with: {install}"
    if IN_CI:
        pytest.fail(f"CI must have every real part: {message}")
    pytest.skip(message)


def require_binary(name: str, install: str) -> str:
    path = shutil.which(name)
    require(path is not None, name, install)
    assert path is not None
    return path


def _user_keyring_contents() -> set[int]:
    user = keyring.get_keyring_id(keyring.USER, create=True)
    found = set(keyring.list_keyring(user))
    for serial in list(found):
        with contextlib.suppress(Exception):
            if keyring.describe(serial).key_type == "keyring":
                found |= {(serial << 32) | s for s in keyring.list_keyring(serial)}
    return found


@pytest.fixture(autouse=True)
def fresh_session_keyring():
    """A fresh session keyring per test, possessing @u; nothing of the test left in @u."""
    keyring.join_session_keyring()
    user = keyring.get_keyring_id(keyring.USER, create=True)
    keyring.link(user, keyring.SESSION)
    before = _user_keyring_contents()
    yield keyring.get_keyring_id(keyring.SESSION)
    # Re-possess @u: a test may have swapped session keyrings.
    keyring.join_session_keyring()
    keyring.link(user, keyring.SESSION)
    left = _user_keyring_contents() - before
    names = []
    for item in left:
        serial = item & 0xFFFFFFFF
        try:
            names.append(keyring.describe(serial).description)
            keyring.invalidate(serial)
        except KeyNotFound:
            continue  # expired/garbage-collected meanwhile: not a leftover
        except OSError as exc:  # an expired key can still be listed; it cannot be read
            names.append(f"serial {serial} ({exc.strerror})")
            with contextlib.suppress(OSError):
                keyring.unlink(serial, item >> 32 if item >> 32 else user)
    if names:
        pytest.fail(f"test left keys in root's @u: {sorted(names)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001
    """Fail any test whose captured stdout, stderr or log contains a test passphrase."""
    outcome = yield
    report = outcome.get_result()
    text = "\n".join(content for _name, content in report.sections)
    if MARKER.decode() in text and report.passed:
        report.outcome = "failed"
        report.longrepr = f"a test passphrase appeared in the output of {item.nodeid} ({report.when})"
