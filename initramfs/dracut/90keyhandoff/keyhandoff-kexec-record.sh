#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# dracut module keyhandoff: move the kexec channel's record out of the initramfs root.
#
# keyhandoff's kexec channel appends a small cpio archive to the initrd of the kernel it
# loads: the directory keyhandoff/ (0700) and in it kexec-record (0400), the sealed handoff
# record (ciphertext: its key is beside the one-time keyslots in the LUKS2 header).  The new
# kernel unpacks it into the initramfs root, which the switch to the real root empties.  This
# moves it to /run/keyhandoff/kexec-record, root's only, where the token plugin
# (libcryptsetup-token-keyhandoff-onetime.so) and `keyhandoff restore` take it.  Nothing is
# read or printed; without the file nothing happens.
src=/keyhandoff/kexec-record
[ -f "$src" ] || exit 0
umask 077
mkdir -p /run/keyhandoff && chmod 0700 /run/keyhandoff || exit 1
mv -f "$src" /run/keyhandoff/kexec-record || exit 1
rmdir /keyhandoff 2>/dev/null
exit 0
