"""Hand the disk passphrase to the login path, so the login keyring unlocks after autologin.

Two keys in root's user keyring, both with a short kernel timeout:

* systemd's ``cryptsetup`` key, in systemd's format, with the passphrase as the **last**
  entry: the stock ``pam_gdm`` (and ``pam_systemd_loadkey``) take the last entry and set
  PAM_AUTHTOK, which ``pam_gnome_keyring`` uses to unlock the ``login`` collection;
* ``keyhandoff:login``, a one-shot key that ``pam_keyhandoff.so`` reads and invalidates,
  for display managers without pam_gdm; its payload is padded (:func:`keyhandoff.keys.pad`:
  4096 bytes, length first) so ``/proc/key-users`` does not show the passphrase's length.

Neither key is ever visible without its timeout: each is published with
:func:`keyhandoff.keys.publish` (made in this thread's keyring, given its permissions and
timeout, and only then linked into ``@u``).

Readers need possession of ``@u`` (``gdm.service`` has ``KeyringMode=shared``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import journal, keyring, keys, names
from keyhandoff.cache import KEY_PERM, SystemdCache
from keyhandoff.errors import KeyUnavailable

if TYPE_CHECKING:
    from keyhandoff.secret import Secret

__all__ = ["LOGIN_KEY", "LoginHandoff", "clear", "handoff"]

LOGIN_KEY: Final = names.LOGIN_KEY


@dataclass(frozen=True, slots=True)
class LoginHandoff:
    """What was handed over: key serials and their timeout.  Never the passphrase."""

    systemd_key: str
    login_key: int
    timeout: int


def handoff(
    passphrase: Secret, *, timeout: int, systemd_keyname: str = names.SYSTEMD_KEYNAME,
) -> LoginHandoff:
    """Put ``passphrase`` where pam_gdm and pam_keyhandoff.so find it, for ``timeout`` s."""
    passphrase.check_passphrase()
    sc = SystemdCache(keyname=systemd_keyname)
    # pam_gdm takes the *last* entry: drop an existing copy so ours is appended at the end.
    sc.remove([passphrase])
    sc.add([passphrase], timeout=timeout)
    # replace: the old one-shot key is destroyed while we possess it (a displaced old key
    # could no longer be destroyed by us)
    serial = keys.publish(LOGIN_KEY, passphrase, keyring_serial=keyring.USER, timeout=timeout,
                          perm=KEY_PERM, padded=True, replace=True)
    journal.log(journal.Event.LOGIN_HANDOFF,
                f"passphrase handed to the login path for {timeout} s", timeout=timeout)
    return LoginHandoff(systemd_keyname, serial, timeout)


def clear() -> bool:
    """Remove the one-shot login key; return whether there was one.

    systemd's ``cryptsetup`` key is left to its own timeout: systemd owns it.
    """
    try:
        keyring.invalidate(
            keyring.find_trusted("user", LOGIN_KEY, perm=KEY_PERM, within=keyring.USER),
        )
    except KeyUnavailable:
        return False
    return True
