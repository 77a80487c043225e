"""The agent idles for a whole uptime: importing it (or the command line) stays light.

A fresh interpreter imports the entry points and reports ``sys.modules``.  The libraries
named here load only when a call needs them (LUKS work, EFI variables, udev events, the
journal); module-level imports that pulled one in would raise the agent's idle RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Loaded only on the paths that use them, never by importing an entry point.
HEAVY = (
    "cryptography",
    "pyudev",
    "systemd.journal",
    "keyhandoff._bindings._cryptsetup",
    "keyhandoff._bindings._efivar",
)

_REPORT = "import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))\n"


def _modules_after_import(module: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT.format(module=module)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return set(json.loads(proc.stdout))


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("module", ["keyhandoff", "keyhandoff.agent", "keyhandoff.cli",
                                    "keyhandoff.update"])
def test_entry_point_imports_no_heavy_module(module):
    loaded = _modules_after_import(module)
    assert module in loaded  # the probe itself worked
    assert _heavy(loaded) == []


def test_the_probe_sees_a_heavy_import():
    # The check above can fail: a module that loads libcryptsetup is seen.
    assert "keyhandoff._bindings._cryptsetup" in _heavy(_modules_after_import("keyhandoff.luks"))


@pytest.mark.parametrize("module", ["keyhandoff.aead", "keyhandoff.sealing", "keyhandoff.record"])
def test_the_record_format_is_pure(module):
    # The formats load their AEAD backend and no C binding (no libefivar, no libcryptsetup).
    heavy = _heavy(_modules_after_import(module))
    assert "cryptography" in heavy
    assert [m for m in heavy if not m.startswith("cryptography")] == []


def test_the_record_variable_loads_no_aead():
    # efi.RecordVariable stores sealed bytes: `status` and the sweeps reach efi without
    # paying for cryptography.
    heavy = _heavy(_modules_after_import("keyhandoff.efi"))
    assert "keyhandoff._bindings._efivar" in heavy
    assert [m for m in heavy if m.startswith("cryptography")] == []


@pytest.mark.parametrize("module", ["keyhandoff.newc", "keyhandoff.kexec"])
def test_the_kexec_primitives_load_no_heavy_module(module):
    # newc is pure (no binding at all); kexec adds only the small libc binding (_linux)
    loaded = _modules_after_import(module)
    assert module in loaded
    assert _heavy(loaded) == []
    bindings = {m.split(".")[2] for m in loaded if m.startswith("keyhandoff._bindings._")}
    assert bindings == (set() if module == "keyhandoff.newc" else {"_linux"})
