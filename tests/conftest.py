"""Fixtures shared by every test.

* Each test runs in a fresh anonymous session keyring with root's ``@u`` linked into it
  (what ``KeyringMode=shared`` gives a unit), and fails if it leaves a key in ``@u`` or in
  our ``keyhandoff`` keyring that was not there before.
* Whatever a test printed or logged is scanned for test passphrases (tests/support/passphrases.py);
  a hit fails the test.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, settings
from support.passphrases import MARKER

from keyhandoff import keyring
from keyhandoff.cache import PassphraseCache, SystemdCache

# Hypothesis: no per-example deadline and no too-slow health check.  The suite shares two
# cores with a QEMU guest, so wall-clock limits measure the neighbour, not the code (a test
# that parses a few hundred bytes would fail for the guest's load alone).  Each property
# sets its own max_examples; this is only the default for those that do not.
settings.register_profile("keyhandoff", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("keyhandoff")

#: pam_module, pam_gdm, checker: real PAM stacks; person, image: a LUKS2 image file;
#: efivars: a scratch efivarfs directory; querier: real systemd-ask-password queriers;
#: stack_guard: the Debian-stack pass's guard; built: the Debian packages of this tree
pytest_plugins = [
    "support.agent_process", "support.debian_build", "support.luks_images", "support.pam_stack",
    "support.scratch_efi", "support.stack_guard", "support.vm_progress",
]


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
def cache(request):
    """keyhandoff's own cache in root's @u; every passphrase a test put there is forgotten.

    In a module marked ``pytest.mark.arms`` (tests that arm a handoff), everything armed
    goes too: ``update.disarm``, systemd's ``cryptsetup`` key and the one-shot login key.
    (Deliberately shadows pytest's built-in ``cache`` fixture, which no test here uses.)
    """
    c = PassphraseCache()
    yield c
    if request.node.get_closest_marker("arms"):
        from keyhandoff import login, update  # noqa: PLC0415  # only the arming modules

        update.disarm(quiet=True, volumes=[])
        SystemdCache().clear()
        login.clear()
    c.forget_all()


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
