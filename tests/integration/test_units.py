"""The units: each passes the real ``systemd-analyze verify`` with no warning at all, and
each one's effective sandbox (its file merged with the shared prefix drop-in, as systemd
itself computes it) is the intended one, property by property."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.parts import require_binary

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "units").glob("*.service"))
PATH_UNITS = sorted((REPO / "units").glob("*.path"))
# The prefix drop-in: systemd applies it to every unit named "keyhandoff-*".
DROPIN_DIR = REPO / "units" / "keyhandoff-.service.d"


def verify(unit: Path, tmp_path: Path) -> str:
    """Warnings and errors of systemd-analyze verify (ExecStart pointed at our build).

    A path unit is checked with the service it triggers beside it.
    """
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    # the console script beside us (venv), or the Debian-stack build's (debian-stack-test)
    stack = os.environ.get("KEYHANDOFF_TEST_STACK_DIR")
    exe = str(Path(stack, "bin") if stack else Path(sys.executable).parent) + "/keyhandoff"
    assert Path(exe).exists(), "keyhandoff is not installed in this environment"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/bin/keyhandoff", exe))
    if unit.suffix == ".path":
        service = unit.with_suffix(".service")
        (tmp_path / service.name).write_text(
            service.read_text().replace("/usr/bin/keyhandoff", exe))
    # verify reads drop-ins from the unit's directory: check the unit as it is installed
    shutil.copytree(DROPIN_DIR, tmp_path / DROPIN_DIR.name, dirs_exist_ok=True)
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "SYSTEMD_LOG_LEVEL": "notice"})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"exit {proc.returncode}"]
    return "\n".join(lines)


def test_units_exist():
    assert {u.name for u in UNITS} >= {
        "keyhandoff-agent.service", "keyhandoff-restore.service", "keyhandoff-finish.service",
        "keyhandoff-login.service", "keyhandoff-rearm.service", "keyhandoff-schedule.service",
        "keyhandoff-schedule-shutdown.service",
    }
    assert {u.name for u in PATH_UNITS} == {"keyhandoff-schedule.path"}


@pytest.mark.parametrize("unit", UNITS + PATH_UNITS, ids=lambda u: u.name)
def test_unit_verifies_cleanly(unit, tmp_path):
    assert verify(unit, tmp_path) == ""


def test_the_check_sees_a_broken_unit(tmp_path):
    broken = tmp_path / "src" / "keyhandoff-broken.service"
    broken.parent.mkdir()
    broken.write_text(UNITS[0].read_text().replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in verify(broken, tmp_path)


def test_the_check_sees_a_broken_dropin(tmp_path):
    broken = tmp_path / "dropin"
    broken.mkdir()
    (broken / "10-sandbox.conf").write_text("[Service]\nProtectSystem=strictt\n")
    assert "strictt" in verify_with_dropin(UNITS[0], broken, tmp_path / "out")


def verify_with_dropin(unit: Path, dropin_dir: Path, where: Path) -> str:
    """verify() of ``unit`` beside the drop-ins in ``dropin_dir`` instead of the real ones."""
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    where.mkdir()
    shutil.copy(unit, where / unit.name)
    shutil.copytree(dropin_dir, where / DROPIN_DIR.name)
    proc = subprocess.run([analyze, "verify", "--man=no", str(where / unit.name)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "SYSTEMD_LOG_LEVEL": "notice"})
    return proc.stdout + proc.stderr


# The intended sandbox of each unit, written out flat (as the units were before the shared
# drop-in existed). systemd computes the effective settings of this and of the real unit +
# drop-in; they must agree on every sandbox property. Loosen a unit here only on purpose.
SHARED = """
KeyringMode=shared
UMask=0077
LimitCORE=0
ProtectSystem=strict
ProtectHome=yes
PrivateNetwork=yes
IPAddressDeny=any
RestrictAddressFamilies=AF_UNIX
NoNewPrivileges=yes
MemoryDenyWriteExecute=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RestrictSUIDSGID=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
SystemCallArchitectures=native
SystemCallErrorNumber=EPERM
"""
RUNTIME_DIR = """
RuntimeDirectory=keyhandoff
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
"""
# what the units that arm share: the EFI store, the disks, the immutable flag, and the
# kexec channel's load (kexec_file_load, CAP_SYS_BOOT)
ARMING = """
ReadWritePaths=-/sys/firmware/efi/efivars -/run/cryptsetup
DevicePolicy=closed
DeviceAllow=block-* rw
SystemCallFilter=@system-service
SystemCallFilter=kexec_file_load
CapabilityBoundingSet=CAP_LINUX_IMMUTABLE CAP_SYS_ADMIN CAP_IPC_LOCK CAP_SYS_BOOT
"""
INTENDED = {
    "keyhandoff-agent.service": SHARED + """
ReadWritePaths=-/run/cryptsetup
RestrictAddressFamilies=AF_UNIX AF_NETLINK
DevicePolicy=closed
DeviceAllow=block-* r
ProtectKernelTunables=yes
SystemCallFilter=@system-service @memlock
SystemCallFilter=~@privileged @resources @obsolete
SystemCallFilter=mlockall
CapabilityBoundingSet=CAP_IPC_LOCK
""",
    "keyhandoff-capture-initrd.service": SHARED + RUNTIME_DIR + """
ReadWritePaths=-/run/cryptsetup
RestrictAddressFamilies=AF_UNIX AF_NETLINK
DevicePolicy=closed
DeviceAllow=block-* r
ProtectKernelTunables=yes
SystemCallFilter=@system-service @memlock
CapabilityBoundingSet=CAP_IPC_LOCK
""",
    "keyhandoff-finish.service": SHARED + RUNTIME_DIR + """
ReadWritePaths=-/run/cryptsetup
DevicePolicy=closed
DeviceAllow=block-* rw
ProtectKernelTunables=yes
SystemCallFilter=@system-service
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_IPC_LOCK
""",
    "keyhandoff-login.service": SHARED + RUNTIME_DIR + """
PrivateDevices=yes
ProtectKernelTunables=yes
SystemCallFilter=@system-service
CapabilityBoundingSet=
""",
    "keyhandoff-rearm.service": SHARED + RUNTIME_DIR + ARMING,
    "keyhandoff-schedule-shutdown.service": SHARED + RUNTIME_DIR + ARMING,
    "keyhandoff-schedule.service": SHARED + RUNTIME_DIR + ARMING,
    "keyhandoff-restore.service": SHARED + RUNTIME_DIR + """
ReadWritePaths=-/sys/firmware/efi/efivars -/run/cryptsetup
RestrictAddressFamilies=AF_UNIX AF_NETLINK
DevicePolicy=closed
DeviceAllow=block-* rw
SystemCallFilter=@system-service
CapabilityBoundingSet=CAP_LINUX_IMMUTABLE CAP_SYS_ADMIN CAP_IPC_LOCK
""",
}
# The sandbox properties in systemd's dump of a loaded unit (``systemd --test``); a property
# a unit does not set reads as its default, one with no value at all as ().
DUMPED = (
    "UMask", "KeyringMode", "LimitCORE", "LimitCORESoft", "ProtectSystem", "ProtectHome",
    "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock", "ProtectControlGroups",
    "ProtectHostname", "ProtectProc", "ProcSubset", "MemoryDenyWriteExecute",
    "RestrictRealtime", "RestrictSUIDSGID", "RestrictNamespaces", "LockPersonality",
    "CapabilityBoundingSet", "ReadWritePaths", "SystemCallFilter", "SystemCallArchitectures",
    "SystemCallErrorNumber", "DevicePolicy", "DeviceAllow", "IPAddressDeny",
    "RuntimeDirectory", "RuntimeDirectoryMode", "RuntimeDirectoryPreserve",
)
# What that dump leaves out, from ``systemd-analyze security``'s checks instead.
ANALYZED = ("NoNewPrivileges=", "RestrictAddressFamilies=", "RestrictNamespaces=")
UNIT_DIR = "usr/lib/systemd/system"


@pytest.fixture
def unit_root() -> Iterator[Path]:
    """A root directory systemd reads units from, readable by ``nobody`` (see effective)."""
    with tempfile.TemporaryDirectory(prefix="keyhandoff-units.") as root:
        Path(root).chmod(0o755)  # unit files only, no secret
        units = Path(root, UNIT_DIR)
        units.mkdir(parents=True)
        # what DefaultDependencies=yes pulls in, so systemd loads the unit in test mode
        for target in ("sysinit.target", "basic.target", "shutdown.target"):
            (units / target).write_text("[Unit]\nDefaultDependencies=no\n")
        yield Path(root)


def install(root: Path, *, dropin: Path | None = DROPIN_DIR) -> None:
    """The units (and the drop-in directory, unless None) where a package puts them."""
    for unit in UNITS:
        shutil.copy(unit, root / UNIT_DIR / unit.name)
    if dropin is not None:
        shutil.copytree(dropin, root / UNIT_DIR / DROPIN_DIR.name)


def effective(root: Path, name: str) -> dict[str, object]:
    """The sandbox of unit ``name`` under ``root`` as systemd loads it (drop-ins merged)."""
    systemd = "/lib/systemd/systemd"
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    assert Path(systemd).exists(), "systemd is not installed"
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    # "--test" loads the unit and dumps it; systemd refuses to do that as root
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                           systemd, "--test", "--system", f"--unit={name}", "--no-pager"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "SYSTEMD_UNIT_PATH": str(root / UNIT_DIR)})
    assert proc.returncode == 0, proc.stderr
    block: list[str] = []
    inside = False
    for line in proc.stdout.splitlines():
        if line.strip().startswith("-> Unit "):
            inside = line.strip() == f"-> Unit {name}:"
        elif inside:
            block.append(line.strip())
    values: dict[str, list[str]] = {}
    for line in block:
        key, sep, value = line.partition(": ")
        if not sep:
            key, _, value = line.rstrip(":").partition(":")
        values.setdefault(key, []).append(value.strip())
    assert "ProtectSystem" in values, f"no dump of {name}:\n{proc.stdout[-2000:]}"
    props: dict[str, object] = {}
    for key in DUMPED:
        got = values.get(key, [])
        if key in {"SystemCallFilter", "CapabilityBoundingSet", "ReadWritePaths"}:
            props[key] = tuple(sorted(" ".join(got).split()))  # sets, printed in hash order
        else:
            props[key] = tuple(sorted(got))
    sec = subprocess.run([analyze, "security", "--offline=yes", f"--root={root}",
                          "--json=short", "--no-pager", name],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    checks = json.loads(sec.stdout)
    for check in checks:
        if check["name"].startswith(ANALYZED):
            props[check["name"]] = (check["set"], check["description"])
    assert all(any(k.startswith(a) for k in props) for a in ANALYZED), checks
    return props


def intended(root: Path, name: str) -> dict[str, object]:
    """The effective sandbox of a stand-alone unit holding ``INTENDED[name]`` (no drop-in)."""
    reference = "reference-" + name.removeprefix("keyhandoff-")
    (root / UNIT_DIR / reference).write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n" + INTENDED[name])
    return effective(root, reference)


def sandbox_differences(root: Path) -> dict[str, dict[str, tuple[object, object]]]:
    """Per unit, each sandbox property whose effective value is not the intended one."""
    out: dict[str, dict[str, tuple[object, object]]] = {}
    for name in sorted(INTENDED):
        got, want = effective(root, name), intended(root, name)
        diff = {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys()
                if got.get(k) != want.get(k)}
        if diff:
            out[name] = diff
    return out


def test_every_unit_has_an_intended_sandbox():
    assert {u.name for u in UNITS} == set(INTENDED)


def test_effective_sandbox_is_the_intended_one(unit_root):
    install(unit_root)
    assert sandbox_differences(unit_root) == {}


def test_the_sandbox_check_sees_a_lost_property(unit_root, tmp_path):
    # the drop-in without one line, and one unit without one of its own lines
    weaker = tmp_path / DROPIN_DIR.name
    shutil.copytree(DROPIN_DIR, weaker)
    conf = weaker / "10-sandbox.conf"
    conf.write_text(conf.read_text().replace("NoNewPrivileges=yes\n", ""))
    install(unit_root, dropin=weaker)
    agent = unit_root / UNIT_DIR / "keyhandoff-agent.service"
    agent.write_text(agent.read_text().replace("ProtectKernelTunables=yes\n", ""))
    found = sandbox_differences(unit_root)
    assert set(found) == set(INTENDED)
    assert all("NoNewPrivileges=" in diff for diff in found.values())
    assert "ProtectKernelTunables" in found["keyhandoff-agent.service"]
    assert "ProtectKernelTunables" not in found["keyhandoff-finish.service"]


def test_the_sandbox_check_sees_a_missing_dropin(unit_root):
    install(unit_root, dropin=None)
    found = sandbox_differences(unit_root)
    assert set(found) == set(INTENDED)
    assert all({"ProtectSystem", "KeyringMode", "UMask"} <= diff.keys()
               for diff in found.values())


def test_only_our_units_get_the_dropin():
    # the prefix drop-in applies to any unit named "keyhandoff-*": none elsewhere in the tree
    # (a test helper's unit named so would be sandboxed like ours)
    named = {p.relative_to(REPO) for p in REPO.rglob("keyhandoff-*.service")
             if ".venv" not in p.parts and ".git" not in p.parts}
    # and the dracut module's, which runs only in the initramfs, where the drop-in is not
    # (test_initramfs.py: nothing else named keyhandoff is in the image)
    initrd = {Path(f"initramfs/dracut/90keyhandoff/keyhandoff-{name}.service")
              for name in ("keep-typed", "kexec-record")}
    assert named == {u.relative_to(REPO) for u in UNITS} | initrd
