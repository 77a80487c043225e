"""``make install DESTDIR=...``: the tree a distribution packages, checked with real tools.

One ``make install`` into a scratch root (the module's fixture; its build directory is
scratch too) builds the sdist with Debian's python3-build, a wheel from that sdist, the PAM
module and the token plugin, and installs everything.  Then: the tree holds exactly what
the Makefile promises and nothing outside it; the console script in the root runs and
prints the version of the installed metadata; the bindings import from the root;
``systemd-analyze verify --root`` passes every installed unit; ``systemctl --root
preset-all`` enables exactly the preset's units where ``disable *`` is the default (as on
Fedora); the sdist holds every tracked file.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.parts import require, require_binary

import keyhandoff
from keyhandoff import config

REPO = Path(__file__).resolve().parents[2]
VERSION = keyhandoff.__version__
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
#: What installs each unit type (the Makefile's glob).
UNIT_GLOBS = ("*.service", "*.path", "*.timer", "*.socket")


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          check=False, timeout=600, **kwargs)  # type: ignore[call-overload]


def tool_output(*argv: str) -> str:
    path = shutil.which(argv[0])
    if path is None:
        return ""
    proc = run(path, *argv[1:], env=ENV)
    return proc.stdout.strip() if proc.returncode == 0 else ""


@dataclass(frozen=True)
class Install:
    root: Path
    build: Path
    seconds: float

    @property
    def unitdir(self) -> Path:
        return self.root / (tool_output("pkg-config", "--variable=systemdsystemunitdir",
                                        "systemd") or "/usr/lib/systemd/system").lstrip("/")

    @property
    def presetdir(self) -> Path:
        return self.root / (tool_output("pkg-config", "--variable=systemdsystempresetdir",
                                        "systemd") or "/usr/lib/systemd/system-preset").lstrip("/")

    @property
    def site(self) -> Path:
        return self.root / "usr/lib/python3/dist-packages"

    def files(self) -> set[str]:
        return {"/" + str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if not p.is_dir()}


def tool_requirements() -> None:
    for module, package in (("build", "python3-build"), ("installer", "python3-installer"),
                            ("setuptools", "python3-setuptools"), ("wheel", "python3-wheel"),
                            ("cffi", "python3-cffi")):
        found = run("/usr/bin/python3", "-c", f"import {module}", env=ENV).returncode == 0
        require(found, f"Debian's {package}", f"apt-get install {package}")
    require_binary("make", "apt-get install make")
    require_binary("cc", "apt-get install build-essential")
    require_binary("cryptsetup", "apt-get install cryptsetup-bin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    tool_requirements()
    base = tmp_path_factory.mktemp("install")
    root, build = base / "root", base / "build"
    started = time.monotonic()
    proc = run("make", "-C", REPO, "install", f"DESTDIR={root}", "PREFIX=/usr",
               f"BUILDDIR={build}", env={**ENV, "HOME": str(base)})
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = Install(root, build, seconds)
    print(f"make install: {seconds:.1f} s, {len(result.files())} files")
    return result


def multiarch() -> str:
    triplet = tool_output("dpkg-architecture", "-qDEB_HOST_MULTIARCH") or tool_output(
        "gcc", "-print-multiarch")
    require(bool(triplet), "a multiarch triplet", "apt-get install dpkg-dev")
    return triplet


def token_dir() -> str:
    for line in run("cryptsetup", "--help", env=ENV).stdout.splitlines():
        if line.startswith("LUKS2 external token plugin path: "):
            return line.split(": ", 1)[1].rstrip(".")
    pytest.fail("cryptsetup names no external token plugin path")


def unit_files() -> list[Path]:
    return sorted(p for g in UNIT_GLOBS for p in (REPO / "units").glob(g))


def expected_files(inst: Install) -> set[str]:
    """Every file make install promises outside the Python package, by absolute path."""
    unitdir = "/" + str(inst.unitdir.relative_to(inst.root))
    presetdir = "/" + str(inst.presetdir.relative_to(inst.root))
    files = {f"{unitdir}/{u.name}" for u in unit_files()}
    files |= {f"{unitdir}/{d.name}/{c.name}" for d in (REPO / "units").glob("*.d")
              for c in d.glob("*.conf")}
    files |= {f"{unitdir}/packagekit-offline-update.service.d/keyhandoff.conf",
              f"{presetdir}/80-keyhandoff.preset",
              "/usr/lib/keyhandoff/keyhandoff.conf",  # nothing in /etc: the admin's
              "/usr/bin/keyhandoff",
              f"/usr/lib/{multiarch()}/security/pam_keyhandoff.so",
              f"{token_dir()}/libcryptsetup-token-keyhandoff-onetime.so",
              "/usr/lib/dracut/modules.d/90keyhandoff/module-setup.sh",
              "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-keep-typed.sh",
              "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-keep-typed.service",
              "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-kexec-record.sh",
              "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-kexec-record.service",
              "/usr/share/initramfs-tools/hooks/keyhandoff",
              "/usr/share/initramfs-tools/scripts/local-top/keyhandoff",
              "/usr/share/initramfs-tools/scripts/local-premount/keyhandoff",
              "/usr/share/initramfs-tools/scripts/local-bottom/keyhandoff",
              "/usr/share/man/man8/keyhandoff.8",
              "/usr/share/man/man8/pam_keyhandoff.8",
              "/usr/share/man/man5/keyhandoff.conf.5",
              "/usr/share/bash-completion/completions/keyhandoff"}
    doc = "/usr/share/doc/keyhandoff"
    files |= {f"{doc}/{n}" for n in ("README.md", "SECURITY.md", "CHANGELOG.md", "LICENSE",
                                     "COPYRIGHT", "README.initramfs.md")}
    files |= {f"{doc}/examples/pam/{p.name}" for p in (REPO / "units" / "pam").iterdir()}
    return files


def python_files(inst: Install) -> set[str]:
    """The package's sources and its four compiled bindings, as installed (no bytecode)."""
    site = "/" + str(inst.site.relative_to(inst.root))
    files = {f"{site}/{p.relative_to(REPO)}" for p in (REPO / "keyhandoff").rglob("*")
             if p.suffix in {".py", ".pyi"}}
    files |= {f"{site}/keyhandoff/_bindings/_{n}.abi3.so"
              for n in ("keyutils", "linux", "efivar", "cryptsetup")}
    dist_info = f"{site}/keyhandoff-{VERSION}.dist-info"
    files |= {f"{dist_info}/{n}" for n in ("METADATA", "RECORD", "WHEEL", "entry_points.txt",
                                           "top_level.txt", "LICENSE", "COPYRIGHT")}
    return files


def test_the_tree_is_exactly_what_the_makefile_promises(installed):
    found = {f for f in installed.files() if "/__pycache__/" not in f}
    expected = expected_files(installed) | python_files(installed)
    assert sorted(found - expected) == []   # nothing stray (no /usr/local, no site-packages)
    assert sorted(expected - found) == []
    # the bytecode installer compiled is beside the sources it belongs to, nowhere else
    pycache = {f for f in installed.files() if "/__pycache__/" in f}
    assert pycache
    assert all(f.startswith(str("/" / installed.site.relative_to(installed.root)))
               for f in pycache)


def test_installed_modes(installed):
    root = installed.root
    assert os.stat(root / "usr/bin/keyhandoff").st_mode & 0o777 == 0o755
    for script in ("usr/share/initramfs-tools/hooks/keyhandoff",
                   "usr/lib/dracut/modules.d/90keyhandoff/module-setup.sh",
                   "usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-keep-typed.sh",
                   "usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-kexec-record.sh"):
        assert os.stat(root / script).st_mode & 0o777 == 0o755
    for data in (installed.unitdir / "keyhandoff-agent.service",
                 root / "usr/lib/keyhandoff/keyhandoff.conf",
                 root / f"usr/lib/{multiarch()}/security/pam_keyhandoff.so"):
        assert os.stat(data).st_mode & 0o777 == 0o644


def installed_env(inst: Install) -> dict[str, str]:
    # PYTHONSAFEPATH: not the current directory; the checkout is not on the path at all
    return {**ENV, "PYTHONPATH": str(inst.site), "PYTHONSAFEPATH": "1",
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def test_the_console_script_prints_the_metadata_version(installed, tmp_path):
    script = installed.root / "usr/bin/keyhandoff"
    assert script.read_text().splitlines()[0] == "#!/usr/bin/python3"
    metadata = email.parser.Parser().parsestr(
        (installed.site / f"keyhandoff-{VERSION}.dist-info/METADATA").read_text())
    assert metadata["Name"] == "keyhandoff"
    assert metadata["License"] == "LGPL-2.1-or-later"
    proc = run(script, "--version", env=installed_env(installed), cwd=tmp_path)
    expected = f"keyhandoff {metadata['Version']}\n"
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected, "")


def test_the_bindings_import_from_the_root(installed, tmp_path):
    probe = ("import keyhandoff, importlib\n"
             "for n in ('keyutils', 'linux', 'efivar', 'cryptsetup'):\n"
             "    print(importlib.import_module('keyhandoff._bindings._' + n).__file__)\n"
             "print(keyhandoff.__file__)\n")
    proc = run("/usr/bin/python3", "-c", probe, env=installed_env(installed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert len(paths) == 5
    assert all(Path(p).is_relative_to(installed.site) for p in paths), paths


def test_the_version_loads_nothing_compiled(installed, tmp_path):
    probe = ("import sys\nfrom keyhandoff import cli\n"
             "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if 'bindings' in m or 'cffi' in m))\n")
    proc = run("/usr/bin/python3", "-c", probe, env=installed_env(installed), cwd=tmp_path)
    assert proc.stdout.splitlines() == [f"keyhandoff {VERSION}", "[]"]


def verify_root(root: Path, units: list[str]) -> str:
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    proc = run(analyze, "verify", "--man=no", f"--root={root}", *units,
               env={**ENV, "SYSTEMD_LOG_LEVEL": "notice"})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"exit {proc.returncode}"]
    return "\n".join(lines)


def target_system(inst: Install, where: Path) -> Path:
    """The DESTDIR tree on top of what any system it installs into has: systemd's targets
    (this host's) and /bin/true (keyhandoff-rearm's ExecStart=), bin -> usr/bin."""
    root = where / "root"
    shutil.copytree(inst.root, root, symlinks=True)
    host_units = Path("/" + str(inst.unitdir.relative_to(inst.root)))
    unitdir = root / inst.unitdir.relative_to(inst.root)
    for target in host_units.glob("*.target"):
        if not (unitdir / target.name).exists():
            shutil.copy(target, unitdir / target.name, follow_symlinks=True)
    if not (root / "bin").exists():
        (root / "bin").symlink_to("usr/bin")
    shutil.copy("/usr/bin/true", root / "usr/bin/true")
    return root


def test_systemd_analyze_verifies_the_installed_units(installed, tmp_path):
    # --root: the units, their drop-ins and ExecStart=/usr/bin/keyhandoff as installed
    root = target_system(installed, tmp_path)
    assert verify_root(root, [u.name for u in unit_files()]) == ""


def test_the_root_verify_sees_a_missing_binary_and_a_broken_dropin(installed, tmp_path):
    broken = target_system(installed, tmp_path)
    (broken / "usr/bin/keyhandoff").unlink()
    dropin = broken / installed.unitdir.relative_to(installed.root) / "keyhandoff-.service.d"
    with (dropin / "10-sandbox.conf").open("a") as f:
        f.write("ProtectSystem=strictt\n")
    out = verify_root(broken, ["keyhandoff-finish.service"])
    assert "/usr/bin/keyhandoff is not executable" in out
    assert "strictt" in out


def preset_links(root: Path) -> set[str]:
    """``systemctl --root preset-all`` where everything without a preset line is disabled."""
    systemctl = require_binary("systemctl", "apt-get install systemd")
    vendor = root / "etc/systemd/system-preset"
    vendor.mkdir(parents=True, exist_ok=True)
    (vendor / "99-default-disable.preset").write_text("disable *\n")
    proc = run(systemctl, f"--root={root}", "preset-all", env=ENV)
    assert proc.returncode == 0, proc.stderr
    wants = root / "etc/systemd/system"
    return {str(p.relative_to(wants)) for p in wants.rglob("*") if p.is_symlink()}


def install_targets(unit: Path) -> set[str]:
    """``<target>.wants/<unit>`` for each WantedBy= of the unit's [Install] section."""
    targets: set[str] = set()
    section = ""
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            targets |= {f"{t}.wants/{unit.name}" for t in line.split("=", 1)[1].split()}
    return targets


def test_the_preset_names_every_unit():
    lines = (REPO / "units" / "80-keyhandoff.preset").read_text().splitlines()
    named = {ln.split()[1] for ln in lines if ln.startswith(("enable ", "disable "))}
    assert sorted({u.name for u in unit_files()} - named) == []
    assert sorted(named - {u.name for u in unit_files()}) == []


def test_systemctl_preset_enables_the_boot_units(installed, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    preset = (REPO / "units" / "80-keyhandoff.preset").read_text().splitlines()
    enabled = {ln.split()[1] for ln in preset if ln.startswith("enable ")}
    assert enabled >= {"keyhandoff-restore.service", "keyhandoff-capture-initrd.service",
                       "keyhandoff-agent.service", "keyhandoff-finish.service",
                       "keyhandoff-rearm.service"}
    expected = set().union(*(install_targets(u) for u in unit_files() if u.name in enabled))
    assert "sysinit.target.wants/keyhandoff-agent.service" in expected
    assert preset_links(root) == expected


def test_without_the_preset_nothing_is_enabled(installed, tmp_path):
    # the check above can fail: the default "disable *" alone enables none of the units
    root = tmp_path / "root"
    shutil.copytree(installed.root, root, symlinks=True)
    (root / installed.presetdir.relative_to(installed.root) / "80-keyhandoff.preset").unlink()
    assert preset_links(root) == set()


def test_the_installed_vendor_config_sets_every_default(installed, tmp_path):
    path = installed.root / "usr/lib/keyhandoff/keyhandoff.conf"
    assert path.read_bytes() == (REPO / "units" / "keyhandoff.conf").read_bytes()
    assert config.load(str(path)) == config.Config()
    # the installed command reads it where keyhandoff.conf(5) says, below the root
    script = installed.root / "usr/bin/keyhandoff"
    proc = run(script, "config", "--json", "--root", installed.root,
               env=installed_env(installed), cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["files"] == [str(path)]
    assert {s["file"] for s in shown["sources"]} == {str(path)}
    assert len(shown["sources"]) == len(shown["settings"]) == len(config._SCHEMA)


def test_the_installed_man_pages_render(installed):
    man = require_binary("man", "apt-get install man-db groff-base")
    for page, title in (("man8/keyhandoff.8", "KEYHANDOFF(8)"),
                        ("man5/keyhandoff.conf.5", "KEYHANDOFF.CONF(5)"),
                        ("man8/pam_keyhandoff.8", "PAM_KEYHANDOFF(8)")):
        proc = run(man, "--warnings", "-l", installed.root / "usr/share/man" / page,
                   env={**ENV, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"})
        text = re.sub(".\b", "", proc.stdout)  # grotty's overstrike (bold, underline)
        assert proc.returncode == 0
        assert proc.stderr == ""
        assert text.lstrip().startswith(title)
        assert "\nNAME\n" in text


def sdist(inst: Install) -> Path:
    return inst.build / "dist" / f"keyhandoff-{VERSION}.tar.gz"


def test_the_sdist_holds_the_source(installed):
    with tarfile.open(sdist(installed)) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    required = {"LICENSE", "COPYRIGHT", "CHANGELOG.md", "README.md", "SECURITY.md",
                "MANIFEST.in", "Makefile", "setup.py", "pyproject.toml", "PKG-INFO",
                "cffi_build/keyutils.py", "cffi_build/cryptsetup.py", "csrc/build-pam",
                "csrc/pam_keyhandoff.c", "units/keyhandoff-agent.service",
                "units/80-keyhandoff.preset", "units/keyhandoff-.service.d/10-sandbox.conf",
                "initramfs/README.md", "man/keyhandoff.8", "man/keyhandoff.conf.5",
                "man/pam_keyhandoff.8", "completion/keyhandoff.bash",
                "tests/integration/test_install.py", "keyhandoff/cli.py"}
    assert sorted(required - names) == []
    # no build product: in-place bindings, their generated C, bytecode
    assert [n for n in names if n.endswith((".so", ".o", ".pyc"))
            or (n.startswith("keyhandoff/_bindings/_") and n.endswith(".c"))] == []
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the sdist is compared with the required list only")
    tracked = run(git, "-C", REPO, "ls-files", env=ENV).stdout.split()
    assert tracked
    # everything tracked but the repository's own CI entry point and .gitignore
    assert sorted(f for f in tracked if f not in names
                  and not f.startswith(".ci/") and f != ".gitignore") == []


def test_the_wheel_was_built_from_the_sdist_and_is_complete(installed):
    wheels = sorted((installed.build / "dist").glob(f"keyhandoff-{VERSION}-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
    assert {f"keyhandoff/_bindings/_{n}.abi3.so" for n in ("keyutils", "linux", "efivar",
                                                           "cryptsetup")} <= names
    assert {f"keyhandoff-{VERSION}.dist-info/{n}" for n in ("LICENSE", "COPYRIGHT")} <= names
    print(f"sdist {sdist(installed).stat().st_size} bytes, wheel {wheels[0].name} "
          f"{wheels[0].stat().st_size} bytes")
