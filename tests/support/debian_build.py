"""The Debian packages of this tree, built once per session from the tracked files.

``dpkg-buildpackage -us -uc -b`` runs in a scratch copy of the tracked files (``git
ls-files``, as a clean clone has them: no build products, no venv), on the host's own
toolchain (Debian 12: the packages are Debian 12's).  One build serves every module that
asks for :func:`built` (tests/integration/test_debian_package.py checks and lints the
packages, test_debian_install.py installs them in a fresh Debian 12 root): session scope.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import keyhandoff
from support.parts import require, require_binary

REPO = Path(__file__).resolve().parents[2]
VERSION = keyhandoff.__version__
# HOME: lintian and python3-build write caches there; a scratch one, not root's
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
       "HOME": tempfile.gettempdir()}
#: the binary packages debian/control builds (the -dbgsym ones besides)
PACKAGES = ("keyhandoff", "libpam-keyhandoff", "cryptsetup-keyhandoff")
BOOT_STEPS = ("keyhandoff-restore.service", "keyhandoff-capture-initrd.service",
              "keyhandoff-finish.service", "keyhandoff-login.service",
              "keyhandoff-rearm.service", "keyhandoff-schedule-shutdown.service")
# started by keyhandoff-schedule.path only: no [Install], never enabled, never invoked
TRIGGERED = ("keyhandoff-schedule.service",)
# started on install, restarted on upgrade, stopped on removal
WATCHERS = ("keyhandoff-agent.service", "keyhandoff-schedule.path")


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          check=False, timeout=1200, **kwargs)  # type: ignore[call-overload]


def multiarch() -> str:
    return run("dpkg-architecture", "-qDEB_HOST_MULTIARCH", env=ENV).stdout.strip()


def arch() -> str:
    return run("dpkg-architecture", "-qDEB_HOST_ARCH", env=ENV).stdout.strip()


@dataclass(frozen=True)
class Build:
    out: Path
    src: Path
    seconds: float

    def deb(self, package: str) -> Path:
        return self.out / f"{package}_{VERSION}_{arch()}.deb"


def copy_tracked(dest: Path) -> None:
    """The tracked files only, as a clean clone has them."""
    git = require_binary("git", "apt-get install git")
    require((REPO / ".git").exists(), "a git checkout", "git clone")
    files = run(git, "-C", REPO, "ls-files", "-z", env=ENV).stdout.split("\0")
    dest.mkdir()
    for name in filter(None, files):
        source = REPO / name
        if not source.exists():  # deleted in the work tree, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Build:
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"),
                          ("dh_python3", "dh-python"), ("lintian", "lintian")):
        require_binary(tool, f"apt-get install {package}")
    proc = run("dpkg-checkbuilddeps", cwd=REPO, env=ENV)
    require(proc.returncode == 0, f"the build dependencies ({proc.stderr.strip()})",
            "scripts/setup-host")
    out = tmp_path_factory.mktemp("debs")
    src = out / "keyhandoff"
    copy_tracked(src)
    start = time.monotonic()
    proc = run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src, env=ENV)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"dpkg-buildpackage -us -uc -b: {seconds:.1f} s")
    return Build(out=out, src=src, seconds=seconds)


def _listing(deb: Path) -> list[tuple[str, str]]:
    """(type letter, absolute path) for every entry of a .deb."""
    proc = run("dpkg-deb", "-c", deb, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return [(line[0], line.split(None, 5)[5].split(" -> ")[0].removeprefix(".").rstrip("/"))
            for line in proc.stdout.splitlines()]


def contents(deb: Path) -> set[str]:
    """The regular files and symlinks of a .deb, as absolute paths."""
    return {path for kind, path in _listing(deb) if kind != "d"}


def directories(deb: Path) -> set[str]:
    """The directories of a .deb (``/`` left out), as absolute paths."""
    return {path for kind, path in _listing(deb) if kind == "d" and path}
