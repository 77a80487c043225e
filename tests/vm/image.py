"""Build (or reuse) the Debian trixie guest for the UEFI VM tests.

Two layers:

* The **base** (slow, cached): a debootstrapped trixie root filesystem with systemd, udev,
  cryptsetup, python3, gnome-keyring and the build dependencies of keyhandoff, the trixie
  kernel's modules, the unpacked kernel, ``pam_gdm.so`` from trixie's ``gdm3`` and a busybox
  initramfs. It lives under
  ``/var/cache/keyhandoff-vm/<hash>/`` (outside the checkout; ``KEYHANDOFF_VM_CACHE`` overrides
  it); the hash covers the suite, the package list, the mirror and this file's own source, so
  editing any of them builds a new base.
* The **run image** (fast, per run): a copy of the base tree plus this checkout installed for the
  guest's python3 (built in a chroot), the guest-side test runner, and whatever a caller's
  ``customize`` callback adds; packed with ``mkfs.ext4 -d`` (no loop device needed).

Run ``python3 tests/vm/image.py`` to build the base alone (``--rebuild`` forces a new build).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("keyhandoff.vmtest")

SUITE = "trixie"
REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(__file__).resolve().parent / "guest"
CACHE_ROOT = Path(os.environ.get("KEYHANDOFF_VM_CACHE", "/var/cache/keyhandoff-vm"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Installed into the base with debootstrap. python3-ply: debootstrap cannot resolve pycparser's
# virtual dependency on its own. The build tools and -dev packages are debian/control's
# Build-Depends: the packages the guests install are built in a chroot of this base (.debs).
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "udev",
    "systemd-cryptsetup",
    "cryptsetup-bin",
    "libpam-systemd",
    "dbus",
    "kmod",
    "keyutils",
    "efivar",
    "e2fsprogs",
    "util-linux",
    "procps",
    "iproute2",
    "python3",
    "python3-cffi",
    "python3-ply",
    "python3-cryptography",
    "python3-pyudev",
    "python3-systemd",
    "python3-setuptools",
    "python3-wheel",
    "python3-build",
    "python3-installer",
    "dpkg-dev",
    "build-essential",
    "debhelper",
    "dh-python",
    "systemd-dev",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "pkg-config",
    "libkeyutils-dev",
    "libefivar-dev",
    "libcryptsetup-dev",
    "libpam0g-dev",
    "libpam-modules",
    "pamtester",
    # The encrypted-root guests: both initramfs generators (initramfs-tools with Debian's
    # cryptroot; dracut-core, a systemd initramfs) and what the token plugin builds against.
    # dracut-core and initramfs-tools install side by side (only the "dracut" metapackage
    # conflicts); each run image generates its initramfs with one of them.
    "cryptsetup",
    "cryptsetup-initramfs",
    "initramfs-tools",
    "busybox",
    "dracut-core",
    "zstd",
    "libssl-dev",
    "libjson-c-dev",
    "make",
    # The PackageKit scenarios (demo_packagekit): the real packagekitd with its apt backend
    # (libpk_backend_apt.so is in the packagekit package), pk-offline-update and its unit,
    # and pkcon (packagekit-tools: only a Recommends of packagekit, which debootstrap does not
    # install).  33 packages more than the base had (polkitd, GLib, libappstream5, ...), about
    # 36 MiB installed, 9 MiB to download (trixie's Packages, 1.3.1-1+deb13u1).
    "packagekit",
    "packagekit-tools",
    # The person's login keyring (demo.py's full-reboot scenario): the GNOME keyring daemon and
    # its PAM module as Debian installs them (the daemon's systemd user socket is enabled for
    # every user by its postinst), the per-user D-Bus session bus of systemd's user manager, and
    # secret-tool (libsecret), a Secret Service client.  Trixie's Packages file: 104 packages,
    # about 152 MiB installed and 33 MiB to download, nearly all of it GTK 3 and 4, which
    # gnome-keyring's Depends (gcr, pinentry-gnome3) bring.
    "gnome-keyring",
    "libpam-gnome-keyring",
    "dbus-user-session",
    "libsecret-tools",
)

# Modules the initramfs loads (with their modules.dep closure) to mount a virtio-blk ext4 root.
# crc32c_generic: ext4 asks the crypto API for crc32c; crc32c-intel does not load on TCG's CPU.
INITRD_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

# The serial number the root disk gets in QEMU; the initramfs finds its root by it.
ROOT_SERIAL = "vmroot"

BUILD_TIMEOUT = 1200  # seconds for the whole debootstrap step
STEP_TIMEOUT = 600  # seconds for any other single command

Customize = Callable[[Path], None]


class ImageBuildError(RuntimeError):
    """A step of the guest image build failed; the message names the step and its output."""


@dataclass(frozen=True)
class BaseImage:
    """The cached base: root tree, kernel and initramfs."""

    directory: Path
    rootfs: Path
    kernel: Path
    initrd: Path
    kernel_version: str


@dataclass(frozen=True)
class RunImage:
    """A per-run root disk image built from a base.

    A plain image boots the base's busybox initramfs; an encrypted-root image
    (:func:`build_root_luks_image`) brings its own initramfs, generated in the guest tree by
    a real generator, and the kernel command line that names its root.
    """

    base: BaseImage
    root_image: Path
    project_installed: bool
    project_report: str
    own_initrd: Path | None = None
    #: kernel command line words this image needs (``root=``, ``rd.luks.name=``, ``rw``)
    append: str = ""
    #: for an encrypted root: the generator, and its initramfs size without keyhandoff's part
    generator: str = ""
    initrd_without_keyhandoff: int = 0

    @property
    def kernel(self) -> Path:
        """The kernel to boot with ``-kernel``."""
        return self.base.kernel

    @property
    def initrd(self) -> Path:
        """The initramfs to boot with ``-initrd``."""
        return self.own_initrd or self.base.initrd


def mirror_url() -> str:
    """The Debian mirror the host's apt uses (first ``URIs:`` line ending in ``/debian``)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for match in re.finditer(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def inputs_hash() -> str:
    """Hash of everything that determines the base image."""
    digest = hashlib.sha256()
    digest.update(SUITE.encode())
    digest.update(b"\0" + "\0".join(PACKAGES).encode())
    digest.update(b"\0" + "\0".join(INITRD_MODULES).encode())
    digest.update(b"\0" + mirror_url().encode())
    digest.update(b"\0" + Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def _run(
    argv: Sequence[str | Path],
    *,
    timeout: float = STEP_TIMEOUT,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
) -> str:
    """Run a command with a bound; raise ImageBuildError with its output tail on failure."""
    args = [str(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        msg = f"timed out after {timeout:.0f}s: {' '.join(args)}"
        raise ImageBuildError(msg) from exc
    output = done.stdout + done.stderr
    if log_file is not None:
        with log_file.open("a") as f:
            f.write(f"$ {' '.join(args)}\n{output}\n")
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        msg = f"exit {done.returncode}: {' '.join(args)}\n{tail}"
        raise ImageBuildError(msg)
    return done.stdout


def _chroot_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside ``root`` for the duration of a chroot step."""
    mounted: list[Path] = []
    try:
        for fstype, target in (("proc", "proc"), ("sysfs", "sys")):
            path = root / target
            path.mkdir(exist_ok=True)
            _run(["mount", "-t", fstype, fstype, path], timeout=30)
            mounted.append(path)
        dev = root / "dev"
        dev.mkdir(exist_ok=True)
        _run(["mount", "--bind", "/dev", dev], timeout=30)
        mounted.append(dev)
        yield
    finally:
        for path in reversed(mounted):
            subprocess.run(
                ["umount", "-l", str(path)],
                check=False,
                timeout=30,
                capture_output=True,
            )


def _chroot(
    root: Path, *argv: str, timeout: float = STEP_TIMEOUT, log_file: Path | None = None
) -> str:
    return _run(["chroot", root, *argv], timeout=timeout, env=_chroot_env(), log_file=log_file)


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on ``path``, waiting at most ``timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"could not lock {path} within {timeout:.0f}s (another build running?)"
                    raise ImageBuildError(msg) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _base_from_dir(directory: Path) -> BaseImage:
    version = (directory / "kernel-version").read_text().strip()
    return BaseImage(
        directory=directory,
        rootfs=directory / "rootfs",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_version=version,
    )


def ensure_base(*, rebuild: bool = False) -> BaseImage:
    """Return the cached base for the current inputs, building it first if needed."""
    directory = CACHE_ROOT / inputs_hash()
    with _locked(CACHE_ROOT / ".lock", timeout=BUILD_TIMEOUT + 300):
        if rebuild and directory.exists():
            shutil.rmtree(directory)
        if (directory / "COMPLETE").exists():
            log.info("vm image: reusing cached base %s", directory)
            return _base_from_dir(directory)
        partial = directory.with_name(directory.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        started = time.monotonic()
        try:
            _build_base(partial)
        except BaseException:
            with contextlib.suppress(OSError):
                _unmount_below(partial)
            raise
        (partial / "COMPLETE").write_text(f"{time.monotonic() - started:.1f}\n")
        partial.rename(directory)
        log.info("vm image: base built in %.0fs at %s", time.monotonic() - started, directory)
        _prune_old(directory)
        return _base_from_dir(directory)


def _unmount_below(path: Path) -> None:
    """Lazily unmount anything left mounted under ``path`` after a failed build."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, timeout=30, capture_output=True)


def _prune_old(keep: Path) -> None:
    """Drop bases built for other inputs so the cache does not grow without bound."""
    for entry in CACHE_ROOT.iterdir():
        if (
            entry.is_dir()
            and entry != keep
            and re.fullmatch(r"[0-9a-f]{16}(\.partial)?", entry.name)
        ):
            log.info("vm image: removing stale base %s", entry)
            _unmount_below(entry)
            shutil.rmtree(entry, ignore_errors=True)


def _build_base(directory: Path) -> None:
    rootfs = directory / "rootfs"
    build_log = directory / "build.log"
    mirror = mirror_url()
    t0 = time.monotonic()
    log.info("vm image: debootstrap %s from %s (a few minutes) -> %s", SUITE, mirror, rootfs)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            rootfs,
            mirror,
        ],
        timeout=BUILD_TIMEOUT,
        log_file=build_log,
    )
    log.info("vm image: debootstrap done in %.0fs", time.monotonic() - t0)

    with _chroot_mounts(rootfs):
        t1 = time.monotonic()
        log.info("vm image: downloading the %s kernel and gdm3", SUITE)
        (rootfs / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
        _chroot(rootfs, "apt-get", "update", "-q", log_file=build_log)
        depends = _chroot(rootfs, "apt-cache", "depends", "--important", "linux-image-amd64")
        match = re.search(r"Depends:\s*(linux-image-(\d\S*-amd64))\s*$", depends, re.MULTILINE)
        if match is None:
            msg = f"cannot find the versioned kernel package in:\n{depends}"
            raise ImageBuildError(msg)
        kernel_pkg = match.group(1)
        kernel_version = match.group(2)
        fetch_dir = rootfs / "tmp/vmfetch"
        fetch_dir.mkdir(parents=True, exist_ok=True)
        _run(
            [
                "chroot",
                rootfs,
                "sh",
                "-c",
                f"cd /tmp/vmfetch && apt-get download -q {kernel_pkg} gdm3",
            ],
            env=_chroot_env(),
            log_file=build_log,
        )
        log.info("vm image: downloaded %s in %.0fs", kernel_pkg, time.monotonic() - t1)

        kernel_deb = _one(fetch_dir.glob(f"{kernel_pkg}_*.deb"))
        gdm_deb = _one(fetch_dir.glob("gdm3_*.deb"))
        _chroot(rootfs, "dpkg-deb", "-x", f"/tmp/vmfetch/{kernel_deb.name}", "/tmp/vmfetch/kernel")
        _chroot(rootfs, "dpkg-deb", "-x", f"/tmp/vmfetch/{gdm_deb.name}", "/tmp/vmfetch/gdm3")
        unpacked = fetch_dir / "kernel"
        shutil.copy2(unpacked / "boot" / f"vmlinuz-{kernel_version}", directory / "vmlinuz")
        # mkinitramfs reads the kernel's config to check its compressor
        (rootfs / "boot").mkdir(exist_ok=True)
        shutil.copy2(unpacked / "boot" / f"config-{kernel_version}",
                     rootfs / "boot" / f"config-{kernel_version}")
        modules_src = _first_existing(
            unpacked / "usr/lib/modules" / kernel_version, unpacked / "lib/modules" / kernel_version
        )
        modules_dst = rootfs / "usr/lib/modules" / kernel_version
        modules_dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(modules_src, modules_dst)
        _chroot(rootfs, "depmod", "-a", kernel_version)

        # Only pam_gdm.so from gdm3: the real module the login hand-off must satisfy.
        pam_gdm = _one((fetch_dir / "gdm3").rglob("pam_gdm.so"))
        security_dir = rootfs / "usr/lib/x86_64-linux-gnu/security"
        shutil.copy2(pam_gdm, security_dir / "pam_gdm.so")

        shutil.rmtree(fetch_dir)
        _chroot(rootfs, "apt-get", "clean")
    _configure_rootfs(rootfs)
    (directory / "kernel-version").write_text(kernel_version + "\n")
    log.info("vm image: building the initramfs")
    (directory / "initrd.img").write_bytes(_build_initramfs(rootfs, kernel_version))


def _one(paths: Iterator[Path]) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        msg = f"expected exactly one file, found {found}"
        raise ImageBuildError(msg)
    return found[0]


def _first_existing(*paths: Path) -> Path:
    for path in paths:
        if path.exists():
            return path
    msg = f"none of these exist: {paths}"
    raise ImageBuildError(msg)


def _configure_rootfs(rootfs: Path) -> None:
    """Settings that make the guest boot quickly and deterministically on a serial console."""
    (rootfs / "etc/hostname").write_text("keyhandoff-vm\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 keyhandoff-vm\n")
    # The root is mounted by the initramfs; nothing else to mount.
    (rootfs / "etc/fstab").write_text("# root is mounted rw by the test initramfs\n")
    # A fixed machine-id: not a "first boot", so nothing prompts on the console.
    (rootfs / "etc/machine-id").write_text("6b65796861646f6666766d7465737430\n")
    # Empty root password: a person debugging a hung guest can log in on the serial console.
    shadow = rootfs / "etc/shadow"
    shadow.write_text(re.sub(r"^root:[^:]*:", "root::", shadow.read_text(), flags=re.MULTILINE))
    wants = rootfs / "etc/systemd/system"
    default = wants / "default.target"
    default.unlink(missing_ok=True)
    default.symlink_to("/usr/lib/systemd/system/multi-user.target")
    # Units that only cost boot time in a throwaway offline guest.
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "systemd-timesyncd.service",
        "systemd-networkd-wait-online.service",
    ):
        masked = wants / unit
        masked.unlink(missing_ok=True)
        masked.symlink_to("/dev/null")


# --- initramfs -------------------------------------------------------------------------------

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vmtest-initrd: loading modules"
for m in $(cat /modules.order); do
    insmod "/modules/$m.ko" || echo "vmtest-initrd: insmod $m failed"
done
root=""
i=0
while [ $i -lt 300 ]; do
    for b in /sys/block/vd*; do
        if [ "$(cat "$b/serial" 2>/dev/null)" = "{ROOT_SERIAL}" ]; then
            root="/dev/${{b##*/}}"
        fi
    done
    if [ -n "$root" ] && [ -b "$root" ]; then break; fi
    i=$((i + 1))
    sleep 0.1
done
if [ -z "$root" ] || ! mount -t ext4 -o rw "$root" /newroot; then
    echo "vmtest-initrd: cannot mount the root disk (serial {ROOT_SERIAL})"
    poweroff -f
fi
echo "vmtest-initrd: root $root mounted, switching to /sbin/init"
mount --move /dev /newroot/dev
mount --move /sys /newroot/sys
mount --move /proc /newroot/proc
exec switch_root /newroot /sbin/init "$@"
echo "vmtest-initrd: switch_root failed"
poweroff -f
"""


def _module_closure(modules_dir: Path, wanted: Sequence[str]) -> list[str]:
    """Relative paths of ``wanted`` and their dependencies, dependencies first; builtins skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    builtin = {
        Path(p).name.split(".ko")[0].replace("-", "_")
        for p in (modules_dir / "modules.builtin").read_text().split()
    }
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps.get(path, []):
            visit(dep)
        ordered.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            msg = f"kernel module {name} is neither built in nor in modules.dep"
            raise ImageBuildError(msg)
        visit(by_name[key])
    return ordered


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(
            ["zstd", "-dc", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    return data


def _build_initramfs(rootfs: Path, kernel_version: str) -> bytes:
    modules_dir = rootfs / "usr/lib/modules" / kernel_version
    files: dict[str, tuple[int, bytes]] = {}
    busybox = shutil.which("busybox")
    if busybox is None:
        msg = "host busybox is missing: apt-get install busybox-static"
        raise ImageBuildError(msg)
    files["bin/busybox"] = (0o100755, Path(busybox).read_bytes())
    files["init"] = (0o100755, INIT_SCRIPT.encode())
    order: list[str] = []
    for rel in _module_closure(modules_dir, INITRD_MODULES):
        name = Path(rel).name.split(".ko")[0]
        files[f"modules/{name}.ko"] = (0o100644, _decompress_module(modules_dir / rel))
        order.append(name)
    files["modules.order"] = (0o100644, ("\n".join(order) + "\n").encode())
    log.info("vm image: initramfs modules: %s", " ".join(order))
    return gzip.compress(_newc_archive(files), mtime=0)


def _newc_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A cpio "newc" archive (the initramfs format) holding ``files`` and their directories."""
    out = io.BytesIO()
    inode = 1
    dirs = sorted({str(Path(p).parent) for p in files if str(Path(p).parent) != "."})

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal inode
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out.write(header + encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        inode += 1

    for d in dirs:
        entry(d, 0o40755, b"")
    for name, (mode, data) in sorted(files.items()):
        entry(name, mode, data)
    entry("TRAILER!!!", 0, b"")
    return out.getvalue()


# --- per-run image ---------------------------------------------------------------------------


def _project_files(project: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files of the checkout."""
    out = _run(
        ["git", "-C", project, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    )
    return sorted({p for p in out.split("\0") if p and (project / p).is_file()})


def _install_project(rootfs: Path, project: Path, build_log: Path, *,
                     packages: tuple[str, ...] = ("keyhandoff", "libpam-keyhandoff"),
                     ) -> tuple[bool, str]:
    """Install the Debian packages built from the checkout (:mod:`.debs`) in the guest tree.

    The checkout is copied to ``/opt/keyhandoff-src`` as well: guest jobs import test helpers
    from its ``tests/``.  keyhandoff itself is what dpkg installed, in /usr.
    """
    from .debs import ensure_debs, install  # noqa: PLC0415 (debs imports this module)

    target = rootfs / "opt/keyhandoff-src"
    if target.exists():
        shutil.rmtree(target)
    for rel in _project_files(project):
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, dst)
    if not (target / "debian/control").exists():
        return False, "not installed: the checkout has no debian/control"
    try:
        debs = ensure_debs(project)
        install(rootfs, debs, packages, build_log)
    except ImageBuildError as exc:
        return False, f"the packages did not install in the guest tree: {exc}"
    return True, f"installed {', '.join(packages)} from {debs.name}"


def _install_runner(rootfs: Path) -> None:
    """The guest-side test runner (see guest/); enabled for multi-user.target."""
    for name, dest, mode in (
        ("vmtest.service", "etc/systemd/system/vmtest.service", 0o644),
        ("vmtest-runner", "usr/local/sbin/vmtest-runner", 0o755),
        ("vmtest-result", "usr/local/bin/vmtest-result", 0o755),
    ):
        dst = rootfs / dest
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST_DIR / name, dst)
        dst.chmod(mode)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "vmtest.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/systemd/system/vmtest.service")


def _tree_size(path: Path) -> int:
    out = _run(["du", "-s", "--block-size=1", "-x", path], timeout=120)
    return int(out.split()[0])


def make_ext4(source: Path, image: Path, *, extra_bytes: int = 256 << 20, label: str = "") -> None:
    """Pack ``source`` into a new ext4 image with room to spare (``mkfs.ext4 -d``, no mount)."""
    size_mb = (int(_tree_size(source) * 1.15) + extra_bytes) // (1 << 20) + 16
    image.unlink(missing_ok=True)
    argv: list[str | Path] = ["mkfs.ext4", "-q", "-F", "-d", source]
    if label:
        argv += ["-L", label]
    _run([*argv, image, f"{size_mb}M"], timeout=STEP_TIMEOUT)


@contextlib.contextmanager
def _writable_copy(base_rootfs: Path, workdir: Path) -> Iterator[Path]:
    """A writable view of the cached tree that never changes the cache.

    An overlay mount (base as the lower layer) costs nothing; where overlayfs cannot be mounted,
    fall back to a full copy (about 15 s for the ~30k files).
    """
    upper, work, merged = workdir / "upper", workdir / "overlay-work", workdir / "rootfs"
    for path in (upper, work, merged):
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={base_rootfs},upperdir={upper},workdir={work}"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        check=False,
        capture_output=True,
        timeout=30,
    )
    try:
        if mounted.returncode != 0:
            log.info("vm image: no overlayfs (%s); copying the tree", mounted.stderr.strip())
            merged.rmdir()
            _run(["cp", "-a", "--reflink=auto", base_rootfs, merged], timeout=STEP_TIMEOUT)
        yield merged
    finally:
        if mounted.returncode == 0:
            _unmount_below(workdir)
            subprocess.run(["umount", str(merged)], check=False, capture_output=True, timeout=30)
        for path in (upper, work, merged):
            shutil.rmtree(path, ignore_errors=True)


def build_run_image(
    workdir: Path,
    *,
    customize: Customize | None = None,
    project: Path | None = REPO_ROOT,
    base: BaseImage | None = None,
) -> RunImage:
    """Build ``workdir/root.img``: base + this checkout + runner + ``customize(rootfs)``.

    ``customize`` gets the guest's root directory before it is packed; it may add units, config
    files, keys, anything. The tree is deleted afterwards; only the image stays in ``workdir``.
    """
    base = base or ensure_base()
    started = time.monotonic()
    build_log = workdir / "image-build.log"
    root_image = workdir / "root.img"
    with _writable_copy(base.rootfs, workdir) as rootfs:
        prepared = time.monotonic()
        installed, report = (False, "not requested")
        if project is not None:
            installed, report = _install_project(rootfs, project, build_log)
        level = logging.INFO if installed else logging.WARNING
        log.log(level, "vm image: project %s (%.1fs)", report, time.monotonic() - prepared)
        _install_runner(rootfs)
        if customize is not None:
            customize(rootfs)
        packing = time.monotonic()
        make_ext4(rootfs, root_image, label="vmroot")
        log.info(
            "vm image: tree %.1fs, mkfs.ext4 %.1fs", prepared - started, time.monotonic() - packing
        )
    log.info("vm image: run image ready in %.1fs: %s", time.monotonic() - started, root_image)
    return RunImage(
        base=base, root_image=root_image, project_installed=installed, project_report=report
    )


def main(argv: Sequence[str]) -> int:
    """Build the cached base (``--rebuild`` to force), optionally also a run image."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    base = ensure_base(rebuild="--rebuild" in argv)
    log.info(
        "base: %s (kernel %s) in %.0fs",
        base.directory,
        base.kernel_version,
        time.monotonic() - started,
    )
    if "--run-image" in argv:
        with tempfile.TemporaryDirectory(prefix="keyhandoff-vm-") as tmp:
            run = build_run_image(Path(tmp), base=base)
            size = run.root_image.stat().st_size
            log.info("run image: %d MiB apparent, %s", size >> 20, run.project_report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
