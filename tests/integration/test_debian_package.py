"""The Debian packages and the Fedora spec, built and checked with the distributions' tools.

One ``dpkg-buildpackage -us -uc -b`` in a scratch copy of the tracked files (``git
ls-files``, as a clean clone has them: no build products, no venv) builds keyhandoff,
libpam-keyhandoff and cryptsetup-keyhandoff (tests/support/debian_build.py; the same build
is installed in a fresh Debian 12 root by test_debian_install.py).  Then: each .deb holds
exactly the files listed here, under Debian 12's paths; its control fields and maintainer
scripts are what debian/ promises (the boot steps are never started, stopped or
restarted); lintian finds nothing, not even at ``-I --pedantic`` (every override in debian/
carries its reason).  The source package (``dpkg-source -b`` of the same copy) is linted
too.  The Fedora spec expands with Fedora's macros (rpm/fedora.macros) and rpmlint passes it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from support.debian_build import (
    BOOT_STEPS,
    ENV,
    REPO,
    TRIGGERED,
    VERSION,
    WATCHERS,
    arch,
    contents,
    copy_tracked,
    multiarch,
    run,
)
from support.parts import require_binary

if TYPE_CHECKING:
    from pathlib import Path

APT = "apt-get install debhelper dh-python lintian fakeroot"


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name, env=ENV).stdout.strip()


def control_file(deb: Path, name: str, tmp_path: Path) -> str:
    where = tmp_path / deb.name
    assert run("dpkg-deb", "-e", deb, where, env=ENV).returncode == 0
    path = where / name
    return path.read_text() if path.exists() else ""


def test_the_build_makes_the_three_packages_and_their_debug_symbols(built):
    debs = sorted(p.name for p in built.out.glob("*.deb"))
    a = arch()
    assert debs == sorted(f"{p}_{VERSION}_{a}.deb" for p in (
        "keyhandoff", "keyhandoff-dbgsym", "libpam-keyhandoff", "libpam-keyhandoff-dbgsym",
        "cryptsetup-keyhandoff", "cryptsetup-keyhandoff-dbgsym"))
    for deb in sorted(built.out.glob("*.deb")):
        print(f"{deb.name} {deb.stat().st_size} bytes")


def test_keyhandoff_holds_the_command_library_units_config_and_docs(built):
    files = contents(built.deb("keyhandoff"))
    site = "/usr/lib/python3/dist-packages"
    expected = {
        "/usr/bin/keyhandoff", "/usr/lib/keyhandoff/keyhandoff.conf",
        *(f"/lib/systemd/system/{u}" for u in (*WATCHERS, *BOOT_STEPS, *TRIGGERED)),
        "/lib/systemd/system/keyhandoff-.service.d/10-sandbox.conf",
        "/lib/systemd/system/packagekit-offline-update.service.d/keyhandoff.conf",
        "/lib/systemd/system-preset/80-keyhandoff.preset",
        "/usr/share/man/man8/keyhandoff.8.gz", "/usr/share/man/man5/keyhandoff.conf.5.gz",
        "/usr/share/bash-completion/completions/keyhandoff",
        "/usr/share/doc/keyhandoff/copyright", "/usr/share/doc/keyhandoff/changelog.gz",
        "/usr/share/doc/keyhandoff/NEWS.md.gz", "/usr/share/doc/keyhandoff/README.md.gz",
        "/usr/share/doc/keyhandoff/SECURITY.md.gz", "/usr/share/doc/keyhandoff/COPYRIGHT",
        "/usr/share/doc/keyhandoff/README.initramfs.md.gz",
        "/usr/share/lintian/overrides/keyhandoff",
        *(f"/usr/share/doc/keyhandoff/examples/pam/{p.name}"
          for p in (REPO / "units/pam").iterdir()),
        *(f"{site}/keyhandoff/_bindings/_{n}.abi3.so"
          for n in ("keyutils", "linux", "efivar", "cryptsetup")),
        f"{site}/keyhandoff-{VERSION}.dist-info/METADATA",
        f"{site}/keyhandoff-{VERSION}.dist-info/RECORD",
    }
    assert sorted(expected - files) == []
    # every module of the package, no bytecode (py3compile makes it on the machine)
    modules = {f"{site}/{p.relative_to(REPO)}" for p in (REPO / "keyhandoff").rglob("*.py")}
    assert sorted(modules - files) == []
    assert [f for f in files if f.endswith((".pyc", ".pyo"))] == []
    # nothing of the other two packages, nothing under /usr/local
    python_files = {f for f in files if f.startswith(f"{site}/")}
    assert sorted(files - expected - python_files) == []


def test_libpam_keyhandoff_holds_the_module_where_debian_12_keeps_them(built):
    assert contents(built.deb("libpam-keyhandoff")) == {
        f"/lib/{multiarch()}/security/pam_keyhandoff.so",
        "/usr/share/man/man8/pam_keyhandoff.8.gz",
        "/usr/share/lintian/overrides/libpam-keyhandoff",
        "/usr/share/doc/libpam-keyhandoff/copyright",
        "/usr/share/doc/libpam-keyhandoff/changelog.gz",
    }


def test_cryptsetup_keyhandoff_holds_the_plugin_and_the_initramfs_parts(built):
    tokendir = re.search(r"^LUKS2 external token plugin path: (.*)\.$",
                         run("cryptsetup", "--help", env=ENV).stdout, re.MULTILINE)
    assert tokendir is not None
    assert contents(built.deb("cryptsetup-keyhandoff")) == {
        f"{tokendir[1]}/libcryptsetup-token-keyhandoff-onetime.so",
        "/usr/lib/dracut/modules.d/90keyhandoff/module-setup.sh",
        "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-keep-typed.sh",
        "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-keep-typed.service",
        "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-kexec-record.sh",
        "/usr/lib/dracut/modules.d/90keyhandoff/keyhandoff-kexec-record.service",
        "/usr/share/initramfs-tools/hooks/keyhandoff",
        "/usr/share/initramfs-tools/scripts/local-top/keyhandoff",
        "/usr/share/initramfs-tools/scripts/local-premount/keyhandoff",
        "/usr/share/initramfs-tools/scripts/local-bottom/keyhandoff",
        "/usr/share/doc/cryptsetup-keyhandoff/copyright",
        "/usr/share/doc/cryptsetup-keyhandoff/changelog.gz",
    }


def test_control_fields(built):
    keyhandoff_deb = built.deb("keyhandoff")
    assert field(keyhandoff_deb, "Version") == VERSION
    depends = field(keyhandoff_deb, "Depends")
    # ${python3:Depends} from the wheel's metadata, ${shlibs:Depends} from the bindings,
    # systemd for systemctl and systemd-ask-password
    for dep in ("python3-cryptography", "python3-pyudev", "python3-systemd",
                "python3-cffi-backend", "libcryptsetup12", "libkeyutils1", "libefivar1",
                "systemd"):
        assert dep in depends, depends
    assert field(keyhandoff_deb, "Recommends") == "cryptsetup-keyhandoff"
    pam = built.deb("libpam-keyhandoff")
    assert "libpam0g" in field(pam, "Depends")
    assert field(pam, "Multi-Arch") == "same"
    token = built.deb("cryptsetup-keyhandoff")
    assert "libcryptsetup12" in field(token, "Depends")
    assert "libjson-c5" in field(token, "Depends")
    # keyctl for the dracut module's keep-typed unit (and Debian's decrypt_keyctl)
    assert "keyutils" in field(token, "Recommends").split(", ")


def test_maintainer_scripts_never_start_stop_or_restart_the_boot_steps(built, tmp_path):
    deb = built.deb("keyhandoff")
    scripts = {name: control_file(deb, name, tmp_path)
               for name in ("preinst", "postinst", "prerm", "postrm")}
    for unit in (*BOOT_STEPS, *WATCHERS):
        # enabled for the next boot (deb-systemd-helper, as the preset says)
        assert f"deb-systemd-helper enable '{unit}'" in scripts["postinst"]
    invoked = re.findall(r"deb-systemd-invoke [^\n]*", "\n".join(scripts.values()))
    assert invoked, "the agent is started and restarted"
    for line in invoked:
        assert all(unit not in line for unit in (*BOOT_STEPS, *TRIGGERED)), line
    assert all(f"'{unit}'" not in scripts["postinst"] for unit in TRIGGERED)
    # the agent: started on install, restarted once the new files are in place,
    # stopped only when the package is removed
    started = [ln for ln in invoked if ln.startswith("deb-systemd-invoke $_dh_action ")]
    stopped = re.findall(r"deb-systemd-invoke stop [^\n]*", scripts["prerm"])
    for unit in WATCHERS:
        assert any(f"'{unit}'" in ln for ln in started), started
        assert any(f"'{unit}'" in ln for ln in stopped), stopped
    # nothing in /etc, so no conffile: the vendor defaults are in /usr/lib/keyhandoff and an
    # upgrade never asks about a file the administrator did not write (keyhandoff.conf(5))
    assert control_file(deb, "conffiles", tmp_path) == ""


def test_the_token_package_regenerates_the_initramfs(built, tmp_path):
    triggers = control_file(built.deb("cryptsetup-keyhandoff"), "triggers", tmp_path)
    assert [line for line in triggers.splitlines() if not line.startswith("#")] == [
        "activate-noawait update-initramfs"]


def test_lintian_finds_nothing(built):
    proc = run("lintian", "-I", "--pedantic", "--tag-display-limit", "0",
               built.out / f"keyhandoff_{VERSION}_{arch()}.changes", env=ENV)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPXO]: ", line)]
    assert tags == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lintian_finds_nothing_in_the_source_package(tmp_path):
    require_binary("lintian", APT)
    src = tmp_path / "keyhandoff"
    copy_tracked(src)
    proc = run("dpkg-source", "-b", src.name, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("lintian", "-I", "--pedantic", "--tag-display-limit", "0",
               tmp_path / f"keyhandoff_{VERSION}.dsc", env=ENV)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPXO]: ", line)]
    assert tags == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_changelog_and_the_spec_carry_the_package_version():
    first = (REPO / "debian/changelog").read_text().splitlines()[0]
    assert first.startswith(f"keyhandoff ({VERSION}) "), first
    spec = (REPO / "rpm/keyhandoff.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.MULTILINE)


def test_the_fedora_spec_expands_with_fedoras_macros():
    rpmspec = require_binary("rpmspec", "apt-get install rpm")
    proc = run(rpmspec, "--load", REPO / "rpm/fedora.macros", "-P", REPO / "rpm/keyhandoff.spec",
               env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    body = [line for line in proc.stdout.splitlines() if not line.lstrip().startswith("#")]
    assert [line for line in body if "%{" in line] == []
    text = "\n".join(body)
    assert "PAMDIR=/usr/lib64/security TOKENDIR=/usr/lib64/cryptsetup" in text
    assert "/usr/lib64/python3.13/site-packages/keyhandoff/" in text
    assert "/usr/lib/keyhandoff/" in text.splitlines()  # the vendor file; nothing in /etc
    assert "%config" not in text
    # only the agent is marked for restart after an upgrade, or stopped on erase
    for verb in ("mark-restart-system-units", "remove-system-units"):
        lines = [line for line in body if verb in line]
        assert lines
        assert all(u not in line for line in lines for u in (*BOOT_STEPS, *TRIGGERED)), lines
        assert all(all(w in line for w in WATCHERS) for line in lines)
    assert "--now" not in text


def test_rpmlint_passes_the_spec():
    rpmlint = require_binary("rpmlint", "apt-get install rpmlint")
    proc = run(rpmlint, "-r", REPO / "rpm/keyhandoff.rpmlintrc", REPO / "rpm/keyhandoff.spec",
               env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 errors, 0 warnings" in proc.stdout, proc.stdout
