"""The guests' keyhandoff, from the Debian packages this tree builds: what a user installs.

``dpkg-buildpackage -us -uc -b`` runs in a chroot of the base (Debian 13: its debhelper,
dh-python, python3.13, systemd-dev and -dev libraries, all in :data:`.image.PACKAGES`), in an
overlay that is thrown away, so the packages are built against the libraries the guest runs
and their dependencies are Debian 13's own.  They are built once per content of the checkout
(the files a clean clone has, plus untracked files not ignored: what the guest runs is what
is being tested) and kept under the cache; two pytest-xdist workers share one build through
a lock.

``dpkg -i`` then installs them in each run image's tree.  Debian's maintainer scripts enable
every unit with an ``[Install]`` section on install (``deb-systemd-helper``; nothing is
started in a chroot), so :func:`install` leaves the units disabled again: a plain image has
the package and nothing of it running, as the firmware and retry tests expect.  An image that
wants the boot steps enables them as the vendor preset says (:func:`preset`).

Not part of the base's hash: editing this module costs no rebuild of the base.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from typing import TYPE_CHECKING

from .image import (
    CACHE_ROOT,
    ImageBuildError,
    _chroot,
    _chroot_mounts,
    _locked,
    _project_files,
    _writable_copy,
    ensure_base,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .image import BaseImage

log = logging.getLogger("keyhandoff.vmtest")

#: seconds for one package build in the chroot (about 40 s on this machine's TCG host)
BUILD_TIMEOUT = 1800
#: seconds after its last use that a build of the packages for this base is dropped
STALE_AFTER = 24 * 3600
#: the binary packages debian/control builds, in the order dpkg -i gets them
PACKAGES = ("keyhandoff", "libpam-keyhandoff", "cryptsetup-keyhandoff")
#: where the guest tree keeps the packages while dpkg installs them
GUEST_DEBS = "tmp/kh-debs"


def content_hash(project: Path) -> str:
    """A hash of every file the package build can see, names and bytes."""
    digest = hashlib.sha256()
    for rel in _project_files(project):
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256((project / rel).read_bytes()).digest())
    return digest.hexdigest()[:16]


def ensure_debs(project: Path, base: BaseImage | None = None) -> Path:
    """The directory holding the .deb files of ``project``, built first if needed."""
    base = base or ensure_base()
    directory = CACHE_ROOT / f"debs-{base.directory.name}-{content_hash(project)}"
    with _locked(CACHE_ROOT / ".debs.lock", timeout=BUILD_TIMEOUT + 300):
        if (directory / "COMPLETE").exists():
            log.info("vm image: reusing the packages built in %s", directory)
            (directory / "COMPLETE").touch()  # in use: not stale (_prune_old)
            return directory
        log.info("vm image: building the packages for %s", directory.name)
        shutil.rmtree(directory, ignore_errors=True)
        work = CACHE_ROOT / f"{directory.name}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        started = time.monotonic()
        try:
            debs = _build(project, base, work)
            directory.mkdir()
            for deb in debs:
                shutil.copy2(deb, directory / deb.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (directory / "COMPLETE").write_text(f"{time.monotonic() - started:.1f}\n")
        sizes = ", ".join(f"{d.name} {d.stat().st_size} B" for d in sorted(directory.glob("*.deb")))
        log.info("vm image: packages built in %.0fs in %s: %s", time.monotonic() - started,
                 directory.name, sizes)
        _prune_old(base)
        return directory


def _build(project: Path, base: BaseImage, work: Path) -> list[Path]:
    build_log = work / "build.log"
    with _writable_copy(base.rootfs, work) as rootfs:
        source = rootfs / "build/keyhandoff"
        for rel in _project_files(project):
            dst = source / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, dst)
        with _chroot_mounts(rootfs):
            try:
                _chroot(rootfs, "sh", "-c", "cd /build/keyhandoff && dpkg-buildpackage -us -uc -b",
                        timeout=BUILD_TIMEOUT, log_file=build_log)
            except ImageBuildError as exc:
                msg = f"the Debian packages did not build in the guest tree: {exc}"
                raise ImageBuildError(msg) from None
        built = sorted((rootfs / "build").glob("*.deb"))
        wanted = [d for d in built if d.name.split("_", 1)[0] in PACKAGES]
        if sorted(d.name.split("_", 1)[0] for d in wanted) != sorted(PACKAGES):
            msg = f"dpkg-buildpackage built {[d.name for d in built]}, not {list(PACKAGES)}"
            raise ImageBuildError(msg)
        kept = work / "out"
        kept.mkdir()
        for deb in wanted:
            shutil.copy2(deb, kept / deb.name)
        return [kept / deb.name for deb in wanted]


def _prune_old(base: BaseImage) -> None:
    """Drop the packages of other bases, and those not used for a day.

    Never the ones another worker of this run may be about to install: packages built for
    this base stay while they are in use (every reuse touches ``COMPLETE``).
    """
    now = time.time()
    for entry in CACHE_ROOT.glob("debs-*"):
        if not entry.is_dir() or entry.name.endswith(".partial"):
            continue
        complete = entry / "COMPLETE"
        other_base = not entry.name.startswith(f"debs-{base.directory.name}-")
        unused = not complete.exists() or now - complete.stat().st_mtime > STALE_AFTER
        if other_base or unused:
            shutil.rmtree(entry, ignore_errors=True)


def install(rootfs: Path, debs: Path, packages: tuple[str, ...], build_log: Path) -> None:
    """``dpkg -i`` the named packages in the guest tree; their units are left disabled."""
    inside = rootfs / GUEST_DEBS
    inside.mkdir(parents=True, exist_ok=True)
    names = []
    for package in packages:
        (deb,) = debs.glob(f"{package}_*.deb")
        shutil.copy2(deb, inside / deb.name)
        names.append(f"/{GUEST_DEBS}/{deb.name}")
    try:
        with _chroot_mounts(rootfs):
            _chroot(rootfs, "dpkg", "-i", *names, log_file=build_log)
            if "keyhandoff" in packages:
                _chroot(rootfs, "systemctl", "disable", *unit_names(rootfs), log_file=build_log)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def unit_names(rootfs: Path) -> list[str]:
    """keyhandoff's units as the package installed them (the names dpkg lists)."""
    listed = _chroot(rootfs, "dpkg-query", "-L", "keyhandoff")
    return sorted({line.rsplit("/", 1)[1] for line in listed.splitlines()
                   if "/systemd/system/" in line and line.endswith((".service", ".path"))
                   and "/keyhandoff-" in line and ".d/" not in line})


def preset(rootfs: Path, build_log: Path) -> None:
    """Enable keyhandoff's units as the package's vendor preset says (``systemctl preset``)."""
    with _chroot_mounts(rootfs):
        _chroot(rootfs, "systemctl", "preset", *unit_names(rootfs), log_file=build_log)
