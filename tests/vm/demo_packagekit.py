"""The demo's PackageKit scenarios: an offline update PackageKit runs itself, root on LUKS2.

The guest is the encrypted-root dracut guest of :mod:`.demo_root` with the real
``packagekit`` 1.3 (Debian 13) and its apt backend.  A test package, ``kh-demo-tool``, is
installed at version 1.0; a local repository (``deb [trusted=yes] file:/srv/kh-repo ./``, the
guest's only apt source: it has no network) has 2.0.  The update is refreshed, downloaded and
scheduled with PackageKit's own commands; keyhandoff is never called by anyone on that path:
its ``keyhandoff-schedule.path`` sees ``/system-update`` appear and arms.  Then the runner's
reboot (``systemctl reboot``, which asks logind, as GNOME Software's "Restart & Install" does
through the session), PackageKit's update boot, which reboots by itself when the update is
applied (``pk-offline-update``: ``StartUnit("reboot.target", "replace-irreversibly")``), and
the boot after it.

Scenarios:

1. ``packagekit-offline-update``: boot 1 the person types at the initramfs prompt, it is
   captured; ``pkcon refresh force``, ``pkcon --only-download update``, ``pkcon
   offline-trigger``; keyhandoff arms by itself.  Boot 2 (the update boot, no test job in
   it: PackageKit's alone) opens the root with the one-time key, applies the update, re-arms
   at its shutdown, reboots.  Boot 3 opens unasked.  Prompts: 1.  Afterwards: 2.0 installed,
   nothing armed, only the person's keyslot on the root, no passphrase in the journals or in
   ``OVMF_VARS``.
2. ``packagekit-nothing-captured``: the same with the capture kept one minute only (an
   administrator's drop-in, ``[capture] retain = 60``, ``wait_for_update = "1min"``): it has
   expired when the update is scheduled, so ``keyhandoff schedule`` arms nothing and says so.
   The update still lands; each boot asks.  Prompts: 3.

Figures: prompts per scenario; from "Restart & Install" (boot 1's job done, the runner's
reboot next) to the final boot's multi-user (its ``VMTEST-BOOTED``), host clock, with
keyhandoff (scenario 1) and without it (scenario 2, where each prompt is typed at once);
the update boot's power-on to PackageKit's reboot; what keyhandoff's journal said in each
boot (the schedule's outcome, restore, re-arm, finish).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING

from .demo import GUEST_DEMO, NO_LEAK, Boot, Outcome, Person, _scan_vars
from .demo_root import (
    ANALYZE,
    BOOT_TIMEOUT,
    PRELUDE,
    ROOT_OPEN,
    WAIT_CAPTURED,
    Console,
    _check_root_header,
    _figures,
    _machine,
    customize_root,
)
from .image import _chroot, _chroot_mounts, _run
from .machine import BOOTED_RE, DONE_RE, Machine
from .runner import GuestJob

if TYPE_CHECKING:
    from collections.abc import Callable

    from .demo_root import RootImages

log = logging.getLogger("keyhandoff.vmtest")

TOOL = "kh-demo-tool"
OLD_VERSION = "1.0"
NEW_VERSION = "2.0"
REPO_DIR = "/srv/kh-repo"
APT_SOURCE = f"deb [trusted=yes] file:{REPO_DIR} ./\n"
#: the flavours of :class:`.demo_root.RootImages` (ROOT_GENERATOR names them dracut-<flavour>)
FLAVOUR = "packagekit"
FLAVOUR_SHORT = "packagekit-short-capture"

#: Boot 1's job: PackageKit's refresh, download and trigger, then keyhandoff's arming (TCG:
#: each pkcon call starts packagekitd or opens apt's cache; under 900 s, vmtest.service's
#: own limit, with room for its udev settle and the job disk).
SCHEDULE_JOB_TIMEOUT = 780
CHECK_JOB_TIMEOUT = 300
#: Power-on to PackageKit's own reboot in the update boot: a root boot (up to ~280 s here),
#: packagekitd and the apt transaction, keyhandoff's re-arm at shutdown; a bound, not a figure.
UPDATE_BOOT_TIMEOUT = 1200
#: The runner's reboot or poweroff to QEMU's exit: keyhandoff's ExecStop steps (schedule,
#: rearm) run in Python under TCG, packagekitd stops, the root is closed.
SHUTDOWN_TIMEOUT = 300

CAPTURED_ID = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a710"
NOTHING_CAPTURED_ID = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a743"
SCHEDULE_ID = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a745"  # keyhandoff schedule's other outcomes

# packagekitd refuses to refresh or download "whilst offline" when GLib's network monitor
# (netlink: a default route) sees no network, and the guest has only lo.  GLib's "base"
# monitor (GIO_USE_NETWORK_MONITOR=base) did not change that in the first run, so the guest
# gets what the netlink monitor looks for: a default route, on a dummy interface that goes
# nowhere (the repository is a file: source; nothing is sent).
ROUTE_UNIT_NAME = "kh-vmtest-route.service"
ROUTE_UNIT = """\
# keyhandoff VM test guest (tests/vm/demo_packagekit.py): a default route for GLib's network
# monitor, so that packagekitd is "online"; the dummy interface sends nothing anywhere.
[Unit]
Description=keyhandoff VM test: a default route on a dummy interface for packagekitd
Before=packagekit.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip link add kh-vm0 type dummy
ExecStart=/usr/sbin/ip link set kh-vm0 up
ExecStart=/usr/sbin/ip address add 192.0.2.1/24 dev kh-vm0
ExecStart=/usr/sbin/ip route add default via 192.0.2.254 dev kh-vm0
"""
PACKAGEKIT_DROPIN = f"""\
# keyhandoff VM test guest (tests/vm/demo_packagekit.py): no network interface but lo.
[Unit]
Wants={ROUTE_UNIT_NAME}
After={ROUTE_UNIT_NAME}
"""
SHORT_CAPTURE_DROPIN = """\
# keyhandoff VM test guest (tests/vm/demo_packagekit.py, packagekit-nothing-captured):
# what is typed at boot is kept one minute, so it has expired when the update is scheduled.
[capture]
retain = 60
wait_for_update = "1min"
"""


# --- the guest -------------------------------------------------------------------------------


def _tool_deb(version: str, out: Path) -> Path:
    """``kh-demo-tool_<version>_all.deb``: a command and a file that say the version."""
    tree = out / f"{TOOL}-{version}"
    control = (f"Package: {TOOL}\nVersion: {version}\nArchitecture: all\n"
               "Maintainer: keyhandoff VM tests <vmtest@keyhandoff.invalid>\n"
               "Section: misc\nPriority: optional\n"
               "Description: keyhandoff VM test package (PackageKit offline update)\n"
               f" Says its version; the offline update replaces {OLD_VERSION} with "
               f"{NEW_VERSION}.\n")
    files = {
        "DEBIAN/control": (control, 0o644),
        f"usr/bin/{TOOL}": (f"#!/bin/sh\necho '{TOOL} {version}'\n", 0o755),
        f"usr/share/{TOOL}/version": (f"{version}\n", 0o644),
    }
    for rel, (text, mode) in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    for directory in (tree, *(p for p in tree.rglob("*") if p.is_dir())):
        directory.chmod(0o755)
    deb = out / f"{TOOL}_{version}_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", tree, deb])
    return deb


def _release(repo: Path) -> None:
    """An unsigned ``Release`` for the flat repository (``[trusted=yes]`` needs no signature).

    SHA256 only (apt wants a strong hash); no Suite, Codename or Architectures, which a flat
    repository need not have; the date a day back, so no clock makes it "not valid yet".
    """
    index = (repo / "Packages").read_bytes()
    (repo / "Release").write_text(
        "Origin: keyhandoff VM tests\nLabel: kh-repo\n"
        f"Date: {formatdate(time.time() - 86400, usegmt=True)}\n"
        "SHA256:\n"
        f" {hashlib.sha256(index).hexdigest()} {len(index)} Packages\n")
    (repo / "Release").chmod(0o644)


def _apt_local_only(rootfs: Path) -> None:
    """apt knows the local repository only: the mirror's source and lists are gone."""
    apt = rootfs / "etc/apt"
    (apt / "sources.list").write_text(
        "# keyhandoff VM test guest: no network; the one source is sources.list.d/kh-repo.list\n")
    sources = apt / "sources.list.d"
    sources.mkdir(exist_ok=True)
    for old in sources.iterdir():
        old.unlink()
    (sources / "kh-repo.list").write_text(APT_SOURCE)
    # The base keeps the mirror's indexes of its build (apt-get update for the kernel):
    # without them nothing but the local repository offers an update.
    for name in (rootfs / "var/lib/apt/lists").iterdir():
        if name.is_file() and name.name != "lock":
            name.unlink()
    for cache in (rootfs / "var/cache/apt").glob("*.bin"):
        cache.unlink()


def customize_packagekit(rootfs: Path, *, short_capture: bool = False) -> None:
    """The encrypted-root guest with PackageKit ready for an offline update of the test package.

    The update boot is PackageKit's alone: the demo's runner, which :func:`.demo.customize`
    also starts there, is not (no job could report before PackageKit's own reboot ends it).
    """
    customize_root(rootfs)
    build_log = rootfs.parent / "image-build.log"
    systemd = rootfs / "etc/systemd/system"
    (systemd / "system-update.target.wants/vmtest.service").unlink()
    dropin = systemd / "packagekit.service.d/vmtest-no-network.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(PACKAGEKIT_DROPIN)
    (systemd / ROUTE_UNIT_NAME).write_text(ROUTE_UNIT)
    _apt_local_only(rootfs)
    repo = rootfs / REPO_DIR.lstrip("/")
    repo.mkdir(parents=True, exist_ok=True)
    repo.chmod(0o755)  # apt's file method reads it as _apt
    with tempfile.TemporaryDirectory(prefix="kh-demo-tool-") as tmp:
        old = _tool_deb(OLD_VERSION, Path(tmp))
        new = _tool_deb(NEW_VERSION, Path(tmp))
        shutil.copyfile(new, repo / new.name)
        (repo / new.name).chmod(0o644)
        shutil.copyfile(old, rootfs / "tmp" / old.name)
    try:
        with _chroot_mounts(rootfs):
            _chroot(rootfs, "dpkg", "-i", f"/tmp/{old.name}", log_file=build_log)
            # The index by Debian 13's own dpkg-scanpackages (dpkg-dev is in the base).
            _chroot(rootfs, "sh", "-c", f"cd {REPO_DIR} && dpkg-scanpackages --multiversion . "
                    "> Packages", log_file=build_log)
    finally:
        (rootfs / "tmp" / old.name).unlink()
    (repo / "Packages").chmod(0o644)
    _release(repo)
    if short_capture:
        conf = rootfs / "etc/keyhandoff/keyhandoff.conf.d/50-vmtest-short-capture.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(SHORT_CAPTURE_DROPIN)


# --- jobs ------------------------------------------------------------------------------------

PK_PRELUDE = PRELUDE + "from pk_lib import *\n"


def pk_job(body: str, passphrase: bytes, *, action: str, timeout: int) -> GuestJob:
    """A Python job with demo_lib, pk_lib and the passphrase's SHA-256 (never the passphrase)."""
    files = {
        "demo_lib.py": (GUEST_DEMO / "demo_lib.py").read_bytes(),
        "pk_lib.py": (GUEST_DEMO / "pk_lib.py").read_bytes(),
        "expect.sha256": hashlib.sha256(passphrase).hexdigest().encode(),
    }
    return GuestJob.python(PK_PRELUDE + body, files=files, action=action, timeout=timeout)


def _versioned(code: str) -> str:
    return code.replace("@OLD@", OLD_VERSION).replace("@NEW@", NEW_VERSION)


# Boot 1, nothing-captured: it was captured (the journal says for how long), then expired.
CAPTURE_EXPIRES = """
captured = [e for e in journal("@CAPTURED@")
            if e.get("KEYHANDOFF_VOLUME", "").lower() == UUID]
result("captured-at-boot", bool(captured),
       captured[-1].get("MESSAGE", "") if captured else "no CAPTURED entry for the root")
result("capture-expired", wait_until(lambda: UUID not in cached_volumes(), 240),
       "the kernel deleted the captured passphrase (retain = 60) before the update is scheduled")
""".replace("@CAPTURED@", CAPTURED_ID)

# Boot 1: PackageKit's own commands, as a person's software centre runs them.
SCHEDULE = _versioned("""
result("old-version", tool_version() == "@OLD@", f"{TOOL} {tool_version()} installed")
r = run("pkcon", "--version")
print("KH-PK-VERSION", r.stdout.strip() if r is not None else "?", flush=True)
r = run("pkcon", "-p", "refresh", "force")
result("pk-refresh", succeeded(r), "pkcon refresh force: the local repository's index")
# PackageKit deletes a prepared update when its backend's file monitor reports a change of
# the package database outside a transaction (pk_backend_installed_db_changed; the refresh's
# inhibit ends 3 s after it, "to cover the 2 second rate limit" of GIO's monitor).  The
# refresh just rewrote apt's files; under TCG that event can come later than those 3 s, and
# it then deleted the update prepared meanwhile: offline-trigger said "Prepared update not
# found", 0.2 s after the download had written it (once in three runs).  So the event comes
# and goes before anything is prepared.
time.sleep(10)
r = run("pkcon", "-p", "get-updates")
result("pk-update-offered", r is not None and TOOL in r.stdout, "pkcon get-updates")
# What the update boot applies is what the daemon wrote to prepared-update; pkcon's exit code
# is only reported (it says 5, "nothing useful", for a transaction that emitted no package).
r = run("pkcon", "-p", "-y", "--only-download", "update")
prepared = read_text(PREPARED)
result("pk-downloaded", (TOOL + ";@NEW@;") in prepared,
       f"rc={r and r.returncode}; " + (" ".join(prepared.split()) or "no " + PREPARED))
r = run("pkcon", "-p", "offline-trigger")
link = link_target(TRIGGER)
result("pk-triggered", link == PREPARED, f"rc={r and r.returncode}; {TRIGGER} -> {link}")
# Nobody calls keyhandoff: keyhandoff-schedule.path saw the link appear.
settled = wait_until(lambda: last_schedule() is not None, 240)
st = status()
print("KH-STATUS", json.dumps(st, sort_keys=True), flush=True)
sched, handoff = st.get("schedule") or {}, st.get("handoff") or {}
print("KH-SCHEDULE-OUTCOME", sched.get("last_action"), "|", sched.get("last_detail"),
      flush=True)
""")
# A later run (another event on the link) would say "left-alone": the journal keeps "armed".
ARMED_BY_ITSELF = """
said = wait_until(lambda: any(e.get("KEYHANDOFF_ACTION") == "armed"
                              for e in journal("@SCHEDULE@")), 60)
result("auto-armed", settled and said and handoff.get("armed") is True
       and handoff.get("armed_automatically") is True
       and sched.get("armed_automatically_in_this_boot") is True,
       str(sched.get("last_detail")))
result("onetime-slot", onetime_tokens(DEVICE) == 1, "the update boot's one-time keyslot")
# kept until the shutdown unit knows which reboot is coming (a soft reboot needs it); the
# reboot's shutdown then takes it out (keyhandoff-schedule-shutdown: "a reboot is coming")
result("capture-kept", UUID in cached_volumes(),
       "the captured passphrase waits in the cache, under its own timeout, for the shutdown")
keyhandoff_journal("0", "boot-1")
""".replace("@SCHEDULE@", SCHEDULE_ID)
NOTHING_ARMED = """
result("not-armed", settled and sched.get("last_action") == "nothing-captured"
       and handoff.get("armed") is False, str(sched.get("last_detail")))
said = [e.get("MESSAGE", "") for e in journal("@NOTHING@")
        if MAPPING in e.get("KEYHANDOFF_VOLUMES", "").split()]
result("journal-nothing-captured", bool(said), said[-1] if said else "no entry")
result("no-onetime-slot", onetime_tokens(DEVICE) == 0, "nothing added to the root's header")
keyhandoff_journal("0", "boot-1")
""".replace("@NOTHING@", NOTHING_CAPTURED_ID)
RESTART_AND_INSTALL = """
print("KH-RESTART-AND-INSTALL", flush=True)  # the runner's systemctl reboot comes next
"""

# Boot 3: what PackageKit did in the update boot, what is left.
FINAL = _versioned("""
wait_until(lambda: active("keyhandoff-finish.service"), 120)
result("upgraded", tool_version() == "@NEW@", f"dpkg-query -W {TOOL}: {tool_version()}")
res = pk_results()
result("pk-results", res.get("Success") == "true", f"{RESULTS}: {res}")
result("pk-trigger-gone", link_target(TRIGGER) is None and not os.path.exists(PREPARED),
       "no /system-update, no prepared update left")
pk_log = unit_log("-1", PK_UNIT)
print("KH-PK-UNIT-LOG", pk_log[-3000:].replace(chr(10), " | "), flush=True)
result("pk-rebooted-itself", any(line.strip() == "rebooting" for line in pk_log.splitlines()),
       "pk-offline-update's own reboot (reboot.target) ended the update boot")
times = update_service_times("-1")
if times:
    print("KH-PK-UPDATE", f"{times[0]:.1f}", f"{times[1]:.1f}", flush=True)
st = status()
print("KH-STATUS", json.dumps(st, sort_keys=True), flush=True)
result("nothing-armed", (st.get("handoff") or {}).get("armed") is False
       and (st.get("efi") or {}).get("record_present") is False,
       "keyhandoff status: nothing armed, no record in the firmware")
slots, tokens = header(DEVICE)
result("only-person-keyslot", len(slots) == 1 and not tokens,
       f"cryptsetup luksDump: keyslots {slots}, tokens {tokens}")
keyhandoff_journal("-2", "boot-1")
update_boot = keyhandoff_journal("-1", "update-boot")
this_boot = keyhandoff_journal("0", "boot-3")
result("update-boot-journal-clean", leaks("-1") == 0 and leaks("-2") == 0,
       "no test passphrase in the update boot's or boot 1's journal")
""")
FINAL_CARRIED = """
restored = events(update_boot, "RESTORED")
result("update-boot-restored", any("restored one-time keys for 1" in m for m in restored),
       "; ".join(restored) or "no RESTORED entry in the update boot")
rearmed = events(update_boot, "ARMED")
result("update-boot-rearmed", any(m.startswith("re-armed") for m in rearmed),
       "; ".join(rearmed) or "no re-arm in the update boot")
restored = events(this_boot, "RESTORED")
result("restored", any("restored one-time keys for 1" in m for m in restored),
       "; ".join(restored) or "no RESTORED entry")
"""
FINAL_NOTHING_CARRIED = """
carried = events(update_boot, "ARMED") + events(update_boot, "RESTORED")
result("update-boot-nothing-carried", not carried,
       "; ".join(carried) or "nothing restored or re-armed")
"""


# --- running boots ---------------------------------------------------------------------------


@dataclass
class Marks:
    """Host clock (``time.monotonic()``) of one boot's moments."""

    started: float
    booted: float | None = None  # VMTEST-BOOTED (multi-user reached)
    done: float | None = None  # VMTEST-DONE (the runner's reboot or poweroff next)
    exited: float | None = None  # QEMU exited (the guest rebooted or powered off)


def _wait_own_reboot(m: Machine, label: str) -> None:
    """Wait for QEMU to exit because the guest rebooted; fail at once on a normal boot.

    A boot that reaches multi-user is no update boot (the runner prints VMTEST-BOOTED there
    and, with no job disk, stays up): waiting for it to reboot would only run out the bound.
    """
    log.info("  %s: waiting for the guest to reboot by itself (at most %d s)", label,
             UPDATE_BOOT_TIMEOUT)
    deadline = time.monotonic() + UPDATE_BOOT_TIMEOUT
    while m.pid is not None:
        if BOOTED_RE.search(m.console()):
            raise m._fail(f"{label}: the guest reached multi-user: this is no update boot")
        if time.monotonic() > deadline:
            raise m._fail(f"{label}: the guest did not reboot within {UPDATE_BOOT_TIMEOUT} s")
        time.sleep(1)
    m.wait_exit(30)  # reaped already: closes the ports


def run_pk_boot(m: Machine, console: Console, person: Person, job_: GuestJob | None,
                label: str) -> tuple[Boot, Marks]:
    """One boot; with no job, the guest must end it by itself (PackageKit's reboot)."""
    before = len(console.prompts) + len(person.prompts)
    marks = Marks(time.monotonic())
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        m.start(job_)
        threads.append(threading.Thread(target=console.watch, args=(stop,), daemon=True))
        threads.append(threading.Thread(target=person.serve, args=(m.person(), stop),
                                        daemon=True))
        for t in threads:
            t.start()
        if job_ is None:
            _wait_own_reboot(m, label)
        else:
            m.wait_for(BOOTED_RE, BOOT_TIMEOUT)
            marks.booted = time.monotonic()
            done = m.wait_for(DONE_RE, job_.timeout + 60)
            marks.done = time.monotonic()
            if done.group(2) != "none":
                m.wait_exit(SHUTDOWN_TIMEOUT)
        marks.exited = time.monotonic()
    except BaseException:
        m.kill()
        raise
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    text = m.console()
    results = [(r.name, r.passed, r.detail) for r in m.results()]
    if job_ is None:
        # The kernel's last word (pr_emerg, shown at loglevel=4): a reboot, not a power-off.
        rebooted = "reboot: Restarting system" in text
        detail = (f"QEMU exited after {marks.exited - marks.started:.0f} s with no test job in "
                  f"the boot; {'a reboot' if rebooted else 'no reboot message on the console'}")
        results.append(("rebooted-by-itself", rebooted, detail))
    prompts = len(console.prompts) + len(person.prompts) - before
    boot = Boot(label, time.monotonic() - marks.started, prompts, results, text)
    log.info("  %s: %.0f s, %d prompt(s) to the person, %s", label, boot.seconds, boot.prompts,
             ", ".join(f"{n} {'ok' if ok else 'FAILED'}" for n, ok, _ in results) or "no results")
    return boot, marks


def _story(out: Outcome) -> None:
    """Figures from the boots' consoles: pkcon's times, keyhandoff's journal, the update."""
    seen: set[str] = set()
    for boot in out.boots:
        for match in re.finditer(r"KH-PK (pkcon [^:]*): (rc=\S+ in [0-9.]+ s|timed out.*)",
                                 boot.console):
            out.notes.append(f"{boot.label}: {match.group(1)}: {match.group(2).strip()}")
        for match in re.finditer(r"KH-PK-VERSION (.*)", boot.console):
            out.notes.append(f"{boot.label}: pkcon --version {match.group(1).strip()}")
        for match in re.finditer(r"KH-SCHEDULE-OUTCOME (.*)", boot.console):
            out.notes.append(f"{boot.label}: keyhandoff schedule: {match.group(1).strip()}")
        for match in re.finditer(r"KH-PK-UPDATE ([0-9.]+) ([0-9.]+)", boot.console):
            start, end = float(match.group(1)), float(match.group(2))
            out.notes.append(f"update boot: pk-offline-update started {start:.0f} s after "
                             f"power-on, its reboot at {end:.0f} s ({end - start:.0f} s)")
        # Each boot's entries are printed once more by the last boot: quote each line once.
        for match in re.finditer(r"KH-JOURNAL (\S+) (\S+) (.*)", boot.console):
            line = f"journal {match.group(1)}: {match.group(2)} {match.group(3).strip()}"
            if match.group(2) in STORY_EVENTS and line not in seen:
                seen.add(line)
                out.notes.append(line)


STORY_EVENTS = frozenset({"CAPTURED", "NOT_CAPTURED", "ARMED", "RESTORED", "RECORD_REFUSED",
                          "NOTHING_CAPTURED", "SCHEDULE", "SCHEDULE_CANCELLED", "WIPED",
                          "ANSWERED", "CONFIG", "ERROR"})


def _offline_update(images: RootImages, workdir: Path, *, captured: bool) -> Outcome:
    flavour = FLAVOUR if captured else FLAVOUR_SHORT
    image, pw = images.get("dracut", flavour=flavour, customize=functools.partial(
        customize_packagekit, short_capture=not captured))
    name = "packagekit-offline-update" if captured else "packagekit-nothing-captured"
    out = Outcome(name, expected_prompts=1 if captured else 3)
    m, console, person = _machine(image, workdir, pw)
    first = ROOT_OPEN + (WAIT_CAPTURED if captured else CAPTURE_EXPIRES) + SCHEDULE
    first += (ARMED_BY_ITSELF if captured else NOTHING_ARMED) + RESTART_AND_INSTALL
    final = ROOT_OPEN + FINAL + (FINAL_CARRIED if captured else FINAL_NOTHING_CARRIED)
    try:
        boot, scheduled = run_pk_boot(m, console, person, pk_job(
            first + NO_LEAK, pw, action="reboot", timeout=SCHEDULE_JOB_TIMEOUT),
            "boot 1 (typed in the initramfs; PackageKit schedules; Restart & Install)")
        out.boots.append(boot)
        if not any(n == "pk-triggered" and ok for n, ok, _ in boot.results):
            out.check()
            out.problems.append("boot 1 scheduled no update: boots 2 and 3 were not run")
            return out
        boot, update = run_pk_boot(m, console, person, None,
                                   "boot 2 (PackageKit's update boot; it reboots by itself)")
        out.boots.append(boot)
        boot, last = run_pk_boot(m, console, person, pk_job(
            final + ANALYZE + NO_LEAK, pw, action="poweroff", timeout=CHECK_JOB_TIMEOUT),
            "boot 3 (the update is there; nothing left)")
        out.boots.append(boot)
    finally:
        m.kill()
    out.check()
    if scheduled.done is not None and last.booted is not None:
        out.notes.append(f"Restart & Install to the final boot's multi-user: "
                         f"{last.booted - scheduled.done:.0f} s "
                         f"({'with keyhandoff' if captured else 'without: each boot asked'}; "
                         "host clock, boot 1's job done to boot 3's VMTEST-BOOTED)")
    if update.exited is not None:
        out.notes.append(f"update boot: power-on to PackageKit's reboot "
                         f"{update.exited - update.started:.0f} s")
    if console.prompts:
        out.notes.append("initramfs prompt seen at " + ", ".join(
            f"{s:.0f} s" for s in console.prompts) + " after power-on (of its boot)")
    _story(out)
    _figures(out, image)
    _scan_vars(out, m.vars_file, pw)
    _check_root_header(out, m)
    return out


def scenario_packagekit_offline_update(images: RootImages, workdir: Path) -> Outcome:
    """PackageKit schedules, keyhandoff arms by itself: one prompt in three boots."""
    return _offline_update(images, workdir, captured=True)


def scenario_packagekit_nothing_captured(images: RootImages, workdir: Path) -> Outcome:
    """The capture expired before the update was scheduled: it still lands, each boot asks."""
    return _offline_update(images, workdir, captured=False)


PK_SCENARIOS: dict[str, Callable[[RootImages, Path], Outcome]] = {
    "packagekit-offline-update": scenario_packagekit_offline_update,
    "packagekit-nothing-captured": scenario_packagekit_nothing_captured,
}
