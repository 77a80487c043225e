"""A QEMU/OVMF UEFI machine for tests: TCG, direct kernel boot, serial log, virtio-serial port.

One :class:`Machine` is one virtual computer: its firmware variable store (a private copy of
``OVMF_VARS_4M.fd``), its disks and its console logs stay in ``workdir`` across boots. Each
:meth:`Machine.start` is one power-on; with ``no_reboot=True`` a guest reboot ends QEMU, and the
test "reboots" by starting again on the same vars file and disks (faster under TCG than a reset).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from .runner import (
    BOOTED_RE,
    DONE_RE,
    JOB_SERIAL,
    GuestJob,
    Result,
    build_job_disk,
    parse_results,
    read_job_file,
)

if TYPE_CHECKING:
    from types import TracebackType

    from .image import RunImage

ROOT_SERIAL = "vmroot"  # the initramfs mounts the disk with this serial as /

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
INSTALL_HINT = (
    "install with: apt-get install qemu-system-x86 qemu-utils ovmf debootstrap busybox-static"
)

PERSON_PORT = "org.keyhandoff.person"
PERSON_GUEST_DEVICE = f"/dev/virtio-ports/{PERSON_PORT}"

# A bound, not a figure: power-on to VMTEST-BOOTED took 35-80 s here (single-threaded TCG).
BOOT_TIMEOUT = 300.0
EXIT_TIMEOUT = 60.0
CONSOLE_TAIL_LINES = 40


class MachineError(RuntimeError):
    """The VM did not do what a test waited for; the message ends with the console's tail."""


def missing_parts() -> list[str]:
    """What of QEMU/OVMF is missing on this host (empty when the VM tests can run)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(QEMU)
    missing += [str(p) for p in (OVMF_CODE, OVMF_VARS) if not p.exists()]
    return missing


@dataclass(frozen=True)
class Disk:
    """An extra virtio-blk disk; the guest sees it as ``/dev/disk/by-id/virtio-<serial>``."""

    path: Path
    serial: str
    fmt: str = "raw"
    readonly: bool = False


@dataclass(frozen=True)
class JobOutcome:
    """What one boot that ran a :class:`GuestJob` reported."""

    rc: int
    results: list[Result]
    console: str
    boot_id: str
    booted_seconds: float  # QEMU start to VMTEST-BOOTED (multi-user reached)
    seconds: float  # QEMU start to the end of the boot (QEMU exited, or the job done)

    def result(self, name: str) -> Result:
        """The (last) result called ``name``; MachineError if the guest never reported it."""
        found = [r for r in self.results if r.name == name]
        if not found:
            msg = f"no VMTEST-RESULT {name} in:\n" + _tail(self.console)
            raise MachineError(msg)
        return found[-1]


def _die_with_parent(argv: list[str]) -> list[str]:
    """Have QEMU SIGKILLed if the test process dies without cleaning up (setpriv execs it)."""
    if shutil.which("setpriv") is None:
        return argv
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def _tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _connect(path: Path, timeout: float) -> socket.socket:
    """Connect to the unix socket QEMU listens on at ``path``, retrying until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return sock


class PersonPort:
    """Host end of the guest's ``org.keyhandoff.person`` virtio-serial port (a unix socket)."""

    def __init__(self, path: Path, *, connect_timeout: float = 10.0) -> None:
        """Connect to QEMU's socket at ``path`` (QEMU listens; retried until the timeout)."""
        self._buffer = bytearray()
        self._sock = _connect(path, connect_timeout)

    def send(self, data: bytes) -> None:
        """Write ``data`` to the guest's port."""
        self._sock.sendall(data)

    def read_until(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Read until ``pattern`` matches what arrived; consumes through the match's end."""
        regex = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        while True:
            # Search a bytes copy: a match on the bytearray would change when we consume it.
            match = regex.search(bytes(self._buffer))
            if match is not None:
                del self._buffer[: match.end()]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Only the count: the demo's person port carries test passphrases.
                msg = (
                    f"person port: no {regex.pattern!r} within {timeout:.0f}s "
                    f"({len(self._buffer)} unmatched bytes received)"
                )
                raise MachineError(msg)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                msg = f"person port closed while waiting for {regex.pattern!r}"
                raise MachineError(msg)
            self._buffer += chunk

    def readline(self, timeout: float) -> bytes:
        """One line from the guest, without its newline."""
        return self.read_until(re.compile(rb"([^\n]*)\n"), timeout).group(1)

    def close(self) -> None:
        """Close the connection (the guest sees the host side go away)."""
        self._sock.close()


class ConsolePort:
    """Host end of the serial console when it takes input: QEMU's socket chardev.

    What the guest writes reaches ``serial-<n>.log`` through the chardev's ``logfile``; this
    end only reads it away (a full socket would stall the guest's serial port) and types.
    """

    def __init__(self, path: Path, *, connect_timeout: float = 10.0) -> None:
        """Connect (QEMU waits for us before it starts the guest) and start draining."""
        self._sock = _connect(path, connect_timeout)
        self._drain = threading.Thread(target=self._read_away, daemon=True)
        self._drain.start()

    def _read_away(self) -> None:
        with contextlib.suppress(OSError):
            while self._sock.recv(65536):
                pass

    def send(self, data: bytes) -> None:
        """Write ``data`` to the guest's ttyS0."""
        self._sock.sendall(data)

    def close(self) -> None:
        """Close the connection; the drain thread ends with it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._drain.join(timeout=5)


_Port = TypeVar("_Port", "ConsolePort", "PersonPort")


class Machine:
    """A UEFI VM under QEMU TCG with OVMF, booting the Debian kernel and a run image directly.

    ``workdir`` holds everything of this machine: ``OVMF_VARS.fd`` (see :attr:`vars_file`),
    ``serial-<n>.log`` per boot, ``qemu-<n>.log``, the job disk and the person socket.
    """

    def __init__(
        self,
        image: RunImage,
        workdir: Path,
        *,
        disks: tuple[Disk, ...] = (),
        append: str = "",
        no_reboot: bool = True,
        memory_mb: int = 2048,
        cpus: int = 2,
        vars_file: Path | None = None,
        person_port: bool = True,
        console_input: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Prepare (not start) a machine; copies OVMF_VARS_4M.fd unless ``vars_file`` is given."""
        self.image = image
        self.workdir = workdir
        self.disks = disks
        self.append = append
        self.no_reboot = no_reboot
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.person_port_enabled = person_port
        #: the serial console also takes input (:meth:`type_on_console`): a socket chardev
        #: QEMU waits on until the harness connects, logging to the same ``serial-<n>.log``
        self.console_input = console_input
        #: more QEMU arguments (e.g. ``("-rtc", "base=...")`` to boot with the clock moved)
        self.extra_args = extra_args
        workdir.mkdir(parents=True, exist_ok=True)
        if vars_file is None:
            vars_file = workdir / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_file)
        self.vars_file = vars_file
        # The run image stays pristine: each machine writes to its own copy-on-write overlay,
        # which persists across this machine's boots like a real disk.
        self.root_disk = workdir / "root.qcow2"
        if not self.root_disk.exists():
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    str(image.root_image),
                    str(self.root_disk),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
        self.boots = 0
        self.job_image: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._person: PersonPort | None = None
        self._console: ConsolePort | None = None
        self._cursor = 0
        self._started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def serial_log(self) -> Path:
        """The current (last started) boot's serial console log."""
        return self.workdir / f"serial-{self.boots}.log"

    @property
    def person_socket(self) -> Path:
        """The unix socket QEMU listens on for the person port."""
        return self.workdir / "person.sock"

    @property
    def console_socket(self) -> Path:
        """The unix socket QEMU listens on for the serial console (``console_input``)."""
        return self.workdir / "console.sock"

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def qemu_argv(self) -> list[str]:
        """The QEMU command line of the next boot."""
        words = f"{self.image.append} {self.append}".strip()
        cmdline = f"console=ttyS0,115200 loglevel=4 panic=-1 systemd.firstboot=off {words}".strip()
        if self.console_input:
            # QEMU waits (wait=on) until the harness is connected, so no output is lost; the
            # logfile gets everything the guest writes, as the file chardev does.
            serial = (f"socket,id=serial0,path={self.console_socket},server=on,wait=on,"
                      f"logfile={self.serial_log}")
        else:
            serial = f"file,id=serial0,path={self.serial_log}"
        argv = [
            QEMU,
            "-machine", "q35",
            # One host thread runs both vCPUs.  With QEMU 7.2's multi-threaded TCG the guest
            # kernel's live text patching (static keys flipped after SMP bring-up, e.g.
            # "sched_clock: Marking stable") sometimes left the other vCPU running the old
            # translation with the temporary int3 in it: "Oops: int3" in sched_clock_cpu on
            # CPU 1, kernel panic, about one boot in 200 (CI stop 18, and once here).
            # Round-robin TCG runs a vCPU only after the other's write has invalidated its
            # translations, so the race cannot happen; it costs about 1.5x boot time.
            "-accel", "tcg,thread=single",
            "-m", str(self.memory_mb),
            "-smp", str(self.cpus),
            "-display", "none",
            "-vga", "none",
            "-monitor", "none",
            "-parallel", "none",
            "-nic", "none",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars_file}",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", cmdline,
            "-chardev", serial,
            "-serial", "chardev:serial0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        disks = [Disk(self.root_disk, ROOT_SERIAL, fmt="qcow2")]
        if self.job_image is not None:
            disks.append(Disk(self.job_image, JOB_SERIAL))
        disks += self.disks
        for index, disk in enumerate(disks):
            ro = ",readonly=on" if disk.readonly else ""
            argv += [
                "-drive", f"if=none,id=disk{index},format={disk.fmt},file={disk.path}{ro}",
                "-device", f"virtio-blk-pci,drive=disk{index},serial={disk.serial}",
            ]  # fmt: skip
        if self.person_port_enabled:
            argv += [
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=person,path={self.person_socket},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=person,name={PERSON_PORT}",
            ]  # fmt: skip
        if self.no_reboot:
            argv.append("-no-reboot")
        argv += self.extra_args
        return argv

    def start(self, job: GuestJob | None = None) -> None:
        """Power on (again, on the same vars file and disks); ``job`` runs after multi-user."""
        if self.pid is not None:
            msg = "machine is already running"
            raise MachineError(msg)
        self._close_person()
        self.boots += 1
        if job is not None:
            self.job_image = build_job_disk(job, self.workdir)
        else:
            self.job_image = None
        self.person_socket.unlink(missing_ok=True)
        self.console_socket.unlink(missing_ok=True)
        self.serial_log.write_bytes(b"")
        self._cursor = 0
        with (self.workdir / f"qemu-{self.boots}.log").open("wb") as qemu_log:
            self._proc = subprocess.Popen(
                _die_with_parent(self.qemu_argv()),
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        # the console first: QEMU waits for it before it opens the person port's socket
        if self.console_input:
            self._console = self._connected(ConsolePort, self.console_socket, "serial console")
        if self.person_port_enabled:
            self._person = self._connected(PersonPort, self.person_socket, "person port")

    def _connected(self, port: type[_Port], path: Path, what: str) -> _Port:
        try:
            return port(path)
        except OSError as exc:
            self.kill()
            msg = f"cannot connect to the {what}: {exc}\n{self._qemu_log_tail()}"
            raise MachineError(msg) from exc

    def kill(self) -> None:
        """Stop QEMU now (SIGKILL by pid) if it still runs; safe to call any time."""
        self._close_person()
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def __enter__(self) -> Self:
        """Use as a context manager: QEMU is killed on exit, whatever happened."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Kill QEMU if it still runs."""
        self.kill()

    def _close_person(self) -> None:
        if self._person is not None:
            self._person.close()
            self._person = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def type_on_console(self, data: bytes) -> None:
        """Type ``data`` on the serial console, as a person at the keyboard would."""
        if self._console is None:
            msg = "no console input (machine not running or console_input=False)"
            raise MachineError(msg)
        self._console.send(data)

    # -- observing -------------------------------------------------------------------------

    def console(self) -> str:
        """The current boot's serial console so far."""
        try:
            return self.serial_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _qemu_log_tail(self) -> str:
        path = self.workdir / f"qemu-{self.boots}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "qemu: " + _tail(text, 10) if text else ""

    def _fail(self, what: str) -> MachineError:
        detail = _tail(self.console())
        qemu = self._qemu_log_tail()
        header = f"--- last {CONSOLE_TAIL_LINES} console lines ({self.serial_log}) ---"
        msg = f"{what}\n{header}\n{detail}\n{qemu}"
        return MachineError(msg)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the console shows ``pattern`` after the previous match; return the match.

        Raises MachineError (with the console's last lines) on timeout or if QEMU exits first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            match = regex.search(text, self._cursor)
            if match is not None:
                self._cursor = match.end()
                return match
            proc = self._proc
            if proc is None or proc.poll() is not None:
                # One last look: the final lines may have landed just before QEMU exited.
                match = regex.search(self.console(), self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                rc = None if proc is None else proc.returncode
                raise self._fail(
                    f"QEMU exited (rc={rc}) before the console showed {regex.pattern!r}"
                )
            if time.monotonic() > deadline:
                raise self._fail(f"console did not show {regex.pattern!r} within {timeout:.0f}s")
            time.sleep(0.2)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for QEMU to exit (guest poweroff, or reboot with ``no_reboot``); its exit code."""
        proc = self._proc
        if proc is None:
            msg = "machine was never started"
            raise MachineError(msg)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail(f"QEMU did not exit within {timeout:.0f}s") from None
        self._close_person()
        return rc

    def person(self) -> PersonPort:
        """The connected host end of the person port of the current boot."""
        if self._person is None:
            msg = "no person port (machine not running or person_port=False)"
            raise MachineError(msg)
        return self._person

    def results(self) -> list[Result]:
        """The ``VMTEST-RESULT`` lines of the current boot so far."""
        return parse_results(self.console())

    def job_file(self, name: str) -> bytes | None:
        """A file the last boot's job wrote to ``$VMTEST_OUT`` (read after the guest stopped)."""
        if self.job_image is None or self.pid is not None:
            return None
        return read_job_file(self.job_image, name)

    # -- one call per boot -----------------------------------------------------------------

    def boot_and_run(
        self,
        job: GuestJob,
        *,
        boot_timeout: float = BOOT_TIMEOUT,
        exit_timeout: float = EXIT_TIMEOUT,
    ) -> JobOutcome:
        """Start, wait for the job to finish, wait for QEMU to exit; kill it on any failure.

        The job's ``action`` must end QEMU (``poweroff``, or ``reboot`` with ``no_reboot``).
        """
        try:
            self.start(job)
            booted = self.wait_for(BOOTED_RE, boot_timeout)
            booted_seconds = self.seconds_since_start()
            done = self.wait_for(DONE_RE, job.timeout + 30)
            if job.action != "none":
                self.wait_exit(exit_timeout)
        except BaseException:
            self.kill()
            raise
        console = self.console()
        return JobOutcome(
            rc=int(done.group(1)),
            results=parse_results(console),
            console=console,
            boot_id=booted.group(1),
            booted_seconds=booted_seconds,
            seconds=time.monotonic() - self._started_at,
        )

    def seconds_since_start(self) -> float:
        """Seconds since the current boot's QEMU started."""
        return time.monotonic() - self._started_at
