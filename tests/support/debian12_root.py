"""A fresh Debian 12 root to install this tree's packages in, without touching the host.

``debootstrap --variant=minbase bookworm`` (about 2 min: only the Priority: required
packages and apt, so every dependency the packages need must come from their own
Depends) is cached under ``/var/cache/keyhandoff-debian12/<hash>/rootfs``
(``KEYHANDOFF_DEBIAN12_CACHE`` overrides the directory); the hash covers the suite, the
variant, the mirror and this file's source, so editing any of them bootstraps a new root.
Two pytest processes share one bootstrap through a lock; roots of other inputs are removed.

A session never writes to the cache: :func:`fresh_root` mounts an overlay over it (a copy
where overlayfs cannot be mounted) with /proc, /sys and /dev inside, and throws all of it
away afterwards.  The mirror, the overlay and the mounts are tests/vm/image.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vm.image import (
    ImageBuildError,
    _chroot_mounts,
    _locked,
    _run,
    _unmount_below,
    _writable_copy,
    mirror_url,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

SUITE = "bookworm"
VARIANT = "minbase"
CACHE_ROOT = Path(os.environ.get("KEYHANDOFF_DEBIAN12_CACHE", "/var/cache/keyhandoff-debian12"))
BOOTSTRAP_TIMEOUT = 1200  # seconds for debootstrap (about 120 on this machine)
STEP_TIMEOUT = 600  # seconds for any other command in the root


@dataclass(frozen=True)
class Bootstrap:
    """The cached root, and what getting it cost this session."""

    rootfs: Path
    mirror: str
    seconds: float
    cached: bool


def inputs_hash(mirror: str) -> str:
    """Hash of everything that determines the cached root."""
    digest = hashlib.sha256()
    for part in (SUITE, VARIANT, mirror):
        digest.update(part.encode() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def unreachable(mirror: str) -> str:
    """Why the suite's Release file cannot be fetched from ``mirror``; "" when it can."""
    url = f"{mirror}/dists/{SUITE}/InRelease"
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310 (the host's apt mirror)
    try:
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310
            return ""
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def ensure_root() -> Bootstrap:
    """The cached minbase root for the current inputs, bootstrapped first if needed."""
    started = time.monotonic()
    mirror = mirror_url()
    directory = CACHE_ROOT / inputs_hash(mirror)
    with _locked(CACHE_ROOT / ".lock", timeout=BOOTSTRAP_TIMEOUT + 300):
        cached = (directory / "COMPLETE").exists()
        if not cached:
            partial = directory.with_name(directory.name + ".partial")
            if partial.exists():
                _unmount_below(partial)
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            try:
                _run(["debootstrap", f"--variant={VARIANT}", SUITE, partial / "rootfs", mirror],
                     timeout=BOOTSTRAP_TIMEOUT, log_file=partial / "debootstrap.log")
            except BaseException:
                with contextlib.suppress(OSError):
                    _unmount_below(partial)
                raise
            (partial / "COMPLETE").write_text(f"{time.monotonic() - started:.1f}\n")
            partial.rename(directory)
            _prune_old(directory)
    return Bootstrap(rootfs=directory / "rootfs", mirror=mirror,
                     seconds=time.monotonic() - started, cached=cached)


def _prune_old(keep: Path) -> None:
    """Drop roots bootstrapped for other inputs so the cache does not grow without bound."""
    for entry in CACHE_ROOT.iterdir():
        if (entry.is_dir() and entry != keep
                and re.fullmatch(r"[0-9a-f]{16}(\.partial)?", entry.name)):
            _unmount_below(entry)
            shutil.rmtree(entry, ignore_errors=True)


class Root:
    """A throwaway writable Debian 12 root, with commands run in a chroot of it."""

    def __init__(self, path: Path, mirror: str) -> None:
        self.path = path
        self.mirror = mirror

    def run(self, *argv: str, timeout: float = STEP_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` in the chroot, with a bare environment (plus ``env``); never raises.

        SYSTEMD_OFFLINE=1, inherited by the maintainer scripts: systemctl works on the unit
        files only and ignores start, stop and daemon-reload.  It would find out by itself
        that it runs in a chroot by comparing / with /proc/1/root, but a sandbox may deny
        that (EACCES), and systemctl then goes for a bus that is not there.
        """
        environ = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/root", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                   "SYSTEMD_OFFLINE": "1", **(env or {})}
        try:
            return subprocess.run(["chroot", str(self.path), *argv], stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, errors="replace",
                                  timeout=timeout, env=environ, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ImageBuildError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc

    def check(self, *argv: str, timeout: float = STEP_TIMEOUT,
              env: dict[str, str] | None = None) -> str:
        """``argv`` in the chroot; its stdout, or an assertion with its output."""
        proc = self.run(*argv, timeout=timeout, env=env)
        assert proc.returncode == 0, (f"exit {proc.returncode}: {' '.join(argv)}\n"
                                      f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        return proc.stdout

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the root as the chroot sees it (through its symlinks)."""
        return self.run("test", "-e", path, timeout=30).returncode == 0


@contextlib.contextmanager
def fresh_root(bootstrap: Bootstrap, workdir: Path) -> Iterator[Root]:
    """A writable view of the cached root, /proc, /sys, /dev mounted, apt pointed at the mirror.

    The host's resolv.conf is copied in at each session (the cached one may be stale); apt's
    only source is the suite itself (no -updates, no -security): the packages must install
    from Debian 12's own archive.
    """
    with _writable_copy(bootstrap.rootfs, workdir) as path, _chroot_mounts(path):
        resolv = path / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())
        (path / "etc/apt/sources.list").write_text(f"deb {bootstrap.mirror} {SUITE} main\n")
        yield Root(path, bootstrap.mirror)
