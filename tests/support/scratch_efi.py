"""Run Python code against libefivar on a scratch directory instead of real firmware.

libefivar picks its backend when the library is loaded, from ``LIBEFIVAR_OPS`` and
``EFIVARFS_PATH``: the pytest process may already have it loaded without them, so the code
runs in a fresh interpreter.  It prints one JSON line last, which is returned.
Also a pytest plugin (tests/conftest.py): the ``efivars`` fixture, a scratch directory
(:func:`scratch_efivars`; :func:`run_in_scratch_efivars` for helpers that take ``tmp_path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest

from support.parts import require, require_binary

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path


def scratch_env(efivars: Path | None) -> dict[str, str]:
    """The environment that points libefivar at ``efivars`` (and our logs at stderr).

    ``None``: no libefivar variables at all (libefivar's own default backend).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBEFIVAR", "EFIVARFS"))}
    if efivars is not None:
        # libefivar appends the file name: trailing slash
        env.update(LIBEFIVAR_OPS="efivarfs", EFIVARFS_PATH=f"{efivars}/")
    env["KEYHANDOFF_LOG"] = "stderr"
    return env


def run_in_child(
    code: str, efivars: Path | None, *args: object, prefix: Sequence[str] = (),
    timeout: float = 180,
) -> subprocess.CompletedProcess[bytes]:
    """``code`` (dedented) in a fresh interpreter with ``args`` as argv, whatever its exit."""
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=scratch_env(efivars), capture_output=True, timeout=timeout, check=False,
    )


def last_json(proc: subprocess.CompletedProcess[bytes]) -> Any:  # any JSON
    """The child's last stdout line, parsed as JSON."""
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def run_with_efivars(
    code: str, efivars: Path, *args: object,
) -> tuple[dict[str, Any], subprocess.CompletedProcess[bytes]]:
    """Run ``code`` (dedented) with ``args`` as argv; its last stdout line parsed as JSON."""
    proc = run_in_child(code, efivars, *args)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return last_json(proc), proc


def scratch_efivars(tmp_path: Path) -> Path:
    """A test's scratch efivarfs directory, ``tmp_path/efivars`` (made if it is not there)."""
    directory = tmp_path / "efivars"
    directory.mkdir(exist_ok=True)
    return directory


def run_in_scratch_efivars(
    code: str, tmp_path: Path, *args: object,
) -> tuple[dict[str, Any], subprocess.CompletedProcess[bytes], Path]:
    """:func:`run_with_efivars` on the test's scratch directory (:func:`scratch_efivars`);
    also that directory, to look into."""
    efivars = scratch_efivars(tmp_path)
    out, proc = run_with_efivars(code, efivars, *args)
    return out, proc, efivars


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "16k") -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (created) for the block: a store that fills up."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "keyhandoff-test", str(path)],
        capture_output=True, text=True, check=False,
    )
    require(proc.returncode == 0, f"mounting a tmpfs ({proc.stderr.strip()})",
            "run as root with CAP_SYS_ADMIN (mount -t tmpfs)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def efivars(tmp_path: Path) -> Iterator[Path]:
    """A scratch efivarfs directory for libefivar (see :func:`scratch_env`), emptied of
    immutable flags afterwards so pytest can remove it."""
    directory = scratch_efivars(tmp_path)
    yield directory
    clear_immutable(directory)


def clear_immutable(directory: Path) -> None:
    """``chattr -i`` on every file in ``directory`` (where chattr exists)."""
    chattr = shutil.which("chattr")
    for path in directory.iterdir():
        if chattr:
            subprocess.run([chattr, "-i", str(path)], check=False, capture_output=True)


def chattr_immutable(path: Path) -> None:
    """Set the immutable flag, as real efivarfs does on every new variable."""
    chattr = require_binary("chattr", "apt-get install e2fsprogs")
    proc = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True, check=False)
    require(proc.returncode == 0, f"chattr +i on {path.parent} ({proc.stderr.strip()})",
            "run on a filesystem with FS_IOC_SETFLAGS (ext4, tmpfs on Linux >= 6.0)")


def is_immutable(path: Path) -> bool:
    """Whether ``path`` has the immutable flag (lsattr)."""
    lsattr = require_binary("lsattr", "apt-get install e2fsprogs")
    flags = subprocess.run([lsattr, "-d", str(path)], capture_output=True, text=True, check=True)
    return "i" in flags.stdout.split()[0]
