"""Real-firmware facts keyhandoff relies on, shown on OVMF with plain efivarfs writes.

Nothing here imports keyhandoff in the guest: these tests pin down what the firmware and kernel do,
so a keyhandoff failure in the VM can be told apart from a harness or firmware surprise.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import pytest

from .runner import GuestJob

if TYPE_CHECKING:
    from collections.abc import Callable

    from .image import RunImage
    from .machine import Machine

log = logging.getLogger("keyhandoff.vmtest")

pytestmark = pytest.mark.vm

GUID = "7ec2927b-59f1-4933-8945-01041e7137eb"
EFIVARS = "/sys/firmware/efi/efivars"

# Shared by the guest jobs: report lines, and the efivarfs rules from PROTOCOLS.md section 4
# (attributes and data in one write; new variables are immutable until FS_IOC_SETFLAGS clears it).
GUEST_PRELUDE = f"""
import errno, fcntl, os, struct, sys
GUID = "{GUID}"
EFIVARS = "{EFIVARS}"

def report(name, ok, detail=""):
    line = "VMTEST-RESULT %s %s %s" % (name, "PASS" if ok else "FAIL", detail)
    with open("/dev/ttyS0", "w") as tty:
        tty.write("\\n" + line + "\\n")

def var_path(name):
    return "%s/%s-%s" % (EFIVARS, name, GUID)

def write_var(name, attrs, data):
    fd = os.open(var_path(name), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, struct.pack("<I", attrs) + data)
    finally:
        os.close(fd)

def read_var(name):
    with open(var_path(name), "rb") as f:
        raw = f.read()
    return struct.unpack("<I", raw[:4])[0], raw[4:]

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10

def delete_var(name):
    fd = os.open(var_path(name), os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~FS_IMMUTABLE_FL))
    finally:
        os.close(fd)
    os.unlink(var_path(name))
"""


def test_boots_to_multi_user(vm_machine: Callable[..., Machine]) -> None:
    machine = vm_machine()
    job = GuestJob.shell(
        """
state=$(systemctl is-active multi-user.target || true)
if [ "$state" = active ]; then r=PASS; else r=FAIL; fi
vmtest-result multi-user $r "$state"
if [ -d /sys/firmware/efi/efivars ]; then r=PASS; else r=FAIL; fi
vmtest-result efivarfs $r
# udev makes the port's link on its own time: multi-user.target is not ordered after it
if udevadm wait --timeout=30 /dev/virtio-ports/org.keyhandoff.person; then r=PASS; else r=FAIL; fi
vmtest-result person-port $r "$(ls /dev/virtio-ports 2>&1)"
systemd=$(systemctl --version | sed -n '1s/^systemd \\([0-9]*\\).*/\\1/p')
python=$(python3 -c 'import sys; print(sys.version.split()[0])')
cryptsetup=$(cryptsetup --version | cut -d' ' -f2)
kernel=$(uname -r)
vmtest-result versions PASS "systemd=$systemd python=$python cryptsetup=$cryptsetup kernel=$kernel"
"""
    )
    outcome = machine.boot_and_run(job)
    log.info(
        "boot to multi-user %.1fs, to poweroff %.1fs; %s",
        outcome.booted_seconds,
        outcome.seconds,
        outcome.result("versions").detail,
    )
    assert outcome.rc == 0
    for name in ("multi-user", "efivarfs", "person-port", "versions"):
        assert outcome.result(name).passed, outcome.result(name)
    assert "systemd=257" in outcome.result("versions").detail
    assert "python=3.13" in outcome.result("versions").detail


def test_person_port_round_trip(vm_machine: Callable[..., Machine]) -> None:
    """The host object and the guest's /dev/virtio-ports/org.keyhandoff.person talk both ways."""
    machine = vm_machine()
    job = GuestJob.shell(
        """
port=/dev/virtio-ports/org.keyhandoff.person
exec 3<>"$port"
printf 'question?\\n' >&3
read -r answer <&3
if [ "$answer" = "answer!" ]; then r=PASS; else r=FAIL; fi
vmtest-result person-port $r "got $answer"
""",
        timeout=60,
    )
    with machine:
        machine.start(job)
        port = machine.person()
        assert port.readline(timeout=120) == b"question?"
        port.send(b"answer!\n")
        machine.wait_for(r"VMTEST-DONE rc=0", timeout=60)
        machine.wait_exit()
    assert machine.results()[-1].passed, machine.results()


def test_project_installed_in_guest(vm_image: RunImage, vm_machine: Callable[..., Machine]) -> None:
    assert vm_image.project_installed, vm_image.project_report
    machine = vm_machine()
    job = GuestJob.shell(
        """
if out=$(python3 -c 'import keyhandoff, sys; print(keyhandoff.__file__)' 2>&1); then
    vmtest-result import-keyhandoff PASS "$out"
else
    vmtest-result import-keyhandoff FAIL "$(echo "$out" | tail -1)"
fi
"""
    )
    outcome = machine.boot_and_run(job)
    assert outcome.result("import-keyhandoff").passed, outcome.result("import-keyhandoff")


def test_efi_variable_semantics_across_boots(vm_machine: Callable[..., Machine]) -> None:
    """Volatile refused at runtime; NV survives a relaunch on the same vars file; delete works."""
    machine = vm_machine()
    marker = f"keyhandoff-nv-probe-{secrets.token_hex(8)}".encode()

    boot1 = machine.boot_and_run(
        GuestJob.python(
            GUEST_PRELUDE
            + f"""
marker = {marker!r}
try:
    write_var("KeyHandoffVolatileProbe", 0x6, b"volatile")
except OSError as exc:
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    report("volatile-refused", exc.errno == errno.EINVAL, name)
else:
    report("volatile-refused", False, "created")
write_var("KeyHandoffNvProbe", 0x7, marker)
attrs, data = read_var("KeyHandoffNvProbe")
report("nv-written", attrs == 0x7 and data == marker, "attrs=0x%x len=%d" % (attrs, len(data)))
""",
            action="reboot",
        )
    )
    assert boot1.rc == 0
    assert boot1.result("volatile-refused").passed, boot1.result("volatile-refused")
    assert boot1.result("nv-written").passed, boot1.result("nv-written")
    assert marker in machine.vars_file.read_bytes(), (
        "the NV variable's bytes are not in the vars file"
    )

    boot2 = machine.boot_and_run(
        GuestJob.python(
            GUEST_PRELUDE
            + f"""
marker = {marker!r}
try:
    attrs, data = read_var("KeyHandoffNvProbe")
except OSError as exc:
    report("nv-survived", False, str(exc))
else:
    report("nv-survived", attrs == 0x7 and data == marker, "attrs=0x%x" % attrs)
    mode = os.stat(var_path("KeyHandoffNvProbe")).st_mode & 0o777
    report("nv-mode-after-reboot", True, "0%o" % mode)
    delete_var("KeyHandoffNvProbe")
    report("nv-deleted", not os.path.exists(var_path("KeyHandoffNvProbe")))
""",
            action="reboot",
        )
    )
    assert boot2.boot_id != boot1.boot_id
    assert boot2.result("nv-survived").passed, boot2.result("nv-survived")
    assert boot2.result("nv-deleted").passed
    mode_after_reboot = boot2.result("nv-mode-after-reboot").detail
    remains_after_delete = marker in machine.vars_file.read_bytes()

    boot3 = machine.boot_and_run(
        GuestJob.python(
            GUEST_PRELUDE
            + """
report("nv-gone", not os.path.exists(var_path("KeyHandoffNvProbe")))
"""
        )
    )
    assert boot3.result("nv-gone").passed
    remains_after_boot3 = marker in machine.vars_file.read_bytes()
    # Observations, not assertions: what OVMF does with a deleted variable's bytes.
    log.info(
        "efi: mode after reboot %s; deleted variable's bytes in the vars file: after delete=%s, "
        "after another boot=%s; multi-user after %.1f / %.1f / %.1f s, "
        "boots took %.1f / %.1f / %.1f s",
        mode_after_reboot,
        remains_after_delete,
        remains_after_boot3,
        boot1.booted_seconds,
        boot2.booted_seconds,
        boot3.booted_seconds,
        boot1.seconds,
        boot2.seconds,
        boot3.seconds,
    )
