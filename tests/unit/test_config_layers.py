"""The configuration's layers as systemd's (keyhandoff.conf(5)), on scratch roots.

The vendor file, the administrator's file, the drop-ins of /usr/lib, /run and /etc: which
files are read and in what order, which masks which, that a later file overrides an earlier
one setting by setting, and that every warning and error names its file and line.  A boot
step's reading never raises and logs each problem (run in a child, its log on stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.etc_overlay import put

from keyhandoff import config
from keyhandoff.errors import ConfigError

VENDOR = "usr/lib/keyhandoff/keyhandoff.conf"
ADMIN = "etc/keyhandoff/keyhandoff.conf"
USR_D = "usr/lib/keyhandoff/keyhandoff.conf.d"
RUN_D = "run/keyhandoff/keyhandoff.conf.d"
ETC_D = "etc/keyhandoff/keyhandoff.conf.d"


def shown(root: Path, loaded: config.Loaded) -> dict[str, str]:
    """Setting -> where it came from, relative to the root (or "default")."""
    return {s.name: (s.source if s.path is None else
                     f"{Path(s.path).relative_to(root)}:{s.line}") for s in loaded.settings}


def test_the_layers_and_their_order(tmp_path):
    put(tmp_path, VENDOR, "[login]\ntimeout = 100\n[capture]\nretain = 500\n")
    put(tmp_path, ADMIN, "# mine\n[login]\ntimeout = 90\n")
    put(tmp_path, f"{USR_D}/20-pkg.conf", "[login]\ntimeout = 80\n")
    put(tmp_path, f"{RUN_D}/10-runtime.conf", "[capture]\nretain = 400\n")
    put(tmp_path, f"{ETC_D}/30-admin.conf", "\n\n[login]\nenabled = true\n")
    put(tmp_path, f"{ETC_D}/README", "[login]\nenabled = 1\n")  # not *.conf: never read
    put(tmp_path, f"{ETC_D}/.40-hidden.conf", "[login]\nenabled = 1\n")

    loaded = config.read(root=str(tmp_path))

    assert [str(Path(p).relative_to(tmp_path)) for p in loaded.files] == [
        VENDOR, ADMIN, f"{RUN_D}/10-runtime.conf", f"{USR_D}/20-pkg.conf",
        f"{ETC_D}/30-admin.conf"]  # drop-ins by name, whatever their directory
    assert loaded.problems == ()
    assert (loaded.config.login_timeout, loaded.config.retain, loaded.config.login_enabled) \
        == (80, 400, True)
    assert shown(tmp_path, loaded) == {
        "capture.retain": f"{RUN_D}/10-runtime.conf:2",
        "capture.wait_for_update": "default",
        "update.auto_arm": "default",
        "update.reboot": "default",
        "login.enabled": f"{ETC_D}/30-admin.conf:4",
        "login.timeout": f"{USR_D}/20-pkg.conf:2",
        "agent.ask_dir": "default",
        "agent.systemd_keyname": "default",
    }


def test_the_admin_file_overrides_the_vendor_file_setting_by_setting(tmp_path):
    put(tmp_path, VENDOR, "[capture]\nretain = 500\n[update]\nauto_arm = false\n")
    put(tmp_path, ADMIN, "[capture]\nretain = 300\n")
    conf = config.load(root=str(tmp_path))
    assert (conf.retain, conf.auto_arm) == (300, False)  # the vendor's auto_arm stays


def test_a_later_drop_in_name_wins_whatever_its_directory(tmp_path):
    put(tmp_path, f"{USR_D}/90-vendor.conf", "[login]\ntimeout = 9\n")
    put(tmp_path, f"{ETC_D}/10-admin.conf", "[login]\ntimeout = 1\n")
    assert config.load(root=str(tmp_path)).login_timeout == 9


@pytest.mark.parametrize(("dirs", "winner"), [
    ((USR_D, RUN_D), RUN_D),
    ((USR_D, ETC_D), ETC_D),
    ((RUN_D, ETC_D), ETC_D),
    ((USR_D, RUN_D, ETC_D), ETC_D),
])
def test_a_drop_in_masks_one_of_the_same_name_in_a_lower_directory(tmp_path, dirs, winner):
    for i, d in enumerate(dirs):
        # the masked one would also set another setting: it must not be read at all
        put(tmp_path, f"{d}/50-x.conf", f"[login]\ntimeout = {10 + i}\n"
                                        + ("" if d == winner else "enabled = true\n"))
    loaded = config.read(root=str(tmp_path))
    assert [str(Path(p).relative_to(tmp_path)) for p in loaded.files] == [f"{winner}/50-x.conf"]
    assert loaded.config.login_timeout == 10 + dirs.index(winner)
    assert loaded.config.login_enabled is False


def test_a_link_to_dev_null_masks_with_nothing(tmp_path):
    put(tmp_path, f"{USR_D}/50-pkg.conf", "[login]\nenabled = true\n")
    (tmp_path / ETC_D).mkdir(parents=True)
    (tmp_path / ETC_D / "50-pkg.conf").symlink_to("/dev/null")
    loaded = config.read(root=str(tmp_path))
    assert loaded.config.login_enabled is False
    assert loaded.problems == ()


def test_a_dangling_link_is_no_file(tmp_path):
    (tmp_path / "etc/keyhandoff").mkdir(parents=True)
    (tmp_path / ADMIN).symlink_to(tmp_path / "nowhere.conf")
    loaded = config.read(root=str(tmp_path))
    assert (loaded.files, loaded.problems) == ((), ())


def test_no_file_is_the_defaults_and_says_so(tmp_path):
    loaded = config.read(root=str(tmp_path))
    assert (loaded.files, loaded.problems, loaded.config) == ((), (), config.Config())
    assert {s.source for s in loaded.settings} == {"default"}
    assert config.as_toml(loaded).startswith("# no configuration file: the defaults\n")


def test_an_explicit_path_is_that_file_alone(tmp_path):
    put(tmp_path, VENDOR, "[capture]\nretain = 500\n")
    put(tmp_path, f"{ETC_D}/50-x.conf", "[login]\nenabled = true\n")
    only = put(tmp_path, "elsewhere.conf", "[login]\ntimeout = 7\n")
    loaded = config.read(str(only), root=str(tmp_path))
    assert loaded.files == (str(only),)
    assert (loaded.config.retain, loaded.config.login_enabled, loaded.config.login_timeout) \
        == (600, False, 7)
    with pytest.raises(ConfigError, match=r"^\S+/absent\.conf: No such file or directory$"):
        config.read(str(tmp_path / "absent.conf"))
    with pytest.raises(ConfigError, match="Is a directory"):
        config.read(str(tmp_path / "usr"))


# --- every message names its file and line --------------------------------------------------


def messages(loaded: config.Loaded, root: Path) -> list[tuple[str, str]]:
    return [(p.severity, str(p).replace(f"{root}/", "")) for p in loaded.problems]


def test_unknown_sections_and_settings_are_warnings_with_their_lines(tmp_path):
    put(tmp_path, ADMIN, textwrap.dedent("""\
        # comment
        [capture]
        retian = 5
        retain = 60

        [loggin]
        enabled = true
        [login]
          "enabled" = true
        colour = "blue"
        """))
    loaded = config.read(root=str(tmp_path))
    assert messages(loaded, tmp_path) == [
        ("warning", (f"{ADMIN}:3: unknown setting capture.retian (did you mean retain?), "
                    "ignored")),
        ("warning", f"{ADMIN}:6: unknown section [loggin] (did you mean login?), ignored"),
        ("warning", f"{ADMIN}:10: unknown setting login.colour, ignored"),
    ]
    assert loaded.errors == []
    conf = config.load(root=str(tmp_path))  # warnings are not fatal
    assert (conf.retain, conf.login_enabled) == (60, True)
    assert shown(tmp_path, loaded)["login.enabled"] == f"{ADMIN}:9"


def test_a_bad_value_is_an_error_with_its_line_and_the_lower_layer_decides(tmp_path):
    put(tmp_path, VENDOR, "[login]\ntimeout = 100\n")
    put(tmp_path, ADMIN, textwrap.dedent("""\
        [login]
        enabled = "yes"
        timeout = 5000
        [capture]
        wait_for_update = "25h"
        retain = 60
        """))
    loaded = config.read(root=str(tmp_path))
    assert messages(loaded, tmp_path) == [
        ("error", (f"{ADMIN}:2: login.enabled must be bool, not a string: the setting is "
                  "left out")),
        ("error", f"{ADMIN}:3: login.timeout must be 1..3600 seconds: the setting is left out"),
        ("error", f"{ADMIN}:5: capture.wait_for_update must be 0..24h: the setting is left out"),
    ]
    conf = loaded.config
    assert (conf.login_enabled, conf.login_timeout, conf.wait_for_update, conf.retain) \
        == (False, 100, 8 * 3600, 60)  # the rest of the file counts
    with pytest.raises(ConfigError, match=rf"{ADMIN}:2: login.enabled .*\(and 2 more\)$"):
        config.load(root=str(tmp_path))


def test_the_lines_of_dotted_keys_and_inline_tables(tmp_path):
    put(tmp_path, ADMIN, textwrap.dedent("""\
        capture.retain = "x"
        login = { timeout = "y" }
        [agent]
        'ask_dir' = "relative"
        """))
    assert messages(config.read(root=str(tmp_path)), tmp_path) == [
        ("error", f"{ADMIN}:1: capture.retain must be int, not a string: the setting is left out"),
        ("error", f"{ADMIN}:2: login.timeout must be int, not a string: the setting is left out"),
        ("error", f"{ADMIN}:4: agent.ask_dir must be an absolute path: the setting is left out"),
    ]


@pytest.mark.parametrize(("content", "expected"), [
    (b"[login]\nenabled = true\n[capture]\nretain = \xff600\n",
     "4: not valid UTF-8 (byte 0xff): the file is left out"),
    (b"[login]\nenabled = true\n\n[capture\n",
     ("4: not valid TOML: Expected ']' at the end of a table declaration (column 9): "
     "the file is left out")),
    (b"[login]\nenabled = true\nenabled = false\n",
     "3: not valid TOML: Cannot overwrite a value (column 16): the file is left out"),
    (b"[login]\nenabled = true\ntimeout =",
     "3: not valid TOML: Invalid value at the end of the file: the file is left out"),
])
def test_a_file_that_is_not_utf8_or_not_toml_is_left_out_with_its_line(tmp_path, content,
                                                                       expected):
    put(tmp_path, VENDOR, "[login]\ntimeout = 100\n")
    put(tmp_path, f"{ETC_D}/50-bad.conf", content)
    loaded = config.read(root=str(tmp_path))
    assert messages(loaded, tmp_path) == [("error", f"{ETC_D}/50-bad.conf:{expected}")]
    assert (loaded.config.login_enabled, loaded.config.login_timeout) == (False, 100)


def test_a_file_nested_too_deeply_for_the_parser_is_an_error_not_a_crash(tmp_path):
    put(tmp_path, f"{ETC_D}/50-deep.conf", "[login]\ntimeout = " + "[" * 100_000 + "\n")
    loaded = config.read(root=str(tmp_path))
    assert messages(loaded, tmp_path) == [
        ("error", (f"{ETC_D}/50-deep.conf: not valid TOML: nested too deeply: the file is left "
                  "out"))]


def test_a_drop_in_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    (tmp_path / ETC_D / "50-dir.conf").mkdir(parents=True)
    loaded = config.read(root=str(tmp_path))
    assert messages(loaded, tmp_path) == [
        ("error", f"{ETC_D}/50-dir.conf: cannot be read: is a directory")]
    assert loaded.config == config.Config()


# --- a boot step's reading ------------------------------------------------------------------

BOOT = """
import sys
from keyhandoff import config
conf = config.load_for_boot("finish", root=sys.argv[1])
print(conf.login_timeout, conf.retain, conf.auto_arm, conf.capture_timeout)
"""


def test_a_boot_step_goes_on_with_the_defaults_and_logs_each_problem(tmp_path):
    put(tmp_path, ADMIN, '[login]\ntimeout = "2min"\n[capture]\nretain = 60\nbogus = 1\n')
    put(tmp_path, f"{ETC_D}/50-bad.conf", b"[login\n")
    proc = subprocess.run([sys.executable, "-c", BOOT, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "KEYHANDOFF_LOG": "stderr"})
    assert proc.returncode == 0, proc.stderr
    # the bad setting left out (login.timeout is the default); on an error capture and
    # automatic arming are off, whatever the files say (retain = 60 was valid)
    assert proc.stdout == "120 0 False 0\n"
    assert config.read(root=str(tmp_path)).config.retain == 60  # the good one was kept
    log = proc.stderr.replace(f"{tmp_path}/", "")
    assert log.splitlines() == [
        (f"keyhandoff: CONFIG configuration error: {ADMIN}:2: login.timeout must be int, not a "
        "string: the setting is left out; finish goes on without it step=finish "
        f"file={ADMIN} line=2"),
        (f"keyhandoff: CONFIG configuration warning: {ADMIN}:5: unknown setting capture.bogus, "
        f"ignored step=finish file={ADMIN} line=5"),
        (f"keyhandoff: CONFIG configuration error: {ETC_D}/50-bad.conf:1: not valid TOML: "
        "Expected ']' at the end of a table declaration (column 7): the file is left out; "
        f"finish goes on without it step=finish file={ETC_D}/50-bad.conf line=1"),
        (f"keyhandoff: CONFIG finish: capture and auto-arm disabled because of config error at "
         f"{ADMIN}:2 (and 1 more) step=finish"),
    ]
    assert "Traceback" not in proc.stderr


def vendor_defaults(root: Path) -> None:
    """The vendor file as shipped: capture and automatic arming on."""
    put(root, VENDOR, (Path(__file__).resolve().parents[2] / "units" / "keyhandoff.conf")
        .read_text())


def test_an_error_in_a_drop_in_turns_capture_and_auto_arm_off_for_the_boot_steps(tmp_path):
    vendor_defaults(tmp_path)
    put(tmp_path, f"{ETC_D}/50-bad.conf", '[login]\ntimeout = "2min"\n')  # a bad value
    loaded = config.read(root=str(tmp_path))
    assert (loaded.config.retain, loaded.config.auto_arm) == (600, True)  # what is left
    boot = loaded.for_boot()
    assert (boot.retain, boot.auto_arm, boot.capture_timeout) == (0, False, 0)
    assert boot.config_error == ("capture and auto-arm disabled because of config error at "
                                 f"{tmp_path}/{ETC_D}/50-bad.conf:2")
    assert boot.login_timeout == 120  # the rest is as read
    text = config.as_toml(loaded)
    assert f"# {boot.config_error}:\n" in text
    assert ("# the boot steps run with capture.retain = 0 and update.auto_arm = false; the "
            "agent and login-handoff do not run\n") in text


def test_a_drop_in_meant_to_turn_arming_off_that_is_not_toml_does_not_turn_it_on(tmp_path):
    """Left out whole, the file's auto_arm = false would give way to the vendor's true."""
    vendor_defaults(tmp_path)
    put(tmp_path, f"{ETC_D}/50-off.conf", "[update]\nauto_arm = false\n[capture]\n"
        "wait_for_update = 1h\n")  # 1h unquoted: not TOML, line 4
    loaded = config.read(root=str(tmp_path))
    assert loaded.config.auto_arm is True  # the vendor's, the file being left out
    boot = loaded.for_boot()
    assert (boot.auto_arm, boot.retain) == (False, 0)
    assert boot.config_error == ("capture and auto-arm disabled because of config error at "
                                 f"{tmp_path}/{ETC_D}/50-off.conf:4")


def test_a_warning_changes_nothing_for_the_boot_steps(tmp_path):
    vendor_defaults(tmp_path)
    put(tmp_path, f"{ETC_D}/50-typo.conf", "[capture]\nretian = 60\n")
    loaded = config.read(root=str(tmp_path))
    assert loaded.warnings
    assert not loaded.errors
    assert loaded.for_boot() == loaded.config == config.Config()
    assert loaded.for_boot().config_error is None


def test_the_effective_configuration_as_toml_reads_back_as_itself(tmp_path):
    import tomllib  # noqa: PLC0415

    put(tmp_path, ADMIN, '[capture]\nwait_for_update = "1h 30min"\n[agent]\nask_dir = "/a\\"b"\n')
    loaded = config.read(root=str(tmp_path))
    text = config.as_toml(loaded)
    assert f'wait_for_update = "1h 30min"  # {tmp_path}/{ADMIN}:2\n' in text
    assert "retain = 600  # default\n" in text
    again = put(tmp_path, "again.conf", text)
    assert config.load(str(again)) == loaded.config
    assert config.parse(tomllib.loads(text)) == loaded.config
