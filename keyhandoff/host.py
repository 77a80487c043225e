"""The machine as the runner API sees it: the boot id, the clock, systemd's soft-reboot count.

Everything of the outside world that decides what a state change does is read through one
:class:`Host`.  Callers pass nothing and get :data:`THIS_HOST`.  A test of "the next boot"
on a single kernel gives a ``Host`` of its own instead (a reboot cannot be produced on the
test host): another boot id file, a clock moved forward or back, another crypttab::

    host = Host(boot_id_path="/tmp/x/boot_id", clock=lambda: time.time() + 3600)
    update.restore(host=host)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from keyhandoff import crypttab, names

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BOOT_ID_PATH", "SHUTDOWN_TARGETS", "SOFT_REBOOT_SINCE", "THIS_HOST", "UPDATE_LINKS",
           "Host"]

#: Where the running kernel's boot id is read.
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"
#: The first systemd with ``systemctl soft-reboot``.
SOFT_REBOOT_SINCE: Final = 254
#: The links that schedule an offline update (systemd.offline-updates(7)), below the root.
UPDATE_LINKS: Final = ("system-update", "etc/system-update")
#: The targets a shutdown starts (systemd.special(7)), and what each says is coming.
SHUTDOWN_TARGETS: Final = {"soft-reboot.target": "soft-reboot", "kexec.target": "kexec",
                           "reboot.target": "reboot", "poweroff.target": "poweroff",
                           "halt.target": "halt"}


def _systemd_update_target_active() -> bool:
    """Whether ``system-update.target`` is active or being started: this is an update boot."""
    try:
        proc = subprocess.run(["systemctl", "is-active", "system-update.target"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.stdout.strip() in {"active", "activating", "reloading"}


def _systemd_soft_reboots() -> int | None:
    """The number of soft reboots systemd made since the kernel booted (254+), else None."""
    try:
        proc = subprocess.run(["systemctl", "show", "--property=SoftRebootsCount", "--value"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = proc.stdout.strip()
    return int(text) if proc.returncode == 0 and text.isdigit() else None


def _systemd_version() -> int | None:
    """The version ``systemctl --version`` prints (systemd's own), or None."""
    try:
        proc = subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"systemd (\d+)", proc.stdout)
    return int(m.group(1)) if m else None


def _systemd_coming_shutdown() -> str | None:
    """What the queued shutdown is (a :data:`SHUTDOWN_TARGETS` value), or None.

    Read from the manager's job list (``systemctl list-jobs``, over PID 1's private socket:
    the system bus may be stopped already): every shutdown that stops units, whoever asked
    for it (logind, ``systemctl``, a runner starting ``reboot.target`` itself), has a start
    job for its target queued until those stops are done.  logind's
    ``PrepareForShutdownWithMetadata`` says the same, but only for shutdowns logind makes.
    """
    if not _systemd_booted():
        return None
    try:
        proc = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--no-pager"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return coming_from_jobs(proc.stdout) if proc.returncode == 0 else None


def coming_from_jobs(text: str) -> str | None:
    """The shutdown ``systemctl list-jobs --no-legend`` shows queued (JOB UNIT TYPE STATE)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "start" and fields[1] in SHUTDOWN_TARGETS:
            return SHUTDOWN_TARGETS[fields[1]]
    return None


def _systemd_booted() -> bool:
    """sd_booted(): systemd is the running init (``/run/systemd/system`` exists)."""
    return os.path.isdir("/run/systemd/system")


@dataclass(frozen=True, slots=True)
class Host:
    """Where the boot id, the time, the soft-reboot count and crypttab come from."""

    boot_id_path: str = BOOT_ID_PATH
    clock: Callable[[], float] = time.time
    soft_reboot_count: Callable[[], int | None] = _systemd_soft_reboots
    crypttab_path: str = crypttab.DEFAULT_PATH
    #: the file system root the offline-update links are looked for under
    root: str = "/"
    update_target_active: Callable[[], bool] = _systemd_update_target_active
    systemd_version: Callable[[], int | None] = _systemd_version
    systemd_booted: Callable[[], bool] = _systemd_booted
    #: where the kexec channel's record waits after the initramfs moved it out of the segment
    kexec_record_path: str = names.KEXEC_RECORD
    #: the mark that says the loaded kexec image is keyhandoff's
    kexec_mark_path: str = names.KEXEC_LOADED_MARK
    #: the shutdown queued now (``"soft-reboot"``, ``"kexec"``, ``"reboot"``, ...), or None
    coming_shutdown: Callable[[], str | None] = _systemd_coming_shutdown

    def boot_id(self) -> str:
        """The running boot's id (a soft reboot keeps it; kexec and a full reboot do not)."""
        with open(self.boot_id_path, encoding="ascii") as f:
            return f.read().strip()

    def now(self) -> int:
        """Unix seconds."""
        return int(self.clock())

    def soft_reboots(self) -> int | None:
        """Systemd's ``SoftRebootsCount`` (None when systemd does not say)."""
        return self.soft_reboot_count()

    def scheduled_update(self) -> str | None:
        """The link that schedules an offline update, or ``None`` when none is scheduled.

        Looked for as systemd-system-update-generator does: ``/system-update``, then
        ``/etc/system-update``, the link itself (a dangling link schedules an update too).
        """
        for name in UPDATE_LINKS:
            path = os.path.join(self.root, name)
            if os.path.lexists(path):
                return path
        return None

    def soft_reboot_refusal(self) -> str | None:
        """Why ``systemctl soft-reboot`` cannot be used here (systemd < 254), else None.

        Only where systemd is the running init: elsewhere (a container, a chroot, a build
        machine) there is no running systemd whose version would decide.
        """
        if not self.systemd_booted():
            return None
        version = self.systemd_version()
        if version is not None and version < SOFT_REBOOT_SINCE:
            return (f"this machine runs systemd {version}; systemctl soft-reboot needs "
                    f"systemd {SOFT_REBOOT_SINCE} or later: arm for a full reboot "
                    "(--reboot full) instead")
        return None

    def in_update_boot(self) -> bool:
        """Whether this boot is an update boot (``system-update.target`` is active)."""
        return self.update_target_active()

    def shutdown_coming(self) -> str | None:
        """The shutdown being carried out now (see :func:`coming_from_jobs`), or None."""
        return self.coming_shutdown()

    def kexec_image_ours(self) -> bool:
        """Whether keyhandoff loaded the kexec image in the kernel: its mark is there.

        The mark lives in ``/run`` (a kexec or a reboot empties it) and goes at an unload.
        """
        return os.path.exists(self.kexec_mark_path)

    def kexec_loaded_by_others(self) -> bool:
        """Whether a kexec image is loaded that keyhandoff did not load (its mark is absent).

        Read under :attr:`root` (``/sys/kernel/kexec_loaded``): a scratch root has none.
        """
        from keyhandoff import kexec  # noqa: PLC0415 (the compiled binding: only when asked)

        return kexec.state(root=self.root).loaded and not self.kexec_image_ours()

    def crypttab(self) -> list[crypttab.CrypttabEntry]:
        """Every entry of crypttab (an unreadable file is an empty one)."""
        try:
            with open(self.crypttab_path, encoding="utf-8", errors="replace") as f:
                return crypttab.parse(f.read())
        except OSError:
            return []


#: The running machine.
THIS_HOST: Final = Host()
