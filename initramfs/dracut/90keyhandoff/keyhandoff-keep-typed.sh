#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# dracut module keyhandoff: let what the person typed for the root wait for the real root.
#
# systemd-cryptsetup leaves what was typed in root's user keyring as the user key
# "cryptsetup", with a 150 s timeout counted from the typing (systemd-ask-password's keyring
# cache).  `keyhandoff capture-initrd` reads it after the switch to the real root; the unlock,
# the root's fsck and mount, the switch and the real root's early boot must fit in those
# 150 s, and a slow machine (a long fsck, a second disk's prompt, a busy virtual machine) can
# take longer.  keyhandoff-keep-typed.service runs this with 150 when the volumes are open
# and with 300 just before the switch: each time the key's timeout is set to that many
# seconds, counted from there (initramfs/README.md has why 300).  The kernel still enforces
# it; nothing is read, written or printed, and without keyctl or without the key nothing
# happens.
seconds=${1:-150}
case $seconds in
'' | *[!0-9]*) exit 0 ;;
esac
command -v keyctl >/dev/null 2>&1 || exit 0
id=$(keyctl search @u user cryptsetup 2>/dev/null) || exit 0
keyctl timeout "$id" "$seconds" 2>/dev/null
exit 0
