"""The proof: offline updates with automatic login in a UEFI VM, one passphrase prompt.

Real OVMF firmware, a real Debian 13 kernel, systemd 257, systemd-cryptsetup and Linux-PAM
in QEMU; keyhandoff's units as a distribution would install them; a LUKS2 data volume in
``/etc/crypttab`` (by UUID, prompting) mounted on ``/data``.  A simulated person
(``guest/demo/vm-person``) answers every prompt still open after 3 s and the host counts
them: a prompt keyhandoff answered never reaches the person.

Scenarios (each prints a timeline and fails loudly when the promise is broken):

1. ``full-reboot``: boot 1 the person types once, pam_gdm gets the passphrase and the
   person's first automatic login makes their GNOME login keyring with it; the runner arms
   (``reboot="full", boots=2, login=True``) and reboots into ``system-update.target``; boot 2
   opens the volume unasked, writes the update marker, ``rearm()``; boot 3 opens unasked, the
   autologin stacks (pam_gdm, pam_systemd_loadkey, pam_keyhandoff) receive the passphrase,
   the login keyring unlocks (the Secret Service on the person's bus says so) and a wrong
   password leaves it locked.
   Prompts: 1.  Afterwards: no passphrase in ``OVMF_VARS``, no one-time keyslot or token.
2. ``soft-reboot``: ``reboot="soft"``; the volume is closed and ``systemctl soft-reboot``
   runs; it reopens unasked.  Prompts: 1.
3. ``unarmed-then-late``: a reboot without arming prompts as usual; an arming whose
   deadline passes while the machine is off (the guest clock starts 2 h later) prompts as
   usual, and the stale record and one-time keyslot are wiped.  Prompts: 3 in 3 boots.
4. ``tampered``: the host flips one byte of the record in ``OVMF_VARS`` between boots: it
   is refused, the person is prompted, nothing is left.  Prompts: 2 in 2 boots.

The encrypted-root scenarios are in :mod:`.demo_root`, the offline updates PackageKit itself
downloads, schedules and applies in :mod:`.demo_packagekit`.

Run with ``python3 -m tests.vm.demo [scenario ...]`` (``make demo``) as root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .debs import preset
from .image import (
    REPO_ROOT,
    ImageBuildError,
    _chroot,
    _chroot_mounts,
    build_run_image,
    ensure_base,
)
from .machine import BOOTED_RE, DONE_RE, Disk, Machine, MachineError, PersonPort
from .root_image import reencryption_lock
from .runner import GuestJob

if TYPE_CHECKING:
    from collections.abc import Callable

    from .image import RunImage

sys.path.insert(0, str(REPO_ROOT / "tests"))
from passphrases import MARKER, make

log = logging.getLogger("keyhandoff.vmtest")

GUEST_DEMO = Path(__file__).parent / "guest" / "demo"
DATA_UUID = "9d1c6a2e-5b7f-4c3a-8e21-6f0b3d9a7c55"
DATA_DEVICE = f"/dev/disk/by-uuid/{DATA_UUID}"
ANSWERED_ID = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a720"
RECORD_REFUSED_ID = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a742"
#: how long one job may run inside the guest (PBKDFs under TCG are slow)
JOB_TIMEOUT = 240
#: the same for full-reboot's login boots (1 and 3): their keyring logins start daemons
LOGIN_JOB_TIMEOUT = 360
#: the person who logs in automatically (guest/demo/demo_lib.py has the same two names)
PERSON = "person"
PERSON_UID = 1000


# --- the guest ---------------------------------------------------------------------------------


def _enable(rootfs: Path, target: str, *units: str) -> None:
    wants = rootfs / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in units:
        link = wants / unit
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{unit}")


def _install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def customize(rootfs: Path) -> None:
    """keyhandoff enabled as its package's vendor preset says, plus the demo's person and PAM.

    The PAM stacks (``guest/demo/pam-*``, in ``/etc/pam.d`` without the prefix) are the
    autologin lines of the display managers' stacks: ``kh-gdm``, ``kh-ours``, ``kh-loadkey``
    end in a probe that keeps PAM_AUTHTOK's SHA-256; ``kh-gkr-*`` unlock the person's GNOME
    login keyring (``kh-gkr-wrong``: the negative control).

    The packages are installed already (:func:`.image._install_project`: the .deb files this
    tree builds); their units, in /usr/lib/systemd/system, are enabled here by
    ``systemctl preset`` as a distribution that honours presets enables them.  Nothing of
    keyhandoff is copied from the checkout.
    """
    systemd = rootfs / "etc/systemd/system"
    build_log = rootfs.parent / "image-build.log"
    preset(rootfs, build_log)
    # The update boot runs the demo's "runner" job too, after keyhandoff's boot steps.
    _enable(rootfs, "system-update.target", "vmtest.service")
    dropin = systemd / "vmtest.service.d/demo.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(
        "[Unit]\nAfter=keyhandoff-finish.service keyhandoff-rearm.service "
        "system-update-pre.target\n",
    )
    # Nobody logs in on the serial console, and a getty there hangs the line up when it is
    # stopped (a soft-reboot), which cuts the runner's reports off.
    getty = systemd / "serial-getty@ttyS0.service"
    getty.unlink(missing_ok=True)
    getty.symlink_to("/dev/null")
    (rootfs / "etc/crypttab").write_text(f"data UUID={DATA_UUID} none luks\n")
    with (rootfs / "etc/fstab").open("a") as fstab:
        fstab.write("/dev/mapper/data /data ext4 defaults,nofail 0 2\n")
    (rootfs / "data").mkdir(exist_ok=True)
    _install(GUEST_DEMO / "vm-person", rootfs / "usr/local/sbin/vm-person", 0o755)
    _install(GUEST_DEMO / "vm-person.service", systemd / "vm-person.service")
    _enable(rootfs, "sysinit.target", "vm-person.service")
    _install(GUEST_DEMO / "kh-token-check", rootfs / "usr/local/sbin/kh-token-check", 0o755)
    for stack in ("kh-gdm", "kh-ours", "kh-loadkey", "kh-gkr-gdm", "kh-gkr-loadkey",
                  "kh-gkr-wrong"):
        _install(GUEST_DEMO / f"pam-{stack}", rootfs / "etc/pam.d" / stack)
    _install(GUEST_DEMO / "kh-person-env.conf", rootfs / "etc/security/kh-person-env.conf")
    _add_person(rootfs, build_log)


def _add_person(rootfs: Path, build_log: Path) -> None:
    """The person who logs in automatically: uid 1000, a home, no password.

    The account's password plays no part (autologin); their login keyring's password is the
    disk passphrase, set when their first login creates it (boot 1 of ``full-reboot``).
    """
    with _chroot_mounts(rootfs):
        _chroot(rootfs, "useradd", "--create-home", "--uid", str(PERSON_UID), "--user-group",
                "--shell", "/bin/bash", PERSON, log_file=build_log)
        # gnome-keyring's postinst enables its user socket for every user already
        # (deb-systemd-helper --user enable): said here too, so the demo does not depend on it.
        _chroot(rootfs, "systemctl", "--global", "enable", "gnome-keyring-daemon.socket",
                log_file=build_log)


def make_data_disk(path: Path, passphrase: bytes) -> None:
    """A LUKS2 volume with a file system, encrypted in user space (no dm-crypt on the host)."""
    path.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(path), "80M"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run(["truncate", "-s", "96M", str(path)], check=True, timeout=30)
    # The person's keyslot uses argon2id (bounded so that TCG takes seconds, not minutes).
    with reencryption_lock():  # one UUID for every data disk: one encryption at a time
        subprocess.run(
            ["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size",
             "16M", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory",
             "32768", "--uuid", DATA_UUID, "--batch-mode", "--key-file=-", str(path)],
            input=passphrase, check=True, capture_output=True, timeout=300,
            cwd=path.parent,  # its temporary header file: not shared with another worker's
        )


def luks_state(path: Path) -> tuple[list[str], list[str]]:
    """(keyslots, token types) of the data image, read from the host."""
    import json  # noqa: PLC0415

    meta = json.loads(subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(path)],
        capture_output=True, check=True, timeout=60,
    ).stdout)
    return sorted(meta["keyslots"]), sorted(t["type"] for t in meta["tokens"].values())


# --- jobs -------------------------------------------------------------------------------------

PRELUDE = f"""
import os, subprocess, sys, time
from datetime import timedelta
sys.path.insert(0, os.environ["VMTEST_JOB"])
from demo_lib import *
DEVICE = "{DATA_DEVICE}"
UUID = "{DATA_UUID}"
"""


def job(body: str, passphrase: bytes, *, action: str, prelude: str = PRELUDE,
        timeout: int = JOB_TIMEOUT) -> GuestJob:
    """A Python job with demo_lib and SHA-256 digests (never the passphrase).

    ``expect.sha256``: the passphrase's.
    """
    files = {
        "demo_lib.py": (GUEST_DEMO / "demo_lib.py").read_bytes(),
        "expect.sha256": hashlib.sha256(passphrase).hexdigest().encode(),
    }
    return GuestJob.python(prelude + body, files=files, action=action,  # type: ignore[arg-type]
                           timeout=timeout)


WAIT_OPEN = """
result("data-mounted", wait_until(mounted, 120), "the LUKS volume opened and /data is mounted")
"""
WAIT_CAPTURED = """
result("captured", wait_until(lambda: UUID in cached_volumes(), 120),
       "keyhandoff's agent verified and kept what the person typed")
"""
NO_LEAK = """
result("journal-clean", journal_leaks() == 0, "no test passphrase in this boot's journal")
print(subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                      "-u", "keyhandoff-*", "-u", "systemd-cryptsetup@*", "-u", "vm-person"],
                     capture_output=True, text=True).stdout[-6000:], flush=True)
"""
LATENCY = """
lat = [int(e.get("KEYHANDOFF_LATENCY_US", "0")) for e in journal("@ANSWERED@")]
print("KH-LATENCY-US", ",".join(map(str, lat)), flush=True)
result("answered-by-keyhandoff", bool(lat), f"prompt to answer {lat} us")
""".replace("@ANSWERED@", ANSWERED_ID)
#: Where the demo's own "runner" points /system-update.  Not /var/cache: the guests have
#: PackageKit, whose packagekit-offline-update.service (in every update boot, before
#: system-update.target) takes a link to /var/cache, /var/cache/PackageKit or its
#: prepared-update file for its own (client/pk-offline-update.c, main()): it would remove the
#: link, find no prepared update and reboot (FailureAction=reboot) under the demo's job.  A
#: link anywhere else is "another framework set up the trigger": it exits and leaves the boot.
DEMO_UPDATE_DIR = "/var/lib/kh-demo-update"
SCHEDULE_DEMO_UPDATE = f"""
os.makedirs("{DEMO_UPDATE_DIR}", exist_ok=True)
os.symlink("{DEMO_UPDATE_DIR}", "/system-update")
"""
REFUSED = """
refused = [e.get("MESSAGE", "") for e in journal("@REFUSED@")]
print("KH-REFUSED", refused, flush=True)
result("record-refused", any(@REASON@ in m for m in refused), str(refused))
result("no-onetime-left", onetime_tokens(DEVICE) == 0, "stale one-time keyslot destroyed")
from keyhandoff import efi
result("record-gone", not efi.RECORD_VARIABLE.exists(), "the record was deleted")
""".replace("@REFUSED@", RECORD_REFUSED_ID)


# The person's first automatic login (boot 1 of full-reboot): no login keyring yet, so
# pam_gnome_keyring's password (pam_gdm's PAM_AUTHTOK: what the person typed at the disk prompt)
# becomes its password, as gnome-keyring-daemon does (gkd-login.c, unlock_or_create_login).
# The daemon holds the new collection (the Secret Service's Collections lists it) but puts it
# on the bus only when it starts again (keyring_login's ``created``), so the person's next
# login, in a new daemon, unlocks it and an application stores an item in it, which boot 3
# reads back.  The job never has the passphrase: only the stacks do.
FIRST_LOGIN = """
result("person-session", start_person_session(),
       "the person's user manager: session bus and gnome-keyring's socket in /run/user/1000")
fresh = not os.path.exists(LOGIN_KEYRING)
_, lines = keyring_login("kh-gkr-gdm", created=True)
held = wait_until(lambda: LOGIN_COLLECTION in secret_collections(), 30, step=2)
on_bus = keyring_locked()  # reported: None (busctl's error printed) until the daemon restarts
os.sync()
written = wait_until(lambda: os.path.exists(LOGIN_KEYRING), 30)
result("gnome-keyring-created", fresh and written and held and said(lines, UNLOCKED_SAID),
       f"first autologin made the login keyring from pam_gdm's PAM_AUTHTOK (none before: "
       f"{fresh}; {LOGIN_KEYRING} written: {written}; in the Secret Service's Collections: "
       f"{held}; its object on the bus in this daemon: {on_bus is not None})")
locked, lines = keyring_login("kh-gkr-gdm")
stored = locked is False and store_item()
result("gnome-keyring-item-stored", stored and said(lines, UNLOCKED_SAID),
       f"the next login, in a new daemon, unlocked it (Locked={locked}) and an item was "
       f"stored in it through the Secret Service")
os.sync()
stop_keyring_daemon()
"""
# The last boot's automatic logins, each in a fresh daemon (the keyring locked on disk):
# unlocked through the stock pam_gdm and through pam_systemd_loadkey, checked through the
# Secret Service on the person's bus, with the item stored at the first login read back; then
# the negative control, a wrong password through the same stack, which must leave it locked.
# Positives first: systemd's
# "cryptsetup" key lives [login] timeout (120 s) after keyhandoff-finish.
LOGIN_KEYRING_CHECKS = """
result("person-session", person_ready,
       "the person's user manager: session bus and gnome-keyring's socket in /run/user/1000")
existed = os.path.exists(LOGIN_KEYRING)  # boot 1's: this login must unlock, not create it
locked, lines = keyring_login("kh-gkr-gdm")
item = lookup_item() if locked is False else None
result("gnome-keyring-unlocked",
       existed and locked is False and item == ITEM_SECRET and said(lines, UNLOCKED_SAID),
       f"autologin, pam_gdm + pam_gnome_keyring: boot 1's keyring there: {existed}; the "
       f"Secret Service says Locked={locked}; the item stored in boot 1 reads back: "
       f"{item == ITEM_SECRET}")
locked, lines = keyring_login("kh-gkr-loadkey")
result("gnome-keyring-loadkey", locked is False and said(lines, UNLOCKED_SAID),
       f"autologin, pam_systemd_loadkey + pam_gnome_keyring: Locked={locked}")
locked, lines = with_wrong_key(lambda: keyring_login("kh-gkr-wrong"))
result("gnome-keyring-wrong-stays-locked",
       locked is True and said(lines, REFUSED_SAID) and not said(lines, UNLOCKED_SAID),
       f"negative control, a wrong password through the same stack: refused, Locked={locked}")
stop_keyring_daemon()
"""


def refused(reason: str) -> str:
    """Job code checking that restore refused the record for ``reason`` and left nothing."""
    return REFUSED.replace("@REASON@", repr(reason))


# --- running boots ---------------------------------------------------------------------------


@dataclass
class Person:
    """The host half of the simulated person: counts prompts and types the passphrase."""

    passphrase: bytes
    prompts: list[str] = field(default_factory=list)

    def serve(self, port: PersonPort, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                line = port.readline(timeout=0.5)
            except MachineError as exc:
                if "closed" in str(exc):
                    return
                continue
            except OSError:
                return
            if line.startswith(b"PROMPT "):
                self.prompts.append(line.decode(errors="replace"))
                port.send(self.passphrase + b"\n")


@dataclass
class Boot:
    """One boot's figures."""

    label: str
    seconds: float
    prompts: int
    results: list[tuple[str, bool, str]]
    console: str
    #: the job's exit status (VMTEST-DONE), None when not seen (a soft reboot's boot)
    rc: int | None = None
    #: host monotonic times at which the console showed each VMTEST-BOOTED / VMTEST-DONE
    marks: dict[str, list[float]] = field(default_factory=dict)


def run_boot(m: Machine, person: Person, job_: GuestJob, label: str, *, phases: int = 1) -> Boot:
    """Boot, serve the person, wait for ``phases`` job runs (2 across a soft reboot)."""
    before = len(person.prompts)
    started = time.monotonic()
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        m.start(job_)
        thread = threading.Thread(target=person.serve, args=(m.person(), stop), daemon=True)
        thread.start()
        for _ in range(phases - 1):  # a soft reboot ends that userspace before its report
            m.wait_for(BOOTED_RE, 300)
        m.wait_for(BOOTED_RE, 300)
        done = m.wait_for(DONE_RE, job_.timeout + 60) if phases == 1 else None
        if done is None or done.group(2) != "none":
            m.wait_exit(job_.timeout + 60)
    except BaseException:
        m.kill()
        raise
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
    console = m.console()
    results = [(r.name, r.passed, r.detail) for r in m.results()]
    boot = Boot(label, time.monotonic() - started, len(person.prompts) - before, results,
                console, int(done.group(1)) if done is not None else None)
    log.info("  %s: %.0f s, %d prompt(s) to the person, %s", label, boot.seconds, boot.prompts,
             ", ".join(f"{n} {'ok' if ok else 'FAILED'}" for n, ok, _ in results) or "no results")
    return boot


@dataclass
class Outcome:
    """A scenario's verdict and figures."""

    name: str
    expected_prompts: int
    boots: list[Boot] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def prompts(self) -> int:
        return sum(b.prompts for b in self.boots)

    @property
    def passed(self) -> bool:
        return not self.problems and self.prompts == self.expected_prompts

    def check(self) -> None:
        """Collect every failed guest result and a wrong prompt count."""
        for boot in self.boots:
            self.problems += [f"{boot.label}: {n} failed ({d})" for n, ok, d in boot.results
                              if not ok]
            # what the job printed after its first failed result (a journal excerpt, where it
            # prints one): the CI's log is all there is of a guest that is gone
            failed = next((n for n, ok, _ in boot.results if not ok), None)
            at = boot.console.find(f"VMTEST-RESULT {failed} FAIL") if failed else -1
            if at >= 0:
                self.notes.append(f"{boot.label}: the console after {failed} failed:\n"
                                  + boot.console[at:at + 6000])
            if not boot.results:
                self.problems.append(f"{boot.label}: the guest reported nothing")
            # A job that died part way would leave its later checks unreported, not failed.
            if boot.rc not in (None, 0):
                self.problems.append(f"{boot.label}: the job exited {boot.rc}; the results "
                                     "after its failure are missing")
        if self.prompts != self.expected_prompts:
            self.problems.append(
                f"{self.prompts} prompt(s) reached the person, expected {self.expected_prompts}")


def _latencies(outcome: Outcome) -> None:
    for boot in outcome.boots:
        for m in re.finditer(r"KH-LATENCY-US ([0-9,]*)", boot.console):
            if m.group(1):
                ms = ", ".join(f"{int(x) / 1000:.1f} ms" for x in m.group(1).split(","))
                outcome.notes.append(f"{boot.label}: prompt to keyhandoff's answer {ms}")


def _security(outcome: Outcome) -> None:
    for boot in outcome.boots:
        for m in re.finditer(r"KH-SECURITY (\S+) .*?exposure level for \S+: ([0-9.]+ \S+)",
                             boot.console):
            outcome.notes.append(f"systemd-analyze security {m.group(1)}: {m.group(2)}")


def tamper(outcome: Outcome, vars_file: Path) -> None:
    """Flip one bit of the record in the machine's flash, as someone with the disk could."""
    blob = bytearray(vars_file.read_bytes())
    at = blob.find(b"KHST")
    if at < 0:
        outcome.problems.append("no record found in OVMF_VARS after arming")
        return
    blob[at + 16] ^= 0x01  # a byte of not_after, in the authenticated header
    vars_file.write_bytes(bytes(blob))
    outcome.notes.append(f"flipped one bit of the record at OVMF_VARS offset {at + 16:#x}")


def _scan_vars(outcome: Outcome, vars_file: Path, passphrase: bytes) -> None:
    data = vars_file.read_bytes()
    if passphrase in data:
        outcome.problems.append("the passphrase occurs in OVMF_VARS")
    outcome.notes.append(f"OVMF_VARS: passphrase absent; {data.count(b'KHST')} record copy(ies) "
                         "left in flash (deleting does not erase; their keyslots are gone)")


# --- scenarios -------------------------------------------------------------------------------


def _setup(image: RunImage, workdir: Path, pw: bytes) -> tuple[Machine, Person, Path]:
    """A fresh machine (own OVMF_VARS) with a fresh LUKS2 data disk, and its person."""
    data = workdir / "data.img"
    make_data_disk(data, pw)
    return Machine(image, workdir / "vm", disks=(Disk(data, "data"),)), Person(pw), data


def _check_data_image(out: Outcome, data: Path) -> None:
    """Only the person's keyslot and no token may be left on the volume."""
    slots, tokens = luks_state(data)
    if len(slots) != 1 or tokens:
        out.problems.append(f"data image: keyslots {slots}, tokens {tokens} left")
    out.notes.append(f"data image afterwards: keyslots {slots}, tokens {tokens or 'none'}")


def scenario_full_reboot(image: RunImage, workdir: Path) -> Outcome:
    pw = make("demo-full")
    out = Outcome("full-reboot", expected_prompts=1)
    m, person, data = _setup(image, workdir, pw)
    try:
        out.boots.append(run_boot(m, person, job("""
linger_person()  # the person's user manager starts while the volume opens
""" + WAIT_OPEN + WAIT_CAPTURED + """
result("pam-gdm", token_sha("kh-gdm") == expected_sha(),
       "autologin: pam_gdm gave PAM_AUTHTOK = the passphrase (systemd's cache)")
""" + FIRST_LOGIN + """
from keyhandoff import update
report = update.arm(reboot="full", boots=2, ttl=timedelta(minutes=30), login=True, ask=None)
print(report.summary(), flush=True)
result("armed", report.channel == "efi" and all(v.armed for v in report.volumes),
       report.channel)
""" + SCHEDULE_DEMO_UPDATE + NO_LEAK, pw, action="reboot", timeout=LOGIN_JOB_TIMEOUT),
            "boot 1 (person types; arm)"))
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + LATENCY + """
default = subprocess.run(["systemctl", "get-default"], capture_output=True, text=True)
state = default.stdout.strip()
result("update-target", state == "system-update.target" and os.path.lexists("/system-update"),
       f"this is the offline-update boot (default target {state})")
with open("/data/update-applied", "w") as f:
    f.write(open("/proc/sys/kernel/random/boot_id").read())
os.sync()
from keyhandoff import update
r = update.rearm()
result("rearmed", r.channel == "efi", f"{r.boots} boot(s) left")
result("one-onetime-slot", onetime_tokens(DEVICE) == 1,
       "the used one-time keyslot is gone, the next boot's is there")
os.unlink("/system-update")
""" + NO_LEAK, pw, action="reboot"), "boot 2 (update applied; rearm)"))
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + LATENCY + """
person_ready = start_person_session()
result("update-marker", os.path.exists("/data/update-applied"), "the update wrote into the volume")
wait_until(lambda: active("keyhandoff-finish.service"), 60)
result("pam-gdm", token_sha("kh-gdm") == expected_sha(), "autologin via the stock pam_gdm")
result("pam-systemd-loadkey", token_sha("kh-loadkey") == expected_sha(),
       "autologin via systemd's pam_systemd_loadkey (PAM_AUTHTOK = the passphrase)")
result("pam-keyhandoff", token_sha("kh-ours") == expected_sha(), "autologin via pam_keyhandoff.so")
result("one-shot", token_sha("kh-ours") is None, "pam_keyhandoff's key is gone after use")
""" + LOGIN_KEYRING_CHECKS + """
from keyhandoff import update
result("disarmed", not update.status()["armed"], "nothing armed any more")
result("no-onetime-left", onetime_tokens(DEVICE) == 0, "no one-time keyslot or token left")
for unit in ("keyhandoff-agent", "keyhandoff-restore", "keyhandoff-finish", "keyhandoff-rearm"):
    sec = subprocess.run(["systemd-analyze", "security", "--no-pager", unit + ".service"],
                         capture_output=True, text=True).stdout.strip().splitlines()
    print("KH-SECURITY", unit, sec[-1] if sec else "?", flush=True)
""" + NO_LEAK, pw, action="poweroff", timeout=LOGIN_JOB_TIMEOUT), "boot 3 (autologin)"))
    finally:
        m.kill()
    out.check()
    _latencies(out)
    _security(out)
    _scan_vars(out, m.vars_file, pw)
    _check_data_image(out, data)
    return out


def scenario_soft_reboot(image: RunImage, workdir: Path) -> Outcome:
    pw = make("demo-soft")
    out = Outcome("soft-reboot", expected_prompts=1)
    m, person, _data = _setup(image, workdir, pw)
    body = WAIT_OPEN + """
phase = "/run/kh-demo-phase"
if not os.path.exists(phase):
""" + "\n".join("    " + line for line in WAIT_CAPTURED.strip().splitlines()) + """
    from keyhandoff import update
    r = update.arm(reboot="soft", ttl=timedelta(minutes=10), login=True, ask=None)
    result("armed", r.channel == "keyring", r.channel)
    # Detach the volume, so the next userspace has to open it again (an active one is not
    # re-prompted at all): this is what shows the keyring channel at work.
    subprocess.run(["umount", "/data"], check=True)
    subprocess.run(["systemctl", "stop", "systemd-cryptsetup@data.service"], check=True)
    # systemd's own cache keeps what was typed for 150 s: an update that takes longer
    # finds it gone. Clear it now, so that only keyhandoff can answer after the soft reboot.
    from keyhandoff.cache import SystemdCache
    SystemdCache().clear()
    result("closed", not os.path.exists("/dev/mapper/data"), "volume closed before soft-reboot")
    open(phase, "w").write("after")
    subprocess.Popen(["systemctl", "soft-reboot", "--no-block"])
else:
""" + "\n".join("    " + line for line in (LATENCY + """
result("same-kernel", True, open("/proc/sys/kernel/random/boot_id").read().strip())
from keyhandoff import update
wait_until(lambda: active("keyhandoff-finish.service"), 60)
result("pam-gdm", token_sha("kh-gdm") == expected_sha(), "autologin after the soft reboot")
result("disarmed", not update.status()["armed"], "nothing armed any more")
""" + NO_LEAK).strip().splitlines()) + """
    subprocess.Popen(["systemctl", "poweroff", "--no-block"])
"""
    try:
        out.boots.append(run_boot(m, person, job(body, pw, action="none"),
                                  "boot 1 + soft-reboot", phases=2))
    finally:
        m.kill()
    out.check()
    _latencies(out)
    return out


#: Close the data volume, so the next userspace has to open it again (an active one is not
#: re-prompted at all), and clear systemd's own cache of what was typed: after a soft
#: reboot, only keyhandoff can answer.
CLOSE_DATA = """
subprocess.run(["umount", "/data"], check=True)
subprocess.run(["systemctl", "stop", "systemd-cryptsetup@data.service"], check=True)
from keyhandoff.cache import SystemdCache
SystemdCache().clear()
result("closed", not os.path.exists("/dev/mapper/data"), "volume closed before soft-reboot")
"""
#: keyhandoff's own words about the schedule in this boot (soft reboots included).
SCHEDULE_JOURNAL = """
print(subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                      "-u", "keyhandoff-schedule*"],
                     capture_output=True, text=True).stdout[-3000:], flush=True)
"""


def scenario_auto_soft_reboot(image: RunImage, workdir: Path) -> Outcome:
    """A runner that schedules its update and soft-reboots, and never calls keyhandoff.

    Boot 1: the person types; the runner makes ``/system-update`` and keyhandoff-schedule.path
    arms ``full`` at once (no shutdown is under way yet).  ``systemctl soft-reboot``: the
    shutdown unit sees ``soft-reboot.target`` queued and arms the keyring channel instead.
    The update boot (same kernel) opens the volume unasked, and the runner soft-reboots
    again after removing the link; the final userspace opens it unasked and nothing is left.
    """
    pw = make("demo-autosoft")
    out = Outcome("auto-soft-reboot", expected_prompts=1)
    m, person, data = _setup(image, workdir, pw)
    body = WAIT_OPEN + """
phase_file = "/run/kh-demo-phase"
phase = open(phase_file).read() if os.path.exists(phase_file) else "schedule"
from keyhandoff import schedule, update
if phase == "schedule":
""" + _indent(WAIT_CAPTURED + CLOSE_DATA + SCHEDULE_DEMO_UPDATE + """
wait_until(lambda: (schedule.last_report() or {}).get("action") == "armed", 120)
r = schedule.last_report() or {}
result("armed-at-schedule", r.get("channel") == "efi" and "coming" not in r,
       r.get("detail", "no outcome"))
result("capture-kept", UUID in cached_volumes(), "kept for the shutdown to decide")
open(phase_file, "w").write("update")
subprocess.Popen(["systemctl", "soft-reboot", "--no-block"])   # the runner's reboot
""") + """
elif phase == "update":
""" + _indent(LATENCY + """
default = subprocess.run(["systemctl", "get-default"], capture_output=True, text=True)
result("update-target", default.stdout.strip() == "system-update.target",
       f"the update boot, entered by a soft reboot (default target {default.stdout.strip()})")
r = schedule.last_report() or {}
result("armed-at-shutdown", r.get("action") == "armed" and r.get("channel") == "keyring"
       and r.get("coming") == "soft-reboot", r.get("detail", "no outcome"))
st = update.status()
result("soft-chain", st.get("reboot") == "soft" and st.get("boots_left") == 1, str(st))
from keyhandoff import efi
result("no-efi-record", not efi.RECORD_VARIABLE.exists(), "the EFI arming was superseded")
result("no-onetime", onetime_tokens(DEVICE) == 0, "nor is its one-time keyslot left")
with open("/data/update-applied", "w") as f:
    f.write("applied\\n")
os.sync()
""" + SCHEDULE_JOURNAL + CLOSE_DATA + """
os.unlink("/system-update")                                   # the runner, before its reboot
open(phase_file, "w").write("final")
subprocess.Popen(["systemctl", "soft-reboot", "--no-block"])
""") + """
else:
""" + _indent(LATENCY + """
default = subprocess.run(["systemctl", "get-default"], capture_output=True, text=True)
result("final-boot", default.stdout.strip() != "system-update.target", default.stdout.strip())
result("update-marker", os.path.exists("/data/update-applied"), "the update wrote into it")
wait_until(lambda: active("keyhandoff-finish.service"), 60)
result("disarmed", not update.status()["armed"], "nothing armed any more")
result("capture-gone", UUID not in cached_volumes(), "no passphrase left in the cache")
""" + NO_LEAK + """
subprocess.Popen(["systemctl", "poweroff", "--no-block"])
""")
    try:
        out.boots.append(run_boot(m, person, job(body, pw, action="none"),
                                  "boot 1 + 2 soft reboots", phases=3))
    finally:
        m.kill()
    out.check()
    _latencies(out)
    _check_data_image(out, data)
    return out


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip().splitlines()) + "\n"


def scenario_unarmed_then_late(image: RunImage, workdir: Path) -> Outcome:
    pw = make("demo-late")
    out = Outcome("unarmed-then-late", expected_prompts=3)
    m, person, data = _setup(image, workdir, pw)
    try:
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + NO_LEAK, pw, action="reboot"),
                                  "boot 1 (typed; reboot, nothing armed)"))
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + WAIT_CAPTURED + """
from keyhandoff import update
r = update.arm(reboot="full", ttl=timedelta(minutes=1), ask=None)
result("armed", r.channel == "efi", "armed for 1 minute; the machine powers off now")
""", pw, action="poweroff"), "boot 2 (typed; arm 1 min; power off)"))
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S")
        m.extra_args = ("-rtc", f"base={later}")  # powered on two hours later
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + refused("deadline passed")
                                                 + NO_LEAK, pw, action="poweroff"),
                                  "boot 3 (2 h later: prompted, stale record wiped)"))
    finally:
        m.kill()
    out.check()
    _check_data_image(out, data)
    return out


def scenario_tampered(image: RunImage, workdir: Path) -> Outcome:
    pw = make("demo-tamper")
    out = Outcome("tampered", expected_prompts=2)
    m, person, data = _setup(image, workdir, pw)
    try:
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + WAIT_CAPTURED + """
from keyhandoff import update
r = update.arm(reboot="full", ttl=timedelta(minutes=30), ask=None)
result("armed", r.channel == "efi", r.channel)
""", pw, action="poweroff"), "boot 1 (typed; arm; power off)"))
        tamper(out, m.vars_file)
        out.boots.append(run_boot(m, person, job(WAIT_OPEN + refused("authentication failed")
                                                 + NO_LEAK, pw, action="poweroff"),
                                  "boot 2 (tampered: prompted, record refused)"))
    finally:
        m.kill()
    out.check()
    _check_data_image(out, data)
    return out


SCENARIOS: dict[str, Callable[[RunImage, Path], Outcome]] = {
    "full-reboot": scenario_full_reboot,
    "soft-reboot": scenario_soft_reboot,
    "auto-soft-reboot": scenario_auto_soft_reboot,
    "unarmed-then-late": scenario_unarmed_then_late,
    "tampered": scenario_tampered,
}


def demo_image(workdir: Path) -> RunImage:
    """The cached base plus this checkout, installed and configured like a distribution."""
    return build_run_image(workdir, base=ensure_base(), customize=customize)


def table(outcomes: list[Outcome]) -> str:
    """The summary the README promises."""
    rows = [("scenario", "prompts", "boots", "s/boot", "verdict")]
    for o in outcomes:
        per_boot = "/".join(f"{b.seconds:.0f}" for b in o.boots)
        rows.append((o.name, f"{o.prompts} (expected {o.expected_prompts})", str(len(o.boots)),
                     per_boot, "PASS" if o.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str]) -> int:
    """Build (or reuse) the image, run the scenarios, print the table; non-zero on failure."""
    # The encrypted-root and PackageKit scenarios build on this module's parts; imported
    # here, not above, because demo_root and demo_packagekit import this module.
    from .demo_root import RootImages, all_root_scenarios  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="[vm] %(message)s")
    root_scenarios = all_root_scenarios()
    every = [*SCENARIOS, *root_scenarios]
    names = argv or every
    unknown = [n for n in names if n not in every]
    if unknown:
        print(f"unknown scenario(s): {unknown}; choose from {every}", file=sys.stderr)
        return 2
    logs = REPO_ROOT / "build" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="keyhandoff-demo-") as tmp:
        image = demo_image(Path(tmp) / "image") if set(names) & set(SCENARIOS) else None
        roots = RootImages(Path(tmp) / "root-images")
        for name in names:
            log.info("scenario %s", name)
            work = Path(tmp) / name
            work.mkdir(parents=True)
            try:
                if name in root_scenarios:
                    outcome = root_scenarios[name](roots, work)
                else:
                    assert image is not None
                    outcome = SCENARIOS[name](image, work)
            except (MachineError, ImageBuildError, subprocess.CalledProcessError,
                    OSError) as exc:
                outcome = Outcome(name, expected_prompts=-1, problems=[f"aborted: {exc}"])
            outcomes.append(outcome)
            for f in sorted((work / "vm").glob("serial-*.log")):
                shutil.copy(f, logs / f"{name}-{f.name}")
    print()
    print(table(outcomes))
    for o in outcomes:
        for note in o.notes:
            print(f"  {o.name}: {note}")
        for problem in o.problems:
            print(f"  {o.name}: FAILED: {problem}")
    leaks = [p.name for p in logs.iterdir() if MARKER in p.read_bytes()]
    if leaks:
        print(f"a test passphrase appears in the serial logs: {leaks}")
    print(f"\ntotal {time.monotonic() - started:.0f} s; serial logs in {logs}")
    return 0 if all(o.passed for o in outcomes) and not leaks else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
