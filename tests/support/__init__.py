"""Helpers shared by the unit and integration suites (imported as ``support``).

``tests/`` is the import root: pytest puts the directory of the root ``conftest.py`` on
``sys.path`` (its default ``prepend`` import mode; tests/ itself is not a package, so the
checkout's own ``keyhandoff`` never lands on the path, which the Debian-stack pass relies
on: tests/support/stack_guard.py).  Test modules import helpers from here, never from
``conftest`` or from one another.

* :mod:`support.parts`: ``require`` / ``require_binary``, the only way a test skips.
* :mod:`support.passphrases`: distinctive test passphrases (the leak-scan marker).
* :mod:`support.luks_images`, :mod:`support.luks_headers`: real LUKS images via cryptsetup
  (a pytest plugin: the ``person`` and ``image`` fixtures).
* :mod:`support.scratch_efi`: libefivar on a scratch efivarfs directory, in a child (a
  pytest plugin: the ``efivars`` fixture).
* :mod:`support.agent_process`: the real agent and real systemd queriers.
* :mod:`support.pam_stack`: real Linux-PAM stacks (a pytest plugin: fixtures).
* :mod:`support.record_keys`, :mod:`support.cryptography38`: independent record crypto.
* :mod:`support.stack_guard`: the Debian-stack pass's guard (a pytest plugin).
* :mod:`support.fuzzers`: the fuzz/ scripts, loaded by path for bounded runs.
"""
