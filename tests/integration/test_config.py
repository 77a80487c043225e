"""The configuration through the real command: ``keyhandoff config``, ``--config``, and a typo
that must never keep a boot step from destroying a one-time keyslot.

The boot steps run as the units run them (``python -m keyhandoff finish``...) in a private
mount namespace whose /etc is an overlay holding a broken keyhandoff.conf, a drop-in that is
not UTF-8 and a crypttab naming a real LUKS2 image with a stale one-time keyslot; its
/run/keyhandoff is a private tmpfs (the once-per-boot markers).  The machine's /etc is not
touched.  Logs go to stderr (``KEYHANDOFF_LOG=stderr``), libefivar to a scratch directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.etc_overlay import etc_overlay, put
from support.luks_images import format_image, opens, uuid_of
from support.passphrases import make
from support.scratch_efi import scratch_efivars, scratch_env

from keyhandoff import onetime
from keyhandoff.cache import SystemdCache
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    import contextlib

ADMIN = "etc/keyhandoff/keyhandoff.conf"
ETC_D = "etc/keyhandoff/keyhandoff.conf.d"


def kh(*args: object, prefix: list[str] | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*(prefix or []), sys.executable, "-m", "keyhandoff", *map(str, args)],
                          capture_output=True, timeout=180, check=False, env=env)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                      proc.stderr.decode(errors="replace"))
    assert "Traceback" not in out.stderr, out.stderr
    return out


# --- keyhandoff config ----------------------------------------------------------------------


def layered_root(root: Path) -> None:
    vendor = Path(__file__).resolve().parents[2] / "units" / "keyhandoff.conf"
    put(root, "usr/lib/keyhandoff/keyhandoff.conf", vendor.read_text())
    put(root, ADMIN, "[login]\nenabled = true\n\n[capture]\nretian = 60\n")
    put(root, f"{ETC_D}/60-timeout.conf",
        '[login]\ntimeout = 30\n[capture]\nwait_for_update = "2h"\n')
    put(root, "run/keyhandoff/keyhandoff.conf.d/60-timeout.conf", "[login]\ntimeout = 1\n")


def test_config_prints_every_setting_and_where_it_came_from(tmp_path):
    layered_root(tmp_path)
    vendor = tmp_path / "usr/lib/keyhandoff/keyhandoff.conf"
    vendor_lines = vendor.read_text().splitlines()
    r = kh("config", "--root", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"keyhandoff: warning: {tmp_path}/{ADMIN}:5: unknown setting "
                        "capture.retian (did you mean retain?), ignored\n")
    line = {k: vendor_lines.index(f"{k} = {v}") + 1 for k, v in (
        ("retain", "600"), ("auto_arm", "true"), ("reboot", '"full"'),
        ("ask_dir", '"/run/systemd/ask-password"'), ("systemd_keyname", '"cryptsetup"'))}
    assert r.stdout == "\n".join([
        f"# {vendor}",
        f"# {tmp_path}/{ADMIN}",
        f"# {tmp_path}/{ETC_D}/60-timeout.conf",  # masks the /run one
        "",
        "[capture]",
        f"retain = 600  # {vendor}:{line['retain']}",
        f'wait_for_update = "2h"  # {tmp_path}/{ETC_D}/60-timeout.conf:4',
        "",
        "[update]",
        f"auto_arm = true  # {vendor}:{line['auto_arm']}",
        f'reboot = "full"  # {vendor}:{line["reboot"]}',
        "",
        "[login]",
        f"enabled = true  # {tmp_path}/{ADMIN}:2",
        f"timeout = 30  # {tmp_path}/{ETC_D}/60-timeout.conf:2",
        "",
        "[agent]",
        f'ask_dir = "/run/systemd/ask-password"  # {vendor}:{line["ask_dir"]}',
        f'systemd_keyname = "cryptsetup"  # {vendor}:{line["systemd_keyname"]}',
        "",
    ])


def test_config_json_and_its_errors(tmp_path):
    layered_root(tmp_path)
    put(tmp_path, f"{ETC_D}/70-bad.conf", b'[login]\ntimeout = 7\nenabled = "\xe9"\n')
    r = kh("config", "--root", tmp_path, "--json")
    assert r.returncode == 1  # an error: exit 1, but the effective configuration is shown
    bad = f"{tmp_path}/{ETC_D}/70-bad.conf"
    assert f"keyhandoff: error: {bad}:3: not valid UTF-8 (byte 0xe9): the file is left out\n" \
        in r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert out["config_error_detail"] == ("capture and auto-arm disabled because of config "
                                          f"error at {bad}:3")
    assert out["errors"] == [{"file": bad, "line": 3,
                              "message": "not valid UTF-8 (byte 0xe9): the file is left out"}]
    assert [w["line"] for w in out["warnings"]] == [5]
    sources = {s["setting"]: (s["file"], s["line"]) for s in out["sources"]}
    assert sources["login.timeout"] == (f"{tmp_path}/{ETC_D}/60-timeout.conf", 2)
    assert sources["agent.systemd_keyname"][0] == f"{tmp_path}/usr/lib/keyhandoff/keyhandoff.conf"
    # keyhandoff/jsonout.py's vocabulary: a duration is a span in microseconds
    assert out["settings"] == {
        "capture_retain_usec": 600_000_000, "capture_wait_for_update_usec": 7200_000_000,
        "update_auto_arm": True, "update_reboot": "full", "login_enabled": True,
        "login_timeout_usec": 30_000_000,
        "agent_ask_dir": "/run/systemd/ask-password", "agent_systemd_keyname": "cryptsetup"}
    assert set(sources) == {"capture.retain", "capture.wait_for_update", "update.auto_arm",
                            "update.reboot", "login.enabled", "login.timeout", "agent.ask_dir",
                            "agent.systemd_keyname"}


def test_config_with_an_explicit_file_reads_it_alone(tmp_path):
    layered_root(tmp_path)
    only = put(tmp_path, "only.conf", "[update]\nauto_arm = false\n")
    r = kh("config", "--root", tmp_path, "--config", only, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["files"] == [str(only)]
    assert out["ok"] is True
    assert [(s["setting"], s["file"], s["line"]) for s in out["sources"] if s["file"]] == [
        ("update.auto_arm", str(only), 2)]
    assert out["settings"]["login_enabled"] is False  # /etc's true is not read
    assert out["settings"]["update_auto_arm"] is False


@pytest.mark.parametrize("command", ["config", "agent"])
def test_an_explicit_config_that_does_not_exist_is_an_error(tmp_path, command):
    r = kh(command, "--config", tmp_path / "absent.conf")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.endswith(f"keyhandoff: {tmp_path}/absent.conf: No such file or directory\n")
    if command == "config":  # with --json the error is also on stdout, as every command's
        r = kh(command, "--config", tmp_path / "absent.conf", "--json")
        message = f"{tmp_path}/absent.conf: No such file or directory"
        assert (r.returncode, json.loads(r.stdout)) == (
            1, {"error": {"message": message, "code": 1}})


# --- a typo never keeps a one-time keyslot alive --------------------------------------------

BROKEN_ADMIN = '[login]\ntimeout = "2min"\nenabled = tru\n'  # not TOML: line 3
BROKEN_DROPIN = b'[capture]\nretain = 60\nwait_for_update = "\xff"\n'  # not UTF-8: line 3
BAD_VALUE = '[login]\ntimeout = "2min"\n[update]\nauto_arm = 1\n'  # two wrong types


def broken_etc(image: Path, admin: str, tmp_path: Path,
               dropin: bytes = BROKEN_DROPIN) -> contextlib.AbstractContextManager[list[str]]:
    """A mount namespace whose /etc has a broken configuration and ``image`` in crypttab."""
    del tmp_path
    return etc_overlay({"keyhandoff/keyhandoff.conf": admin,
                        "keyhandoff/keyhandoff.conf.d/50-bad.conf": dropin,
                        "crypttab": f"khconf {image} none luks\n"})


def stale_onetime(img: Path, passphrase: bytes) -> int:
    """A genuine one-time keyslot armed in another boot (as ``arm`` makes it): stale now."""
    with LuksHeader.open(img) as header:
        _slot, vk = header.volume_key(Secret.passphrase(passphrase))
        with vk, Secret(bytearray(os.urandom(32))) as record_key:
            slot, key = onetime.add(header, vk, not_after=int(time.time()) + 600,
                                    boot_id=str(uuid.uuid4()), record_key=record_key)
        key.wipe()
    return slot.keyslot


def onetime_keyslots(img: Path) -> list[int]:
    with LuksHeader.open(img) as header:
        return [s.keyslot for s in onetime.slots(header)]


@pytest.mark.parametrize("admin", [BROKEN_ADMIN, BAD_VALUE], ids=["not-toml", "bad-values"])
@pytest.mark.parametrize("step", ["finish", "restore"])
def test_a_broken_config_never_stops_a_boot_step_destroying_onetime_keyslots(
        tmp_path, step, admin):
    person = make("conf-boot")
    img = format_image(tmp_path / "v.img", person)
    keyslot = stale_onetime(img, person)
    assert onetime_keyslots(img) == [keyslot]
    env = scratch_env(scratch_efivars(tmp_path))

    with broken_etc(img, admin, tmp_path) as ns:
        r = kh(step, prefix=ns, env=env)

    assert r.returncode == 0, r.stderr
    assert onetime_keyslots(img) == []  # destroyed, whatever the configuration says
    assert opens(img, person, keyslot=0)  # the person's keyslot is untouched
    if step == "finish":  # the step that reads the configuration says what it left out
        dropin = "/etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:3: not valid UTF-8"
        assert f"configuration error: {dropin}" in r.stderr
        if admin == BROKEN_ADMIN:
            assert ("configuration error: /etc/keyhandoff/keyhandoff.conf:3: not valid TOML"
                    in r.stderr)
        else:
            assert ("/etc/keyhandoff/keyhandoff.conf:2: login.timeout must be int, not a "
                    "string: the setting is left out; finish goes on without it" in r.stderr)
            assert "/etc/keyhandoff/keyhandoff.conf:4: update.auto_arm must be bool" in r.stderr


@pytest.mark.parametrize("step", ["capture-initrd", "schedule"])
def test_the_other_boot_steps_log_the_error_and_go_on(tmp_path, step):
    person = make("conf-steps")
    img = format_image(tmp_path / "v.img", person)
    env = scratch_env(scratch_efivars(tmp_path))
    with broken_etc(img, BAD_VALUE, tmp_path) as ns:
        r = kh(step, prefix=ns, env=env)
    assert r.returncode == 0, r.stderr
    assert (f"/etc/keyhandoff/keyhandoff.conf:4: update.auto_arm must be bool, not an "
            f"integer: the setting is left out; {step} goes on without it") in r.stderr
    assert "/etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:3: not valid UTF-8" in r.stderr


BAD_DROPIN_VALUE = b'[login]\ntimeout = "2min"\n'  # a wrong type: line 2


def test_capture_initrd_captures_nothing_on_a_config_error(tmp_path, cache):
    """An error anywhere turns capture off: what was typed in the initramfs is not kept."""
    person = make("conf-capture")
    img = format_image(tmp_path / "v.img", person)
    env = scratch_env(scratch_efivars(tmp_path))
    systemd = SystemdCache()
    systemd.clear()
    try:
        assert systemd.add([Secret.passphrase(person)])  # typed in the initramfs
        with broken_etc(img, "", tmp_path, dropin=BAD_DROPIN_VALUE) as ns:
            r = kh("capture-initrd", "--volume", img, prefix=ns, env=env)
    finally:
        systemd.clear()
    assert r.returncode == 0, r.stderr
    assert uuid_of(img) not in [e.volume for e in cache.entries()], r.stderr
    why = ("capture and auto-arm disabled because of config error at "
           "/etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:2")
    assert f"CONFIG capture-initrd: {why}" in r.stderr   # the journal line
    assert r.stderr.splitlines()[-1] == f"keyhandoff: {why}: nothing captured"


def test_login_handoff_refuses_a_broken_config_naming_file_and_line(tmp_path):
    img = format_image(tmp_path / "v.img", make("conf-login"))
    with broken_etc(img, BAD_VALUE, tmp_path) as ns:
        r = kh("login-handoff", prefix=ns)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        ("keyhandoff: error: /etc/keyhandoff/keyhandoff.conf:2: login.timeout must be int, not "
        "a string: the setting is left out"),
        ("keyhandoff: error: /etc/keyhandoff/keyhandoff.conf:4: update.auto_arm must be bool, "
        "not an integer: the setting is left out"),
        ("keyhandoff: error: /etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:3: not valid UTF-8 "
        "(byte 0xff): the file is left out"),
        ("keyhandoff: 3 configuration errors: login-handoff does not run (keyhandoff config "
        "shows them)"),
    ]
