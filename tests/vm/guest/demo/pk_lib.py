"""Helpers for the PackageKit scenarios' guest jobs (shipped next to each job's script).

Everything here only looks (PackageKit's files, dpkg, cryptsetup, the journal, ``keyhandoff
status``): nothing arms, re-arms or disarms, as on a machine whose updates PackageKit runs
nobody calls keyhandoff.
"""

import configparser
import json
import os
import subprocess
import time

TOOL = "kh-demo-tool"
#: PackageKit's files (lib/packagekit-glib2/pk-offline-private.h); "competed" is its spelling
PREPARED = "/var/lib/PackageKit/prepared-update"
RESULTS = "/var/lib/PackageKit/offline-update-competed"
RESULTS_GROUP = "PackageKit Offline Update Results"
TRIGGER = "/system-update"
PK_UNIT = "packagekit-offline-update.service"


def run(*argv: str, timeout: float = 400) -> subprocess.CompletedProcess[str] | None:
    """Run ``argv``; print its exit code, its time and the tail of what it said."""
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        print(f"KH-PK {' '.join(argv)}: timed out after {timeout:.0f} s", flush=True)
        return None
    print(f"KH-PK {' '.join(argv)}: rc={done.returncode} in "
          f"{time.monotonic() - started:.1f} s", flush=True)
    print((done.stdout + done.stderr)[-2500:], flush=True)
    return done


def succeeded(done: subprocess.CompletedProcess[str] | None) -> bool:
    return done is not None and done.returncode == 0


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def status() -> dict:
    """``keyhandoff status --json`` (empty when it printed no JSON)."""
    out = subprocess.run(["keyhandoff", "status", "--json"], capture_output=True, text=True,
                         check=False).stdout
    try:
        return json.loads(out)
    except ValueError:
        return {}


def last_schedule() -> str | None:
    """What the last ``keyhandoff schedule`` of this boot did (``armed``, ...), or None."""
    return (status().get("schedule") or {}).get("last_action")


def tool_version() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", TOOL], capture_output=True,
                          text=True, check=False).stdout.strip()


def pk_results() -> dict:
    """PackageKit's offline-update results file (a GKeyFile), as a dict; empty if none."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep "Success", "Packages" as written
    try:
        parser.read_string(read_text(RESULTS))
    except configparser.Error:
        return {}
    return dict(parser[RESULTS_GROUP]) if parser.has_section(RESULTS_GROUP) else {}


def _journal(args: list) -> list:
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *args], capture_output=True,
                         text=True, check=False).stdout
    entries = []
    for line in out.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry.get("MESSAGE"), str):  # bytes: not ours, not printable
            entry["MESSAGE"] = ""
        entries.append(entry)
    return entries


def keyhandoff_journal(boot: str, label: str) -> list:
    """keyhandoff's journal entries of ``boot`` (``0`` this one, ``-1`` the one before...).

    Each is printed as ``KH-JOURNAL <label> <EVENT> <message>`` (never a secret: keyhandoff
    logs none) for the host's figures.
    """
    entries = _journal(["-b", boot, "SYSLOG_IDENTIFIER=keyhandoff"])
    for e in entries:
        message = e["MESSAGE"].replace("\n", " ")
        print("KH-JOURNAL", label, e.get("KEYHANDOFF_EVENT", "?"), message, flush=True)
    return entries


def events(entries: list, event: str) -> list:
    return [e["MESSAGE"] for e in entries if e.get("KEYHANDOFF_EVENT") == event]


def unit_log(boot: str, unit: str) -> str:
    """What ``unit`` and PID 1 about it logged in ``boot``, one message a line."""
    return subprocess.run(["journalctl", "--no-pager", "-b", boot, "-o", "cat", "-u", unit],
                          capture_output=True, text=True, check=False).stdout


def update_service_times(boot: str) -> tuple[float, float] | None:
    """(start, the 'rebooting' line) of pk-offline-update in ``boot``: seconds since power-on."""
    start = rebooting = None
    for e in _journal(["-b", boot, "-u", PK_UNIT]):
        t = int(e.get("__MONOTONIC_TIMESTAMP", "0")) / 1e6
        if e.get("_PID") == "1" and e.get("JOB_TYPE") == "start" and start is None:
            start = t
        elif e["MESSAGE"].strip() == "rebooting":
            rebooting = t
    return None if start is None or rebooting is None else (start, rebooting)


def header(device: str) -> tuple[list, list]:
    """(keyslots, token types) of a LUKS2 header, by the guest's own cryptsetup."""
    out = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", device],
                         capture_output=True, text=True, check=False).stdout
    try:
        meta = json.loads(out)
    except ValueError:
        return [], ["(no luksDump)"]
    return sorted(meta["keyslots"]), sorted(t["type"] for t in meta["tokens"].values())


def leaks(boot: str, marker: bytes = b"khTESTpw-") -> int:
    """How often a test passphrase's marker occurs in ``boot``'s journal."""
    out = subprocess.run(["journalctl", "-b", boot, "-o", "export"], capture_output=True,
                         check=False).stdout
    return out.count(marker)


def link_target(path: str) -> str | None:
    return os.readlink(path) if os.path.islink(path) else None
