"""The keyhandoff command as a person or a script uses it (a real process each time)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.etc_overlay import etc_overlay
from support.luks_images import format_image, uuid_of
from support.parts import require_binary
from support.passphrases import make

from keyhandoff import keyring
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    import contextlib


def kh(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "keyhandoff", *args], input=stdin,
                          capture_output=True, timeout=60, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(), proc.stderr.decode())


def test_status_json_reports_the_keyring():
    r = kh("status", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["keyring"]["usable"] is True
    assert "systemd" in report
    assert report["handoff"] == {"armed": False}
    assert report["efi"]["runtime_variables"] is False  # this host has no EFI
    assert "volumes" in report
    assert report["schedule"]["armed"] is False
    assert report["schedule"]["auto_arm"] is True  # the default, no config file here


@pytest.fixture
def schedule_report_removed():
    """The real command keeps its last outcome in /run/keyhandoff/schedule: leave none behind."""
    path = Path("/run/keyhandoff/schedule")
    before = path.read_bytes() if path.exists() else None
    yield
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


def test_schedule_without_a_scheduled_update_does_nothing(cache, schedule_report_removed):
    if any(os.path.lexists(p) for p in ("/system-update", "/etc/system-update")):
        pytest.skip("this host has an offline update scheduled")
    r = kh("schedule", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["action"], report["ok"], report["update_scheduled"]) == ("not-scheduled", True,
                                                                           None)
    r = kh("schedule")
    assert r.stdout == "keyhandoff: no offline update is scheduled\n"
    status = json.loads(kh("status", "--json").stdout)["schedule"]
    assert status["update_scheduled"] is None
    assert status["last_action"] == "not-scheduled"


def test_put_list_forget_round_trip(cache):
    vol = str(uuid.uuid4())
    pw = make("cli")
    r = kh("cache", "put", "--volume", vol, "--timeout", "30", stdin=pw + b"\n")
    assert r.returncode == 0, r.stderr
    with PassphraseCache().get(vol) as got:
        assert bytes(got.view()) == pw  # the newline ends the passphrase, is not part of it
    listed = json.loads(kh("cache", "list", "--json").stdout)
    assert [e["volume"] for e in listed if e["volume"] == vol] == [vol]
    assert kh("cache", "forget", "--volume", vol).returncode == 0
    assert kh("cache", "forget", "--volume", vol).returncode == 3  # nothing found


def test_user_errors_are_one_line_without_traceback(cache):
    cases = [
        (("cache", "put", "--volume", "not-a-uuid"), make("x") + b"\n", 1),
        (("cache", "put", "--volume", str(uuid.uuid4())), b"\n", 1),  # empty passphrase
        (("cache", "put", "--volume", str(uuid.uuid4())), b"a\0b\n", 1),  # NUL
        (("cache", "put", "--volume", str(uuid.uuid4())), b"x" * 3000, 1),  # too long
        (("cache", "put", "--volume", str(uuid.uuid4()), "--timeout", "0"), b"pw\n", 2),
        (("cache", "put", "--volume", str(uuid.uuid4()), "--timeout", "100000"), b"pw\n", 2),
        (("cache", "forget"), b"", 2),
        (("arm", "--reboot", "warm"), b"", 2),
        (("rearm",), b"", 3),  # nothing armed
    ]
    for args, stdin, code in cases:
        r = kh(*args, stdin=stdin)
        assert r.returncode == code, (args, r.stderr)
        assert "Traceback" not in r.stderr, args
        assert r.stderr.strip().splitlines()[-1].startswith("keyhandoff:"), (args, r.stderr)
        assert r.stdout == "", args
    assert cache.entries() == []


def test_passphrase_never_in_argv_help():
    r = kh("cache", "put", "--help")
    assert r.returncode == 0
    assert "stdin" in r.stdout
    assert "--passphrase" not in r.stdout


# --- expired entries: list and forget (finding 7) ------------------------------------------

def test_list_status_and_forget_all_with_an_expired_entry(cache):
    dead, live = str(uuid.uuid4()), str(uuid.uuid4())
    serial = cache.put(dead, Secret.passphrase(make("dead")), timeout=1)
    cache.put(live, Secret.passphrase(make("live")), timeout=60)
    deadline = time.monotonic() + 6
    while not all(i.expiry == "expd" for i in keyring.proc_keys({serial})):
        if time.monotonic() > deadline:
            pytest.fail("the kernel did not expire the entry")
        time.sleep(0.1)
    listed = json.loads(kh("cache", "list", "--json").stdout)
    assert [e["volume"] for e in listed] == [live]  # not shown with "seconds_left": 0
    status = json.loads(kh("status", "--json").stdout)
    assert [e["uuid"] for e in status["keyring"]["cached"]] == [live]
    r = kh("cache", "forget", "--all")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "keyhandoff: forgot 1 cached passphrase(s)\n"
    assert kh("cache", "list").stdout == "no cached passphrases\n"
    assert serial not in keyring.list_keyring(cache.keyring_serial)


# --- every command that touches a secret hardens itself first (finding 8) ---------------

_TRACED = "trace=prctl,mlockall,keyctl,add_key,read,readv"
_NOT_DUMPABLE = re.compile(r"prctl\(PR_SET_DUMPABLE, SUID_DUMP_DISABLE\) += 0$")
_LOCKED = re.compile(r"mlockall\(MCL_CURRENT\|MCL_FUTURE\|MCL_ONFAULT\) += 0$")
#: reading stdin, reading a key, making a key: what a command holding a secret does
_SECRET = re.compile(r"(readv?\(0, |keyctl\(KEYCTL_READ, |add_key\()")


def _etc(files: dict[str, str]) -> contextlib.AbstractContextManager[list[str]]:
    """A mount namespace whose /etc has these ``files`` (an overlay over /etc).

    The machine's /etc is not touched; only the command run inside sees the files.  Its
    /run/keyhandoff is a private tmpfs too (see :func:`support.etc_overlay.etc_overlay`).
    """
    return etc_overlay(files)


def _login_enabled():
    """:func:`_etc` with ``[login] enabled = true``."""
    return _etc({"keyhandoff/keyhandoff.conf": "[login]\nenabled = true\n"})


def _traced(tmp_path: Path, *args: str, stdin: bytes = b"",
            prefix: list[str] | None = None) -> tuple[int, list[str]]:
    """Run ``keyhandoff ARGS`` under strace; its exit code and the traced syscalls.

    ``-s 0``: no string or buffer contents in the log (no payload, no passphrase).
    """
    strace = require_binary("strace", "apt-get install strace")
    log = tmp_path / f"strace-{uuid.uuid4().hex[:8]}.log"
    proc = subprocess.run(
        [*(prefix or []), strace, "-f", "-qq", "-s", "0", "-e", _TRACED, "-o", str(log),
         sys.executable, "-m", "keyhandoff", *args],
        input=stdin, capture_output=True, timeout=120, check=False,
    )
    assert "Traceback" not in proc.stderr.decode(errors="replace"), args
    return proc.returncode, [ln for ln in log.read_text().splitlines()
                             if not re.search(r"\bread\((?!0,)", ln)]


def _assert_hardened_first(calls: list[str], *, touches_secret: bool = True) -> None:
    """Non-dumpable and memory-locked before the first read of stdin or of a key."""
    def first(pattern: re.Pattern[str]) -> int | None:
        return next((i for i, c in enumerate(calls) if pattern.search(c)), None)

    dump, lock, secret = first(_NOT_DUMPABLE), first(_LOCKED), first(_SECRET)
    assert dump is not None, "never made itself non-dumpable"
    assert lock is not None, "never locked its memory"
    if touches_secret:
        assert secret is not None, "the command did not touch a secret: the check proves nothing"
    if secret is not None:
        assert dump < secret, f"read before non-dumpable: {calls[secret]}"
        assert lock < secret, f"read before mlockall: {calls[secret]}"


def test_every_secret_command_hardens_before_it_touches_a_secret(tmp_path, cache):
    from keyhandoff import login, update  # noqa: PLC0415

    pw = make("harden")
    img = format_image(tmp_path / "v.img", pw)
    vid = uuid_of(img)
    try:
        rc, calls = _traced(tmp_path, "cache", "put", "--volume", vid, "--timeout", "120",
                            stdin=pw + b"\n")
        assert rc == 0
        _assert_hardened_first(calls)
        with _login_enabled() as prefix:
            rc, calls = _traced(tmp_path, "login-handoff", "--volume", vid, prefix=prefix)
        assert rc == 0
        _assert_hardened_first(calls)
        login.clear()
        SystemdCache().clear()
        steps = [
            (("arm", "--reboot", "soft", "--volume", str(img), "--no-ask", "--login"), 0, True),
            (("restore", "--volume", str(img)), 0, True),
            (("finish",), 0, True),
            (("rearm",), 3, False),  # the one-boot chain is over: nothing to re-arm
            (("disarm",), 0, False),
        ]
        for args, code, touches in steps:
            rc, calls = _traced(tmp_path, *args)
            assert rc == code, args
            _assert_hardened_first(calls, touches_secret=touches)
    finally:
        update.disarm(quiet=True, volumes=[])
        login.clear()
        SystemdCache().clear()
        cache.forget(vid)


def _blocked_on_stdin(pid: int, timeout: float = 20) -> None:
    """Wait until the process sits in a read of its stdin pipe (waiting for the passphrase)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            syscall = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            syscall, wchan = [], ""
        if wchan.endswith("pipe_read") and syscall[1:2] == ["0x0"]:
            return
        time.sleep(0.02)
    pytest.fail("the command never waited for its passphrase on stdin")


def _vmlck_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmLck:"))


def test_cache_put_is_memory_locked_while_it_waits_for_the_passphrase(cache):
    vid = str(uuid.uuid4())
    pw = make("locked")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyhandoff", "cache", "put", "--volume", vid, "--timeout", "30"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _blocked_on_stdin(proc.pid)
        assert _vmlck_kib(proc.pid) > 0  # mlockall(MCL_ONFAULT): the pages it touched
        _out, err = proc.communicate(pw + b"\n", timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with cache.get(vid) as got:
        assert bytes(got.view()) == pw


def test_cache_put_is_not_dumpable_while_it_waits_for_the_passphrase():
    """The reading only PR_SET_DUMPABLE changes: who owns /proc/<pid>/environ.

    Run as uid 65534 (CAP_DAC_READ_SEARCH only to import us from a 0700 checkout): the
    kernel gives a non-dumpable process's /proc files to root, a dumpable one's stay its
    own (ptrace is refused to everyone in this sandbox, so it cannot tell the two apart).
    ``keyhandoff cache put`` itself refuses uid 65534 before anything else (must run as
    root), so the child runs what it runs before it reads: ``_harden()``, then
    ``read_passphrase()``; it waits for a passphrase that never comes and is ended by its
    PID.  The strace test above shows the real command as root doing the same, in order.
    """
    proc = subprocess.Popen(
        [*NOBODY, sys.executable, "-c",
         "from keyhandoff import cli; cli._harden(); cli.read_passphrase()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _blocked_on_stdin(proc.pid)
        assert os.stat(f"/proc/{proc.pid}/environ").st_uid == 0
    finally:
        proc.kill()
        proc.wait()


# --- messages people can act on (issue 14, item 4) -----------------------------------------

#: uid 65534; CAP_DAC_READ_SEARCH (ambient) only to import us from a 0700 checkout
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
          "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]

#: one invocation of every command (parsed fine, so only the root check can stop it)
EVERY_COMMAND = [
    ("status",), ("cache", "put", "--volume", "00000000-0000-4000-8000-000000000000"),
    ("cache", "list"), ("cache", "forget", "--all"), ("arm", "--reboot", "soft"),
    ("rearm",), ("disarm",), ("schedule",), ("restore",), ("finish",), ("capture-initrd",),
    ("login-handoff",), ("agent",),
]


def test_every_command_refuses_a_user_other_than_root_before_anything_else(cache):
    vid = str(uuid.uuid4())
    cache.put(vid, Secret.passphrase(make("root's")), timeout=60)
    for args in EVERY_COMMAND:
        proc = subprocess.run([*NOBODY, sys.executable, "-m", "keyhandoff", *args],
                              input=make("never read") + b"\n", capture_output=True,
                              timeout=60, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 4, (args, err)
        name = " ".join(a for a in args[:2] if not a.startswith("-"))
        assert err == (f"keyhandoff: must run as root (`keyhandoff {name}` uses root's kernel "
                       "keyring, LUKS headers and the state under /run/keyhandoff)\n"), args
        assert proc.stdout == b""
    assert [e.volume for e in cache.entries()] == [vid]


def test_an_unpossessed_user_keyring_is_refused_and_the_cache_survives(cache):
    """``keyctl session -``: a new session keyring without @u (KeyringMode=private).

    Before this was checked, the search of @u found nothing and the ``keyhandoff`` keyring
    was created anew in @u, unlinking the one that held every cached passphrase.
    """
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    vid = str(uuid.uuid4())
    cache.put(vid, Secret.passphrase(make("kept")), timeout=60)
    serial = cache.keyring_serial
    for args in [a for a in EVERY_COMMAND if a[0] not in {"status", "agent"}]:
        proc = subprocess.run([keyctl, "session", "-", sys.executable, "-m", "keyhandoff",
                               *args], input=make("never read") + b"\n", capture_output=True,
                              timeout=60, check=False)
        err = proc.stderr.decode().splitlines()
        assert proc.returncode == 4, (args, err)
        assert err[-1] == ("keyhandoff: root's user keyring is not possessed (run from a unit "
                           "with KeyringMode=shared, or `keyctl link @u @s`)"), args
    assert PassphraseCache().keyring_serial == serial  # the same keyring, still in @u
    assert [e.volume for e in cache.entries()] == [vid]
    # with @u linked into that new session it works
    proc = subprocess.run([keyctl, "session", "-", "sh", "-c",
                           f'{keyctl} link @u @s && exec "$@"', "sh",
                           sys.executable, "-m", "keyhandoff", "cache", "list"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert vid in proc.stdout


def test_a_system_error_names_the_file_without_errno(cache):
    # os.stat of a path through a regular file: NotADirectoryError, a plain OSError
    r = kh("arm", "--reboot", "soft", "--no-ask", "--volume", "/etc/passwd/volume")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "keyhandoff: /etc/passwd/volume: Not a directory\n"


#: (arguments, exit code): odd values of every option; 2 for what the parser refuses
HOSTILE = [
    (("status", "--json", "extra"), 2),
] + [
    (("cache", "put", "--volume", "00000000-0000-4000-8000-000000000000", "--timeout", t), 2)
    for t in ("100000", "0", "-1", "1e3", "", "9" * 5000, "nan", "86401", "0x10")
] + [
    (("cache", "put", "--volume", v), 1) for v in ("", "x" * 5000, "\udcff", "../../etc")
] + [
    (("cache", "put"), 2), (("cache", "list", "--json", "--all"), 2), (("cache",), 2),
    (("cache", "forget", "--all", "--volume", "x"), 2), (("cache", "forget", "--volume", ""), 1),
    (("arm",), 2), (("arm", "--reboot", ""), 2), (("arm", "--reboot", "soft", "--boots", "0"), 2),
    (("arm", "--reboot", "soft", "--boots", "9" * 40), 2),
    (("arm", "--reboot", "soft", "--boots", "17"), 2),
] + [
    (("arm", "--reboot", "soft", "--ttl", t), 2)
    for t in ("999999999999999d", "", "-5m", "30 parsecs", "10s", "2d", "nan")
] + [
    (("arm", "--reboot", "soft", "--ask-timeout", t), 2) for t in ("0", "99999999999", "1.5")
] + [
    (("arm", "--reboot", "soft", "--no-ask", "--volume", v), 1)
    for v in ("", "/dev/null", "/etc", "/nonexistent", "\udcff")
] + [
    (("rearm", "--if-armed", "--now"), 2), (("disarm", "--volume"), 2), (("schedule", "x"), 2),
] + [
    (("restore", "--wait", w), 2) for w in ("nan", "inf", "-1", "1e400", "", "86401")
] + [
    (("finish", "--json", "--x"), 2), (("capture-initrd", "--volume"), 2),
    (("login-handoff", "--volume"), 2), (("agent", "--config"), 2), (("bogus",), 2), ((), 2),
]


@pytest.mark.arms
def test_no_argument_makes_a_traceback(cache):
    for args, code in HOSTILE:
        r = kh(*args)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert "internal error" not in r.stderr, (args, r.stderr)
        assert "[Errno" not in r.stderr, (args, r.stderr)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.splitlines()[-1].startswith("keyhandoff: "), (args, r.stderr)


def _in(prefix: list[str], *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = subprocess.run([*prefix, sys.executable, "-m", "keyhandoff", *args], input=stdin,
                          capture_output=True, timeout=120, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.arms
def test_volume_is_a_crypttab_name_a_uuid_or_a_path_in_every_command(tmp_path, cache):
    from keyhandoff import update  # noqa: PLC0415

    pw = make("volume")
    img = format_image(tmp_path / "data.img", pw)
    vid = uuid_of(img)
    absent = str(uuid.uuid4())
    crypttab = f"data {img} none luks\nelsewhere UUID={absent} none luks\n"
    with _etc({"crypttab": crypttab}) as etc:
        for spec in ("data", vid, f"UUID={vid}", vid.upper(), str(img)):
            rc, _out, err = _in(etc, "cache", "put", "--volume", spec, "--timeout", "60",
                                stdin=pw + b"\n")
            assert rc == 0, (spec, err)
            assert [e.volume for e in cache.entries()] == [vid], spec
            rc, _out, err = _in(etc, "cache", "forget", "--volume", spec)
            assert (rc, err) == (0, f"keyhandoff: forgot the passphrase for data ({vid})\n")
            assert cache.entries() == []
        # a UUID= entry whose device is not plugged in: its name still says which volume
        rc, _out, err = _in(etc, "cache", "put", "--volume", "elsewhere", stdin=pw + b"\n")
        assert rc == 0, err
        assert [e.volume for e in cache.entries()] == [absent]
        assert cache.forget(absent)
        rc, _out, err = _in(etc, "cache", "put", "--volume", "nosuch", stdin=pw + b"\n")
        assert (rc, err) == (1, ("keyhandoff: no volume 'nosuch': not a name in /etc/crypttab, "
                                "a LUKS UUID or a path\n"))
        # arm by name: the report names the crypttab entry
        assert _in(etc, "cache", "put", "--volume", "data", stdin=pw + b"\n")[0] == 0
        rc, out, err = _in(etc, "arm", "--reboot", "soft", "--no-ask", "--volume", "data",
                           "--json")
        assert rc == 0, err
        armed = json.loads(out)["volumes"]
        assert [(v["name"], v["uuid"]) for v in armed] == [("data", vid)]
        # disarm of a volume nothing is armed or cached for: an error, nothing disarmed
        rc, _out, err = _in(etc, "disarm", "--volume", absent)
        assert (rc, err) == (3, (f"keyhandoff: nothing is armed or cached for elsewhere "
                                f"({absent})\n"))
        assert update.status()["armed"] is True
        rc, _out, err = _in(etc, "disarm", "--volume", f"UUID={vid}")
        assert rc == 0, err
        assert update.status()["armed"] is False
        assert cache.entries() == []


#: a time as systemd shows it: ``Tue 2026-12-01 14:41:18 UTC; 9min left``
_SYSTEMD_TIME = r"[A-Z][a-z]{2} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+; "


@pytest.mark.arms
def test_durations_are_systemd_time_spans_and_times_read_as_systemd_shows_them(tmp_path, cache):
    pw = make("spans")
    img = format_image(tmp_path / "v.img", pw)
    vid = uuid_of(img)
    r = kh("cache", "put", "--volume", vid, "--timeout", "1h 30min", stdin=pw + b"\n")
    assert r.returncode == 0, r.stderr
    last = r.stderr.splitlines()[-1]  # after "not verified: ... not plugged in"
    assert re.fullmatch(rf"keyhandoff: cached the passphrase for {vid} until "
                        rf"{_SYSTEMD_TIME}1h 30min left", last), r.stderr
    (entry,) = cache.entries()
    assert entry.seconds_left is not None
    # the kernel's own timeout: /proc/keys gives it in its largest whole unit (1h here)
    assert 3600 <= entry.seconds_left <= 5400
    listed = kh("cache", "list").stdout
    assert re.fullmatch(rf"{vid}  {_SYSTEMD_TIME}1h( \d+min)? left\n", listed), listed
    before = int(time.time())
    r = kh("arm", "--reboot", "soft", "--no-ask", "--volume", str(img), "--ttl", "1h 15min",
           "--ask-timeout", "2min")
    assert r.returncode == 0, r.stderr
    assert re.search(rf"until {_SYSTEMD_TIME}1h 1[45]min left\.", r.stdout), r.stdout
    status = kh("status").stdout
    assert re.search(rf"  deadline: {_SYSTEMD_TIME}1h 1[45]min left\n", status), status
    assert not re.search(rf"\b{before // 100000}\d{{5}}\b", r.stdout + status)  # no epoch
    for args in (("cache", "put", "--volume", vid, "--timeout", "1h 30x"),
                 ("arm", "--reboot", "soft", "--ttl", "30 parsecs")):
        r = kh(*args, stdin=pw + b"\n")
        assert r.returncode == 2, args
        assert "is not a time span (a time span: 90, 10min, 1h 30min)" in r.stderr, r.stderr


def _documented_keys() -> set[str]:
    """The keys of README.md's "JSON output" table (its first column)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("### JSON output", 1)[1].split("\n\n| key |", 1)[1].split("\n\n", 1)[0]
    keys: set[str] = set()
    for row in table.splitlines()[2:]:
        keys |= set(re.findall(r"`([a-z_]+)`", row.split(" | ")[0]))
    return keys


def _keys_and_types(data: object, found: dict[str, set[str]]) -> None:
    if isinstance(data, list):
        for item in data:
            _keys_and_types(item, found)
    elif isinstance(data, dict):
        for key, value in data.items():
            if value is not None:
                found.setdefault(key, set()).add(type(value).__name__)
            _keys_and_types(value, found)


@pytest.mark.arms
def test_every_command_speaks_the_one_documented_json_vocabulary(tmp_path, cache,
                                                                  schedule_report_removed):
    documented = _documented_keys()
    assert {"uuid", "name", "source", "deadline", "deadline_usec", "error", "code"} <= documented
    pw = make("vocabulary")
    img = format_image(tmp_path / "v.img", pw)
    vid = uuid_of(img)
    assert kh("cache", "put", "--volume", vid, stdin=pw + b"\n").returncode == 0
    conf_root = tmp_path / "root"  # config: one setting, one error, one warning
    (conf_root / "etc/keyhandoff/keyhandoff.conf.d").mkdir(parents=True)
    (conf_root / "etc/keyhandoff/keyhandoff.conf").write_text("[login]\nenabled = true\n")
    (conf_root / "etc/keyhandoff/keyhandoff.conf.d/50-x.conf").write_text(
        "[login]\ntimeout = 0\n[agent]\nask = 1\n")
    outputs: dict[tuple[str, ...], object] = {}
    runs = [
        (("cache", "list", "--json"), 0),
        (("arm", "--reboot", "soft", "--no-ask", "--volume", str(img), "--json"), 0),
        (("status", "--json"), 0),
        (("rearm", "--json"), 0),  # armed in this boot already: what is armed
        (("cache", "forget", "--volume", str(uuid.uuid4()), "--json"), 2),  # no --json there
        (("disarm", "--volume", str(uuid.uuid4()), "--json"), 3),
        (("disarm", "--json"), 0),
        (("restore", "--json"), 0),
        (("finish", "--json"), 0),
        (("arm", "--reboot", "warm", "--json"), 2),
        (("config", "--json", "--root", str(conf_root)), 1),  # an error: still the config
        (("config", "--json", "--config", str(tmp_path / "absent.conf")), 1),
    ]
    if not any(os.path.lexists(p) for p in ("/system-update", "/etc/system-update")):
        runs.append((("schedule", "--json"), 0))
    for args, code in runs:
        r = kh(*args)
        assert r.returncode == code, (args, r.stderr)
        outputs[args] = json.loads(r.stdout)
        if code and (args[0] != "config" or "--config" in args):
            message = r.stderr.strip().splitlines()[-1].removeprefix("keyhandoff: ")
            assert outputs[args] == {"error": {"message": message, "code": code}}, args
    found: dict[str, set[str]] = {}
    for data in outputs.values():
        _keys_and_types(data, found)
    assert sorted(set(found) - documented) == []
    # one type per name, whichever command printed it
    assert {k: t for k, t in found.items() if len(t) > 1} == {}
    armed = outputs[("arm", "--reboot", "soft", "--no-ask", "--volume", str(img), "--json")]
    assert isinstance(armed, dict)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", armed["deadline"])
    assert armed["deadline_usec"] // 1_000_000 == int(
        datetime.strptime(armed["deadline"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC).timestamp())
    assert [(v["uuid"], v["armed"]) for v in armed["volumes"]] == [(vid, True)]
    conf = outputs[("config", "--json", "--root", str(conf_root))]
    assert isinstance(conf, dict)
    assert conf["ok"] is False
    assert [(e["line"], e["file"].endswith("50-x.conf")) for e in conf["errors"]] == [(2, True)]
    assert conf["settings"]["login_enabled"] is True
    status = outputs[("status", "--json")]
    assert isinstance(status, dict)
    assert status["handoff"]["deadline_usec"] == armed["deadline_usec"]
    assert [v["uuid"] for v in status["handoff"]["volumes"]] == [vid]


def _codes_in(text: str, pattern: str) -> list[int]:
    return [int(c) for c in re.findall(pattern, text, re.MULTILINE)]


def test_the_exit_code_table_is_the_same_in_the_docstring_readme_and_man_page():
    from keyhandoff import cli  # noqa: PLC0415

    repo = Path(__file__).resolve().parents[2]
    assert cli.__doc__ is not None
    doc = cli.__doc__.split("Exit codes", 1)[1].split("\n\n", 2)[1]
    readme = (repo / "README.md").read_text().split("| exit code | meaning |", 1)[1]
    readme = readme.split("\n\n", 1)[0]
    man = (repo / "man" / "keyhandoff.8").read_text().split('.SH "EXIT STATUS"', 1)[1]
    man = man.split(".SH ", 1)[0]
    codes = sorted(v for k, v in vars(cli).items() if k.startswith("EXIT_"))
    assert codes == [0, 1, 2, 3, 4, 130]
    assert _codes_in(doc, r"^(\d+) {2,}\S") == codes
    assert _codes_in(readme, r"^\| (\d+) \|") == codes
    assert _codes_in(man, r"^\.B (\d+)$") == codes


@pytest.mark.arms
def test_exit_codes_are_as_documented(tmp_path, cache):
    pw = make("codes")
    img = format_image(tmp_path / "v.img", pw)
    vid = uuid_of(img)
    r = kh("rearm")
    assert (r.returncode, r.stderr) == (3, ("keyhandoff: nothing is armed (disarmed, expired, "
                                           "or never armed)\n"))
    assert kh("rearm", "--if-armed").returncode == 0
    assert kh("cache", "forget", "--volume", vid).returncode == 3
    assert kh("disarm", "--volume", vid).returncode == 3
    assert kh("arm", "--reboot", "soft", "--no-ask", "--volume", str(img)).returncode == 1
    assert kh("cache", "put", "--volume", vid, stdin=pw + b"\n").returncode == 0
    assert kh("arm", "--reboot", "soft", "--no-ask", "--volume", str(img)).returncode == 0
    r = kh("rearm")  # right after arming: already armed, not "nothing armed"
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("keyhandoff: already armed in this boot for the next one: nothing to "
                        "re-arm\n")
    assert r.stdout.startswith("Armed 1 volume(s) through the keyring channel")
    r = kh("rearm", "--if-armed")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert kh("disarm", "--volume", vid).returncode == 0
    assert kh("rearm").returncode == 3


def test_cache_put_verifies_the_passphrase_when_the_volume_is_there(tmp_path, cache):
    pw = make("right")
    img = format_image(tmp_path / "v.img", pw)
    vid = uuid_of(img)
    before = cache.put(vid, Secret.passphrase(pw), timeout=60)  # what a wrong one must not touch
    r = kh("cache", "put", "--volume", str(img), stdin=make("wrong") + b"\n")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"keyhandoff: the passphrase does not open v.img ({vid}): nothing was "
                        "cached\n")
    assert [(e.volume, e.serial) for e in cache.entries()] == [(vid, before)]
    with cache.get(vid) as kept:
        assert bytes(kept.view()) == pw
    assert cache.forget(vid)
    r = kh("cache", "put", "--volume", str(img), stdin=make("wrong") + b"\n")
    assert r.returncode == 1
    assert cache.entries() == []  # nothing stored
    r = kh("cache", "put", "--volume", str(img), stdin=pw + b"\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"keyhandoff: cached the passphrase for v.img ({vid}) until ")
    assert "not verified" not in r.stderr
    with cache.get(vid) as got:
        assert bytes(got.view()) == pw
    # a volume that is not plugged in: cached, and said to be unverified
    absent = str(uuid.uuid4())
    r = kh("cache", "put", "--volume", absent, stdin=pw + b"\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == (f"keyhandoff: not verified: {absent} is not plugged in "
                                        f"(/dev/disk/by-uuid/{absent} does not exist)")
    assert {e.volume for e in cache.entries()} == {vid, absent}


@pytest.mark.arms
def test_arm_soft_is_refused_on_a_systemd_without_soft_reboot(tmp_path, cache):
    """systemd < 254 has no ``systemctl soft-reboot``: arming for one is refused, with why.

    This host's systemd is 252 (its real ``systemctl --version``), but systemd is not its
    init; the command runs in a mount namespace whose /run/systemd is a private tmpfs with
    ``system/`` in it, which is what sd_booted() looks at.  Nothing is asked, nothing armed.
    """
    from keyhandoff import update  # noqa: PLC0415
    from keyhandoff.host import Host  # noqa: PLC0415

    version = Host().systemd_version()
    if version is None or version >= 254:
        pytest.skip(f"this host's systemd ({version}) can soft-reboot")
    pw = make("soft")
    img = format_image(tmp_path / "v.img", pw)
    cache.put(uuid_of(img), Secret.passphrase(pw), timeout=60)
    unshare = require_binary("unshare", "apt-get install util-linux")
    booted = [unshare, "--mount", "--propagation", "private", "sh", "-c",
              ("mount -t tmpfs -o mode=0755 kh-test /run/systemd && "
              'mkdir /run/systemd/system && exec "$@"'), "sh"]
    rc, out, err = _in(booted, "arm", "--reboot", "soft", "--volume", str(img), "--json")
    reason = (f"cannot arm for a soft reboot: this machine runs systemd {version}; systemctl "
              "soft-reboot needs systemd 254 or later: arm for a full reboot (--reboot full) "
              "instead")
    assert (rc, err) == (1, f"keyhandoff: {reason}\n")
    assert json.loads(out) == {"error": {"message": reason, "code": 1}}
    assert update.status()["armed"] is False

    def never(_target):  # refused before anyone is asked
        raise AssertionError("asked")

    with pytest.raises(update.ChannelUnavailable, match=f"runs systemd {version};"):
        update.arm(reboot="soft", ttl=timedelta(minutes=5), ask=never,
                   volumes=[str(img)], host=Host(systemd_booted=lambda: True))
    # a systemd that can (254+), or none running: armed
    report = update.arm(reboot="soft", ttl=timedelta(minutes=5), ask=never,
                        volumes=[str(img)], host=Host(systemd_booted=lambda: True,
                                                      systemd_version=lambda: 254))
    assert report.channel == "keyring"
    update.disarm(quiet=True, volumes=[])
