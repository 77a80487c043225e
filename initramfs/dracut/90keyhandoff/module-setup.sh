#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# dracut module keyhandoff: keyhandoff's LUKS2 token plugin in a systemd initramfs.
#
# systemd-cryptsetup tries every LUKS2 token through libcryptsetup's external token plugins
# before it asks for a passphrase, whenever no key file is configured; so the plugin
# libcryptsetup-token-keyhandoff-onetime.so in libcryptsetup's token directory is all the
# initramfs needs to open the root: no hook, no crypttab change.  Installed like dracut's
# own 91tpm2-tss and 91fido2 install systemd's plugins (inst_libdir_file "cryptsetup/..."),
# with the libraries it links (libcryptsetup, libcrypto, json-c).  The record arrives in
# efivarfs, which 00systemd's module installs and systemd mounts, or, after a kexec, in the
# loaded initrd segment.
#
# Where keyctl (keyutils) is installed, one small unit comes along, keyhandoff-keep-typed:
# when the person typed, what systemd-cryptsetup kept of it for 150 s gets 150 s again once
# the volumes are open and 300 s just before the switch, so that the real root's
# `keyhandoff capture-initrd` finds it on a slow machine too (keyhandoff-keep-typed.sh).
# keyhandoff-kexec-record.service always comes along: after a `systemctl kexec` into a
# kernel keyhandoff's kexec channel loaded, it moves the record that the loaded initrd
# segment carried from the initramfs root to /run/keyhandoff before any volume is opened
# (keyhandoff-kexec-record.sh; mkdir, chmod and mv are dracut's own 99base tools).
# No Python and no other part of keyhandoff goes into the image.

keyhandoff_plugin=libcryptsetup-token-keyhandoff-onetime.so

# called by dracut
check() {
    local _dir
    require_binaries "$systemdutildir"/systemd-cryptsetup || return 1
    for _dir in $libdirs; do
        [[ -f $dracutsysrootdir$_dir/cryptsetup/$keyhandoff_plugin ]] && return 0
    done
    dinfo "keyhandoff: $keyhandoff_plugin is not installed in libcryptsetup's token directory"
    return 1
}

# called by dracut
depends() {
    # dracut 102+ (Debian 13's 106) moved systemd-cryptsetup out of 90crypt into its own
    # module, which an explicit module list (-m) could leave out; dracut 059 (Debian 12) has
    # no such module, so name it only where it exists.
    local _deps="crypt systemd" _m
    for _m in "$dracutbasedir"/modules.d/[0-9][0-9]systemd-cryptsetup; do
        [[ -d $_m ]] && _deps+=" systemd-cryptsetup"
    done
    echo "$_deps"
    return 0
}

# called by dracut
install() {
    inst_libdir_file "cryptsetup/$keyhandoff_plugin"
    inst_multiple mkdir chmod mv rmdir
    inst_script "$moddir/keyhandoff-kexec-record.sh" /usr/lib/keyhandoff/kexec-record
    inst_simple "$moddir/keyhandoff-kexec-record.service" \
        "$systemdsystemunitdir/keyhandoff-kexec-record.service"
    $SYSTEMCTL -q --root "$initdir" enable keyhandoff-kexec-record.service
    if ! find_binary keyctl >/dev/null; then
        dinfo "keyhandoff: no keyctl (apt-get install keyutils): what is typed in the initramfs keeps systemd's 150 s only"
        return 0
    fi
    inst_multiple keyctl
    inst_script "$moddir/keyhandoff-keep-typed.sh" /usr/lib/keyhandoff/keep-typed
    inst_simple "$moddir/keyhandoff-keep-typed.service" \
        "$systemdsystemunitdir/keyhandoff-keep-typed.service"
    $SYSTEMCTL -q --root "$initdir" enable keyhandoff-keep-typed.service
}
