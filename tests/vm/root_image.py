"""The encrypted-root guests: the root file system on LUKS2, opened by a real initramfs.

The base (:mod:`.image`) carries both of Debian 13's generators: ``dracut`` (dracut-core 106,
a systemd initramfs: systemd-cryptsetup asks, and tries LUKS2 token plugins first) and
``initramfs-tools`` (0.148 with cryptsetup-initramfs's ``cryptroot``, Debian's default).  A
root image is built like a plain run image, then, in the guest tree:

1. the guest's ``/etc/crypttab`` names the root as each distribution writes it
   (:func:`root_crypttab`);
2. the generator builds the initramfs once without keyhandoff's part, for the size figure;
3. ``dpkg -i`` installs ``cryptsetup-keyhandoff`` (:mod:`.debs`: the token plugin, built
   against trixie's libcryptsetup, and the initramfs parts), and the generator builds the
   initramfs the machine boots;
4. the packed ext4 is encrypted in place with the person's passphrase (user space
   ``cryptsetup reencrypt --encrypt``: the host has no dm-crypt).

Not part of the base's hash: editing this module costs no rebuild of the base.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

from .debs import ensure_debs, install
from .image import (
    CACHE_ROOT,
    REPO_ROOT,
    STEP_TIMEOUT,
    BaseImage,
    Customize,
    ImageBuildError,
    RunImage,
    _chroot,
    _chroot_mounts,
    _install_project,
    _install_runner,
    _locked,
    _run,
    _writable_copy,
    ensure_base,
    make_ext4,
)

if TYPE_CHECKING:
    import contextlib
    from pathlib import Path

log = logging.getLogger("keyhandoff.vmtest")

#: The LUKS2 UUID of the root disk (fixed, so the kernel command line is known in advance)
#: and the mapping both generators open it as.
ROOT_LUKS_UUID = "5f0e2c1a-8b3d-4e7f-9a62-0c4d8e1b7a93"
ROOT_MAPPING = "vmroot_crypt"
ROOT_DEVICE = f"/dev/disk/by-uuid/{ROOT_LUKS_UUID}"
GENERATORS = ("dracut", "initramfs-tools")
PLUGIN_FILE = "libcryptsetup-token-keyhandoff-onetime.so"
#: What each generator's asker prints on the console when it wants the root's passphrase:
#: systemd-tty-ask-password-agent for systemd-cryptsetup (which names the disk by its
#: description where udev has one); decrypt_keyctl through askpass.
PROMPTS = {
    "dracut": "Please enter passphrase for disk ",
    "initramfs-tools": f"Caching passphrase for {ROOT_MAPPING}:",
}


def root_crypttab(generator: str) -> str:
    """The guest's ``/etc/crypttab`` line for its root, as each distribution writes it.

    initramfs-tools: ``initramfs`` puts the entry in the image (the build runs in a chroot,
    not on the encrypted root), and Debian's ``decrypt_keyctl`` keyscript leaves what the
    person typed in root's ``cryptsetup`` key (60 s; keyhandoff's local-premount script gives
    it 150 s once the root is unlocked, local-bottom again just before the switch), where
    ``keyhandoff capture-initrd`` finds it after the switch;
    with plain askpass cryptroot keeps nothing.  dracut: systemd's
    generator in the initramfs opens the root from ``rd.luks.name=``, and systemd-cryptsetup
    keeps what was typed in the same key (150 s); the real root's entry finds it active.
    """
    if generator == "initramfs-tools":
        options = "luks,initramfs,keyscript=decrypt_keyctl"
    else:
        options = "luks"
    return f"{ROOT_MAPPING} UUID={ROOT_LUKS_UUID} none {options}\n"


def root_append(generator: str) -> str:
    """The kernel command line words that name the encrypted root for ``generator``.

    Both generators mount the root read-only unless told ``rw`` (the guest's fstab has no
    remount that matters here).  dracut must not drop to a shell on a failure: a test waits
    for power-off instead of hanging to its time limit.
    """
    root = f"root=/dev/mapper/{ROOT_MAPPING} rw"
    if generator == "dracut":
        return (f"rd.luks.name={ROOT_LUKS_UUID}={ROOT_MAPPING} {root} rd.shell=0 "
                "rd.emergency=poweroff")
    return f"{root} panic=-1"


def _generate_initramfs(rootfs: Path, generator: str, version: str, out: Path,
                        build_log: Path) -> None:
    """Run the real generator in the guest tree (chroot); the image lands at ``out``."""
    inside = f"tmp/kh-initrd-{os.getpid()}.img"
    if generator == "dracut":
        _chroot(rootfs, "dracut", "--force", "--no-hostonly", "--kver", version,
                "--add", "systemd crypt", "--omit", "plymouth", f"/{inside}", version,
                log_file=build_log)
    else:
        _chroot(rootfs, "mkinitramfs", "-o", f"/{inside}", version, log_file=build_log)
    shutil.move(rootfs / inside, out)


def initramfs_files(rootfs: Path, generator: str, initrd: Path) -> str:
    """The file list of ``initrd``, by the generator's own lister (run in the guest tree)."""
    inside = rootfs / "tmp/kh-list.img"
    shutil.copyfile(initrd, inside)
    try:
        if generator == "dracut":
            return _chroot(rootfs, "lsinitrd", "/tmp/kh-list.img")
        return _chroot(rootfs, "lsinitramfs", "/tmp/kh-list.img")
    finally:
        inside.unlink()


def _ours(listing: str) -> list[str]:
    """The lines of a generator's file list that are keyhandoff's: files, a dracut module.

    (lsinitrd also prints the dracut command line, which names the module in ``--omit``.)
    """
    return [line for line in listing.splitlines()
            if line.rstrip().endswith(("/keyhandoff", PLUGIN_FILE))
            or line.strip() == "keyhandoff"]


def reencryption_lock() -> contextlib.AbstractContextManager[None]:
    """One ``cryptsetup reencrypt --encrypt`` at a time on this machine.

    cryptsetup locks a reencryption by the volume's UUID ("Reencryption process is already
    running"), and the images of a scenario family share one fixed UUID: two pytest-xdist
    workers encrypting at once made one of them fail.  A few seconds each.
    """
    return _locked(CACHE_ROOT / ".reencrypt.lock", timeout=STEP_TIMEOUT)


def encrypt_root(image: Path, passphrase: bytes) -> None:
    """Encrypt the packed ext4 root in place as LUKS2 (user space: no dm-crypt on the host).

    The device grows by the 16 MiB the header takes; the person's keyslot uses argon2id,
    bounded like the data disk's so that TCG takes seconds, not minutes.
    """
    _run(["truncate", "-s", "+16M", image])
    with reencryption_lock():
        done = subprocess.run(
            ["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size",
             "16M", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory",
             "32768", "--uuid", ROOT_LUKS_UUID, "--batch-mode", "--key-file=-", str(image)],
            input=passphrase, capture_output=True, timeout=STEP_TIMEOUT, check=False,
            # reencrypt writes its temporary header (LUKS2-temp-<UUID>.new) in the working
            # directory: the image's own, not one another worker shares
            cwd=image.parent,
        )
    if done.returncode != 0:
        msg = f"cryptsetup reencrypt --encrypt failed: {done.stderr.decode(errors='replace')}"
        raise ImageBuildError(msg)


def build_root_luks_image(
    workdir: Path,
    *,
    generator: str,
    passphrase: bytes,
    customize: Customize | None = None,
    project: Path = REPO_ROOT,
    base: BaseImage | None = None,
) -> RunImage:
    """``workdir/root.img`` with the root file system on LUKS2, and its own initramfs."""
    if generator not in GENERATORS:
        msg = f"unknown initramfs generator {generator!r}; choose from {GENERATORS}"
        raise ImageBuildError(msg)
    base = base or ensure_base()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    build_log = workdir / "image-build.log"
    root_image = workdir / "root.img"
    initrd = workdir / "initrd.img"
    plain = workdir / "initrd-without-keyhandoff.img"
    with _writable_copy(base.rootfs, workdir) as rootfs:
        installed, report = _install_project(rootfs, project, build_log)
        if not installed:
            raise ImageBuildError(report)
        _install_runner(rootfs)
        if customize is not None:
            customize(rootfs)
        (rootfs / "etc/crypttab").write_text(root_crypttab(generator))
        (rootfs / "etc/fstab").write_text(f"/dev/mapper/{ROOT_MAPPING} / ext4 defaults 0 1\n")
        # First the initramfs as the machine had it before cryptsetup-keyhandoff (the size
        # figure), then the package, then the initramfs the machine boots.
        with _chroot_mounts(rootfs):
            _generate_initramfs(rootfs, generator, base.kernel_version, plain, build_log)
        install(rootfs, ensure_debs(project), ("cryptsetup-keyhandoff",), build_log)
        with _chroot_mounts(rootfs):
            _generate_initramfs(rootfs, generator, base.kernel_version, initrd, build_log)
            listing = initramfs_files(rootfs, generator, initrd)
            without = initramfs_files(rootfs, generator, plain)
        if not _ours(listing):
            msg = f"the {generator} initramfs lacks keyhandoff's token plugin"
            raise ImageBuildError(msg)
        if _ours(without):
            msg = f"the {generator} initramfs built without keyhandoff still has a part of it"
            raise ImageBuildError(msg)
        make_ext4(rootfs, root_image, label="vmroot")
    packed = time.monotonic()
    encrypt_root(root_image, passphrase)
    log.info("vm image: %s root on LUKS2 in %.1fs (encryption %.1fs); initramfs %d bytes, "
             "%d without keyhandoff's part", generator, time.monotonic() - started,
             time.monotonic() - packed, initrd.stat().st_size, plain.stat().st_size)
    return RunImage(
        base=base, root_image=root_image, project_installed=True, project_report=report,
        own_initrd=initrd, append=root_append(generator), generator=generator,
        initrd_without_keyhandoff=plain.stat().st_size,
    )
