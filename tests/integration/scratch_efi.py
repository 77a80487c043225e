"""Run Python code against libefivar on a scratch directory instead of real firmware.

libefivar picks its backend when the library is loaded, from ``LIBEFIVAR_OPS`` and
``EFIVARFS_PATH``: the pytest process may already have it loaded without them, so the code
runs in a fresh interpreter.  It prints one JSON line last, which is returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path


def scratch_env(efivars: Path) -> dict[str, str]:
    """The environment that points libefivar at ``efivars`` (and our logs at stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBEFIVAR", "EFIVARFS"))}
    env.update(LIBEFIVAR_OPS="efivarfs", EFIVARFS_PATH=f"{efivars}/", KEYHANDOFF_LOG="stderr")
    return env


def run_with_efivars(
    code: str, efivars: Path, *args: object,
) -> tuple[dict[str, Any], subprocess.CompletedProcess[bytes]]:
    """Run ``code`` (dedented) with ``args`` as argv; its last stdout line parsed as JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=scratch_env(efivars), capture_output=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), proc
