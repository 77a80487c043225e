"""The keyhandoff command as a person or a script uses it (a real process each time)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from passphrases import make

from keyhandoff.cache import PassphraseCache


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
