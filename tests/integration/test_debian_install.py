"""The Debian packages, installed on a fresh Debian 12 root and purged again (issue #14).

The packages tests/support/debian_build.py builds (the ones test_debian_package.py lints)
go into a chroot of a throwaway overlay over a cached ``debootstrap --variant=minbase
bookworm`` root (tests/support/debian12_root.py): ``apt-get install`` of the three .deb
files and man-db, with Debian 12's own archive as apt's only source, so every dependency
must resolve there.  Nothing is installed on the host.  Then, in that root: the command and
the bindings run on Debian's python3; the units are enabled as the vendor preset says, both
by the maintainer scripts at install (deb-systemd-helper) and by ``systemctl preset``; the
maintainer scripts ask to start the agent and the path unit and nothing else; the man pages
are found and render without a warning; the PAM module and the token plugin are where
Debian 12 keeps them and their libraries resolve; ``apt-get purge`` leaves no file, no
directory and no enabled unit behind.

The maintainer scripts start units only where systemd runs (``[ -d /run/systemd/system ]``),
so the root has that directory, as a booted machine has, and a policy-rc.d that records
each request deb-systemd-invoke makes and allows it; systemctl runs offline
(``SYSTEMD_OFFLINE=1``, debian12_root.Root.run) and ignores start and stop, so nothing
runs.  The test that purges runs last (file order): the
others examine the installed root and refuse to run after it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import TYPE_CHECKING

import pytest
from support.debian12_root import Root, ensure_root, fresh_root, unreachable
from support.debian_build import (
    BOOT_STEPS,
    PACKAGES,
    TRIGGERED,
    VERSION,
    WATCHERS,
    contents,
    directories,
    multiarch,
)
from support.parts import require, require_binary
from vm.image import mirror_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    from support.debian_build import Build

#: inside the root: the packages while apt installs them, and the policy-rc.d's record
DEBS = "/tmp/kh-debs"
POLICY_LOG = "/var/log/kh-policy-rc.d.log"
#: records each request of deb-systemd-invoke (``policy-rc.d <unit> <action>``) and allows it
POLICY_RC_D = f"""#!/bin/sh
# the test's recorder (tests/integration/test_debian_install.py); exit 0: allowed
echo "$*" >>{POLICY_LOG}
exit 0
"""
#: apt-get install: the three packages and what the checks run (man, cryptsetup --help)
TOOLS = ("man-db", "cryptsetup-bin")
PRESET = "/lib/systemd/system-preset/80-keyhandoff.preset"
MAN = {"MANPAGER": "cat", "MANWIDTH": "80", "MAN_KEEP_STDERR": "1"}


class Installed:
    """The root with the packages installed, and what the install did."""

    def __init__(self, root: Root, build: Build, units: list[str]) -> None:
        self.root = root
        self.build = build
        self.units = units
        self.enabled_at_install: dict[str, str] = {}
        self.invoked_at_install: set[tuple[str, str]] = set()
        self.dirs_before: set[str] = set()
        self.purged = False


def is_enabled(root: Root, units: list[str]) -> dict[str, str]:
    """``systemctl is-enabled`` of each unit (one call each: a missing unit prints nothing)."""
    return {u: root.run("systemctl", "is-enabled", u, timeout=60).stdout.strip() for u in units}


def invoked(root: Root) -> set[tuple[str, str]]:
    """(unit, action) of keyhandoff's units in the policy-rc.d record since the last call."""
    record = root.path / POLICY_LOG.lstrip("/")
    lines = record.read_text().splitlines() if record.exists() else []
    record.write_text("")
    return {(words[0], words[1]) for words in (line.split() for line in lines)
            if len(words) >= 2 and words[0].startswith("keyhandoff")}


def existing(root: Root, paths: set[str]) -> set[str]:
    """Those of ``paths`` that exist in the root (symlinks too, dangling or not)."""
    script = 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
    return set(root.check("sh", "-c", script, "sh", *sorted(paths)).splitlines())


def owned_by(root: Root, path: str) -> set[str]:
    """The packages dpkg says own ``path`` (exactly that name: dpkg knows no symlinks)."""
    listed = root.run("dpkg-query", "-S", path, timeout=60).stdout
    return {name.strip() for line in listed.splitlines() if line.endswith(f": {path}")
            for name in line.removesuffix(f": {path}").split(",")}


def expected_states(root: Root) -> dict[str, str]:
    """What ``systemctl is-enabled`` says of each unit the vendor preset names, once applied.

    ``enable`` gives "enabled"; ``disable`` gives "disabled", or "static" for a unit with no
    [Install] section (keyhandoff-schedule.service: its path unit starts it).
    """
    states = {}
    for line in root.check("cat", PRESET).splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        verb, unit = words
        if verb == "enable":
            states[unit] = "enabled"
        else:
            assert verb == "disable", line
            text = root.check("cat", f"/lib/systemd/system/{unit}")
            states[unit] = "disabled" if "[Install]" in text else "static"
    return states


@pytest.fixture(scope="module")
def installed(built: Build, tmp_path_factory) -> Iterator[Installed]:
    require(os.geteuid() == 0, "root (debootstrap, mount and chroot need it)",
            "run the suite as root")
    require_binary("debootstrap", "apt-get install debootstrap")
    require_binary("chroot", "apt-get install coreutils")
    mirror = mirror_url()
    why = unreachable(mirror)
    require(not why, f"the Debian 12 archive ({why})",
            "network access to it (the mirror is the first URIs: of "
            "/etc/apt/sources.list.d/debian.sources)")

    bootstrap = ensure_root()
    print(f"debootstrap --variant=minbase bookworm ({'cached' if bootstrap.cached else 'built'}):"
          f" {bootstrap.seconds:.1f} s, {bootstrap.rootfs}")
    with fresh_root(bootstrap, tmp_path_factory.mktemp("debian12")) as root:
        policy = root.path / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        (root.path / "run/systemd/system").mkdir(parents=True, exist_ok=True)
        inside = root.path / DEBS.lstrip("/")
        inside.mkdir(mode=0o755)
        debs = []
        for package in PACKAGES:
            shutil.copy2(built.deb(package), inside)
            debs.append(f"{DEBS}/{built.deb(package).name}")
        units = sorted(p.removeprefix("/lib/systemd/system/")
                       for p in contents(built.deb("keyhandoff"))
                       if re.fullmatch(r"/lib/systemd/system/keyhandoff-[^/]*\.(service|path)", p))
        state = Installed(root, built, units)
        state.dirs_before = existing(root, set().union(
            *(directories(built.deb(p)) for p in PACKAGES)))
        before = set(root.check("dpkg-query", "-W", "-f=${Package}\n").split())

        start = time.monotonic()
        root.check("apt-get", "update", "-q")
        updated = time.monotonic()
        # the download first, on its own: the network's share of the time, then dpkg's
        root.check("apt-get", "install", "-y", "-q", "--download-only", *debs, *TOOLS,
                   timeout=1800)
        downloaded = time.monotonic()
        root.check("apt-get", "install", "-y", "-q", *debs, *TOOLS, timeout=1800)
        done = time.monotonic()
        after = set(root.check("dpkg-query", "-W", "-f=${Package}\n").split())
        print(f"apt-get update: {updated - start:.1f} s; apt-get install: download "
              f"{downloaded - updated:.1f} s, install {done - downloaded:.1f} s "
              f"({len(after - before)} packages added to the {len(before)} of minbase)")
        print(root.check("dpkg-query", "-W", "-f=${Package} ${Installed-Size} KiB\n",
                         *PACKAGES), end="")

        state.enabled_at_install = is_enabled(root, units)
        state.invoked_at_install = invoked(root)
        shutil.rmtree(inside)
        yield state


@pytest.fixture
def root(installed: Installed) -> Root:
    assert not installed.purged, "the packages were purged already (this test runs earlier)"
    return installed.root


def test_the_command_and_the_bindings_run_on_debian_12s_python(root):
    assert root.check("keyhandoff", "--version").strip() == f"keyhandoff {VERSION}"
    bindings = ", ".join(f"keyhandoff._bindings._{n}"
                         for n in ("keyutils", "linux", "efivar", "cryptsetup"))
    where = root.check("/usr/bin/python3", "-c",
                       f"import keyhandoff, sys, {bindings}; "
                       "print(keyhandoff.__file__, sys.implementation.cache_tag)")
    module, tag = where.split()
    assert module == "/usr/lib/python3/dist-packages/keyhandoff/__init__.py"
    # py3compile in the postinst made the bytecode the .deb does not carry
    assert root.exists(f"/usr/lib/python3/dist-packages/keyhandoff/__pycache__/__init__.{tag}.pyc")


def test_the_install_enabled_what_the_preset_enables(installed, root):
    expected = expected_states(root)
    assert sorted(expected) == installed.units  # the preset names every unit, and only those
    # deb-systemd-helper (the postinst) enables a unit it has not seen before with
    # `systemctl preset --preset-mode=enable-only` (init-system-helpers 1.65 on Debian 12)
    print("deb-systemd-helper at install:", ", ".join(
        f"{u} {s}" for u, s in sorted(installed.enabled_at_install.items())))
    assert installed.enabled_at_install == expected


def test_systemctl_preset_enables_the_units_the_preset_names(installed, root):
    expected = expected_states(root)
    root.check("systemctl", "disable", *installed.units)
    assert set(is_enabled(root, installed.units).values()) <= {"disabled", "static"}
    root.check("systemctl", "preset", *installed.units)
    assert is_enabled(root, installed.units) == expected


def test_the_maintainer_scripts_started_the_watchers_and_never_a_boot_step(installed):
    assert installed.invoked_at_install == {(u, "start") for u in WATCHERS}
    started = {unit for unit, _action in installed.invoked_at_install}
    assert started.isdisjoint((*BOOT_STEPS, *TRIGGERED))


@pytest.mark.parametrize(("page", "section"), [
    ("keyhandoff", "8"), ("keyhandoff.conf", "5"), ("pam_keyhandoff", "8")])
def test_man_finds_and_renders_the_pages(root, page, section):
    where = root.check("man", "-w", page).strip()
    assert where == f"/usr/share/man/man{section}/{page}.{section}.gz"
    proc = root.run("man", page, env=MAN, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{page.upper()}({section})"), first
    assert len(proc.stdout.splitlines()) > 20


def test_the_pam_module_is_where_debian_12_keeps_pam_modules(root):
    security = f"/lib/{multiarch()}/security"
    # dpkg's own paths: Debian 12's PAM modules are under /lib (the /usr-move moratorium)
    assert f"{security}/pam_unix.so" in root.check("dpkg-query", "-L", "libpam-modules").split()
    assert f"{security}/pam_keyhandoff.so" in root.check(
        "dpkg-query", "-L", "libpam-keyhandoff").split()
    libraries = root.check("ldd", f"{security}/pam_keyhandoff.so")
    assert "not found" not in libraries, libraries


def test_the_token_plugin_is_where_libcryptsetup_looks(root):
    found = re.search(r"^LUKS2 external token plugin path: (.*)\.$",
                      root.check("cryptsetup", "--help"), re.MULTILINE)
    assert found is not None
    plugin = f"{found[1]}/libcryptsetup-token-keyhandoff-onetime.so"
    assert plugin in root.check("dpkg-query", "-L", "cryptsetup-keyhandoff").split()
    libraries = root.check("ldd", plugin)
    assert "not found" not in libraries, libraries


def test_the_bindings_libraries_resolve(root):
    for name in ("keyutils", "linux", "efivar", "cryptsetup"):
        libraries = root.check(
            "ldd", f"/usr/lib/python3/dist-packages/keyhandoff/_bindings/_{name}.abi3.so")
        assert "not found" not in libraries, libraries


# last: it removes what the tests above examine
def test_apt_get_purge_leaves_nothing_behind(installed):
    root = installed.root
    assert not installed.purged
    installed.purged = True
    start = time.monotonic()
    root.check("apt-get", "purge", "-y", "-q", *PACKAGES)
    print(f"apt-get purge: {time.monotonic() - start:.1f} s")
    for package in PACKAGES:
        status = root.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", package)
        assert status.returncode != 0 or status.stdout.strip() in {"un", ""}, status.stdout
    # the prerm stopped the two it started, and nothing else
    assert invoked(root) == {(u, "stop") for u in WATCHERS}
    debs = [installed.build.deb(p) for p in PACKAGES]
    assert existing(root, set().union(*(contents(d) for d in debs))) == set()
    # a directory of the packages left behind existed before, or is another package's
    # under the name dpkg knows it by: /lib/<triplet>/cryptsetup (ours) is systemd's
    # /usr/lib/<triplet>/cryptsetup (its token plugins) through the merged-/usr symlink
    for directory in sorted(existing(root, set().union(*(directories(d) for d in debs)))
                            - installed.dirs_before):
        canonical = root.check("readlink", "-f", directory).strip()
        owners = {owner for name in (directory, canonical) for owner in owned_by(root, name)}
        assert owners, f"{directory} ({canonical}) is left, and no package owns it"
        assert owners.isdisjoint(PACKAGES), owners
    # no unit, no enablement symlink, no deb-systemd-helper state, no bytecode, no file at all
    listed = root.run("systemctl", "list-unit-files", "--no-legend", "keyhandoff*")
    assert listed.stdout.strip() == "", listed.stdout
    # (not apt's and dpkg's logs; not man-db's cache of the pages the test above formatted,
    # /var/cache/man/cat*/: man-db's daily job deletes cat pages a week old)
    left = root.check("find", "/", "-xdev", "-name", "*keyhandoff*",
                      "-not", "-path", "/var/log/*", "-not", "-path", "/var/cache/man/cat*")
    assert left == ""
