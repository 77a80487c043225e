"""Well-known names, each defined once.

The paths, key descriptions, identifiers and fixed timeouts keyhandoff shares with systemd,
the kernel, the firmware, LUKS2 headers and the PAM module.

Modules import them from here (several keep a module-level alias under their old name,
e.g. ``cache.VOLUME_PREFIX``, ``efi.VENDOR_GUID``, ``statelock.LOCK_DIR``, so existing
callers keep working).  This module imports nothing: naming a key loads no library.

SECURITY.md's "Secret lifecycle" table cites these names.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ASK_DIR",
    "CHAIN_KEY",
    "CONFIG_PATH",
    "EFI_PROBE_NAME",
    "EFI_RECORD_NAME",
    "EFI_VENDOR_GUID",
    "KEXEC_LOADED_MARK",
    "KEXEC_RECORD",
    "KEXEC_SEGMENT_RECORD",
    "KEYRING_NAME",
    "KEY_PERM",
    "KEY_PREFIX",
    "LOGIN_KEY",
    "MAX_KEY_TIMEOUT",
    "ONETIME_PREFIX",
    "RECORD_BLOB_KEY",
    "RUN_DIR",
    "SEALED_PREFIX",
    "SYSTEMD_KEYNAME",
    "SYSTEMD_PERM",
    "SYSTEMD_TIMEOUT",
    "TOKEN_TYPE",
    "VK_PREFIX",
    "VOLUME_PREFIX",
]

# --- systemd ------------------------------------------------------------------------------

#: systemd's password-agent directory: ``ask.*`` files and their reply sockets.
ASK_DIR: Final = "/run/systemd/ask-password"
#: The user key in root's ``@u`` where systemd-cryptsetup caches what it was given
#: (``keyctl``'s "cryptsetup" in ask-password-api.c); pam_gdm reads it too.
SYSTEMD_KEYNAME: Final = "cryptsetup"
#: Seconds systemd gives its ``cryptsetup`` key (``KEYRING_TIMEOUT_USEC``, 150 s).
SYSTEMD_TIMEOUT: Final = 150
#: The permissions systemd 252 leaves on that key: the kernel default for a root user key.
SYSTEMD_PERM: Final = 0x3F010000

# --- our kernel keys ------------------------------------------------------------------------

#: Our named keyring, linked into root's ``@u``: it holds every key below.
KEYRING_NAME: Final = "keyhandoff"
#: Every key description of ours starts with this.
KEY_PREFIX: Final = "keyhandoff:"
#: ``keyhandoff:luks:<UUID>``: a volume's passphrase (padded), from the cache or a restore.
VOLUME_PREFIX: Final = KEY_PREFIX + "luks:"
#: ``keyhandoff:onetime:<UUID>``: a volume's restored one-time key (text form, padded), which
#: the agent answers that volume's prompt from before its passphrase; ``finish`` forgets it.
ONETIME_PREFIX: Final = KEY_PREFIX + "onetime:"
#: The armed chain's state (not secret, not padded); its timeout is the chain's deadline.
CHAIN_KEY: Final = KEY_PREFIX + "chain"
#: ``keyhandoff:vk:<UUID>``: a volume key kept while a chain needs another re-arm.
VK_PREFIX: Final = KEY_PREFIX + "vk:"
#: ``keyhandoff:sealed:<UUID>``: the login passphrase sealed under that volume's key.
SEALED_PREFIX: Final = KEY_PREFIX + "sealed:"
#: The one-shot key pam_keyhandoff.so reads (and invalidates) by default.
LOGIN_KEY: Final = KEY_PREFIX + "login"
#: The sealed handoff record, exactly as in the EFI variable minus its 4 attribute bytes (not
#: padded: it is ciphertext).  Published by the initramfs token plugin when it takes the
#: variable (timeout min(not_after - now, 600) s), so further volumes of the same record find
#: it; the real root's restore takes it from here first and removes it.
RECORD_BLOB_KEY: Final = KEY_PREFIX + "record"
#: Seconds at most in the timeout of any key of ours (a handoff chain re-puts its keys).
MAX_KEY_TIMEOUT: Final = 86400
#: Possessor: view, read, write, search, link, setattr; owning uid: view; nobody else
#: (``keyring.PERM_POSSESSOR_ALL | keyring.PERM_USER_VIEW``).
KEY_PERM: Final = 0x3F000000 | 0x00010000

# --- the firmware and the LUKS2 header -----------------------------------------------------

#: keyhandoff's vendor GUID: every EFI variable we write lives under it.
EFI_VENDOR_GUID: Final = "7ec2927b-59f1-4933-8945-01041e7137eb"
#: The EFI variable that carries the handoff record across a full reboot.  (Named before the
#: record module was; the name stays, since it is what armed machines have in NVRAM.)
EFI_RECORD_NAME: Final = "KeyHandoffStash"
#: Scratch EFI variable of the writability probe; never holds anything but a marker.
EFI_PROBE_NAME: Final = "KeyHandoffProbe"
#: The LUKS2 token type that marks our one-time keyslots.
TOKEN_TYPE: Final = "keyhandoff-onetime"  # noqa: S105  # a LUKS2 token type name

# --- files --------------------------------------------------------------------------------

#: Root's private runtime directory (the state lock, the per-boot step markers).
RUN_DIR: Final = "/run/keyhandoff"
#: The kexec channel's record in the new kernel's initramfs, as the loaded initrd segment
#: carries it (relative to the initramfs root).  The initramfs step moves it to
#: :data:`KEXEC_RECORD` before any volume is opened (``/run`` survives the switch to the
#: real root; the initramfs root does not).
KEXEC_SEGMENT_RECORD: Final = "keyhandoff/kexec-record"
#: Where that record waits, root's only, until the token plugin or ``restore`` takes it.
KEXEC_RECORD: Final = RUN_DIR + "/kexec-record"
#: Marks that the kexec image loaded now is ours (the boot id of the arming boot), so that
#: ``disarm`` unloads only what keyhandoff loaded.
KEXEC_LOADED_MARK: Final = RUN_DIR + "/kexec-loaded"
#: The configuration file.
CONFIG_PATH: Final = "/etc/keyhandoff/keyhandoff.conf"
