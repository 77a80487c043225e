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

from passphrases import MARKER

from keyhandoff import keyring
from keyhandoff.cache import PassphraseCache

IN_CI = bool(os.environ.get("CI"))

#: pam_module, pam_gdm, checker: real PAM stacks for any test that asks for them
pytest_plugins = ["pam_stack", "stack_guard"]  # stack_guard: the Debian-stack pass


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


def _user_keyring_contents() -> set[tuple[int, int]]:
    """(parent, serial) for every key in root's @u and in the keyrings directly inside it."""
    user = keyring.get_keyring_id(keyring.USER, create=True)
    found = {(user, s) for s in keyring.list_keyring(user)}
    for _parent, serial in list(found):
        with contextlib.suppress(OSError):
            if keyring.describe(serial).key_type == "keyring":
                found |= {(serial, s) for s in keyring.list_keyring(serial)}
    return found


@pytest.fixture(autouse=True)
def fresh_session_keyring():
    """A fresh session keyring per test, possessing @u; nothing of the test left in @u."""
    keyring.join_session_keyring()
    user = keyring.get_keyring_id(keyring.USER, create=True)
    keyring.link(user, keyring.SESSION)
    PassphraseCache().keyring_serial  # noqa: B018  # the container itself is not a leftover
    before = _user_keyring_contents()
    yield keyring.get_keyring_id(keyring.SESSION)
    # Re-possess @u: a test may have swapped session keyrings.
    keyring.join_session_keyring()
    keyring.link(user, keyring.SESSION)
    left = _user_keyring_contents() - before
    info = {i.serial: i for i in keyring.proc_keys({s for _p, s in left})}
    names = []
    for parent, serial in left:
        key = info.get(serial)
        if key is not None and not key.dead and key.seconds_left != 0:
            names.append(key.description)
        # expired or dead keys are unreadable already; unlink them so the GC takes them now
        with contextlib.suppress(OSError):
            keyring.unlink(serial, parent)
    if names:
        pytest.fail(f"test left keys in root's @u: {sorted(names)}")


@pytest.fixture
def cache():
    """keyhandoff's own cache in root's @u; every entry a test put there is forgotten.

    (Deliberately shadows pytest's built-in ``cache`` fixture, which no test here uses.)
    """
    c = PassphraseCache()
    yield c
    for e in c.entries():
        c.forget(e.volume)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail any test whose captured stdout, stderr or log contains a test passphrase."""
    outcome = yield
    report = outcome.get_result()
    text = "\n".join(content for _name, content in report.sections)
    if MARKER.decode() in text and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"a test passphrase appeared in the output of {item.nodeid} ({report.when})"
        )
