"""Real PAM stacks for tests: build pam_keyhandoff.so (csrc/), fetch Debian's pam_gdm.so, run
pamtester over a throw-away /etc/pam.d service, observe PAM_AUTHTOK with pam_exec.

Shared by test_pam.py and the runner-flow tests (tests/conftest.py registers the fixtures).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.parts import require, require_binary
from support.passphrases import MARKER

REPO = Path(__file__).resolve().parents[2]  # tests/support/ -> the checkout
#: The one build of the module (also `make pam` and the VM guest).
BUILD_SCRIPT = REPO / "csrc" / "build-pam"
GDM_CACHE = Path("/var/cache/keyhandoff-test")
PAM_GDM_IN_DEB = "lib/x86_64-linux-gnu/security/pam_gdm.so"

# pam_strerror() texts pamtester prints on failure.
AUTHINFO_UNAVAIL = "Authentication service cannot retrieve authentication info"
SERVICE_ERR = "Error in service module"
SUCCESS = "successfully authenticated"


def build_module(outdir: Path) -> Path:
    """Run the real build command (csrc/build-pam); return the path of pam_keyhandoff.so."""
    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(BUILD_SCRIPT), str(outdir)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def pam_module(tmp_path_factory) -> Path:
    require_binary("pamtester", "apt-get install pamtester")
    require(Path("/usr/include/security/pam_modules.h").exists(), "libpam0g-dev",
            "apt-get install libpam0g-dev")
    require(Path("/usr/include/keyutils.h").exists(), "libkeyutils-dev",
            "apt-get install libkeyutils-dev")
    require_binary("cc", "apt-get install gcc")
    return build_module(tmp_path_factory.mktemp("pam-good"))


# --------------------------------------------------------------------------- PAM plumbing


@dataclass
class Checker:
    """pam_exec's view of PAM_AUTHTOK: a script that writes stdin to a 0600 file."""

    script: Path
    token_file: Path

    def line(self) -> str:
        return f"auth required pam_exec.so expose_authtok quiet {self.script}"

    def token(self) -> bytes | None:
        """The token pam_exec passed (None: pam_exec never ran).  The file is removed."""
        if not self.token_file.exists():
            return None
        assert self.token_file.stat().st_mode & 0o077 == 0
        data = self.token_file.read_bytes()
        self.token_file.unlink()
        return data.removesuffix(b"\0")  # older pam_exec versions send the NUL too


@pytest.fixture
def checker(tmp_path) -> Checker:
    token_file = tmp_path / "authtok"
    script = tmp_path / "checker.sh"
    script.write_text(f'#!/bin/sh\numask 077\nexec cat > "{token_file}"\n')
    script.chmod(0o700)
    yield Checker(script, token_file)
    token_file.unlink(missing_ok=True)


@contextlib.contextmanager
def pam_service(*lines: str):
    """A throw-away /etc/pam.d service; yields its name."""
    name = f"keyhandoff-test-{secrets.token_hex(6)}"
    path = Path("/etc/pam.d") / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        yield name
    finally:
        path.unlink(missing_ok=True)


@dataclass
class PamResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and SUCCESS in self.stdout


def pamtester(*lines: str, env: dict[str, str] | None = None) -> PamResult:
    """Run ``pamtester <service> root authenticate`` over a service made of ``lines``."""
    with pam_service(*lines) as service:
        proc = subprocess.run(
            ["pamtester", service, "root", "authenticate"],
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
            env=env if env is not None else clean_env(),
        )
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    # The passphrase must never reach a PAM client's output (pam_exec's prompt, tracebacks).
    assert MARKER.decode() not in out + err, "a test passphrase reached pamtester's output"
    return PamResult(proc.returncode, out, err)


def clean_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C"}


@pytest.fixture(scope="session")
def pam_gdm() -> Path:
    """Debian's pam_gdm.so, extracted from the gdm3 package (downloaded once, cached)."""
    require_binary("pamtester", "apt-get install pamtester")
    GDM_CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(GDM_CACHE.glob("gdm3_*.deb"))
    if not debs:
        download = ["apt-get", "download", "-o", "APT::Sandbox::User=root", "gdm3"]
        ok = subprocess.run(download, cwd=GDM_CACHE, capture_output=True, check=False)
        if ok.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            ok = subprocess.run(download, cwd=GDM_CACHE, capture_output=True, check=False)
        debs = sorted(GDM_CACHE.glob("gdm3_*.deb"))
        require(bool(debs), "gdm3's pam_gdm.so",
                f"cd {GDM_CACHE} && apt-get update && apt-get download gdm3")
    deb = debs[-1]
    tree = GDM_CACHE / deb.stem
    module = tree / PAM_GDM_IN_DEB
    if not module.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    assert module.exists(), f"{deb.name} has no {PAM_GDM_IN_DEB}"
    return module
