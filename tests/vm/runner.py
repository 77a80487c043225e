"""Host side of the guest test runner: job disks in, ``VMTEST-*`` console lines out.

A job is a script (any executable text: ``#!/bin/sh`` or ``#!/usr/bin/python3``) plus optional
files, put on a small ext4 disk (virtio serial ``vmtest-job``). In the guest,
``vmtest.service`` starts after ``multi-user.target``, prints
``VMTEST-BOOTED <boot_id>``, mounts the disk at ``$VMTEST_JOB`` (``/run/vmtest/job``), runs
``run`` with a time limit, and prints ``VMTEST-DONE rc=<rc> action=<action>``, then powers off,
reboots or stays up as asked. The script reports with ``vmtest-result NAME PASS|FAIL detail...``
(a guest command) or by printing such a line to ``/dev/ttyS0`` itself; files it writes to
``$VMTEST_OUT`` can be read back with :func:`read_job_file` after the guest stopped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pathlib import Path

JOB_SERIAL = "vmtest-job"
JOB_DISK_BYTES = 16 << 20

Action = Literal["poweroff", "reboot", "none"]

RESULT_RE = re.compile(r"^VMTEST-RESULT (\S+) (PASS|FAIL) ?(.*?)\r?$", re.MULTILINE)
DONE_RE = re.compile(r"VMTEST-DONE rc=(\d+) action=(\S+)")
BOOTED_RE = re.compile(r"VMTEST-BOOTED ([0-9a-f-]{36})")


@dataclass(frozen=True)
class GuestJob:
    """What the guest runs in one boot.

    ``script`` becomes the executable ``run`` (give it a shebang); ``files`` are extra files next
    to it (relative path -> bytes, mode 0644, or (bytes, mode)); ``action`` is what the guest does
    afterwards; ``timeout`` bounds the script inside the guest (seconds).
    """

    script: str
    files: dict[str, bytes | tuple[bytes, int]] = field(default_factory=dict)
    action: Action = "poweroff"
    timeout: int = 120

    @classmethod
    def shell(cls, body: str, **kwargs: object) -> GuestJob:
        """A ``/bin/sh -e`` job."""
        return cls(script="#!/bin/sh\nset -e\n" + body, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def python(cls, body: str, **kwargs: object) -> GuestJob:
        """A job run by the guest's ``/usr/bin/python3``."""
        return cls(script="#!/usr/bin/python3\n" + body, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Result:
    """One ``VMTEST-RESULT`` line."""

    name: str
    passed: bool
    detail: str


def parse_results(console: str) -> list[Result]:
    """All ``VMTEST-RESULT`` lines of a console log, in order."""
    return [
        Result(m.group(1), m.group(2) == "PASS", m.group(3).strip())
        for m in RESULT_RE.finditer(console)
    ]


def _disk_bytes(tree: Path) -> int:
    """JOB_DISK_BYTES, or room for what a big job carries (a kernel and its initramfs)."""
    carried = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    return max(JOB_DISK_BYTES, (carried + carried // 4 + JOB_DISK_BYTES) >> 20 << 20)


def build_job_disk(job: GuestJob, workdir: Path) -> Path:
    """Write ``job`` into ``workdir/job/`` and pack it as ``workdir/job.img`` (ext4)."""
    tree = workdir / "job"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    run = tree / "run"
    run.write_text(job.script)
    run.chmod(0o755)
    (tree / "action").write_text(job.action + "\n")
    (tree / "timeout").write_text(f"{job.timeout}\n")
    for rel, content in job.files.items():
        data, mode = content if isinstance(content, tuple) else (content, 0o644)
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    (tree / "out").mkdir()
    image = workdir / "job.img"
    image.unlink(missing_ok=True)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "vmtest-job",
            "-d",
            str(tree),
            str(image),
            f"{_disk_bytes(tree) >> 20}M",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return image


def read_job_file(image: Path, name: str) -> bytes | None:
    """A file the guest wrote to ``$VMTEST_OUT`` (``out/<name>`` on the job disk), via debugfs."""
    done = subprocess.run(
        ["debugfs", "-R", f"cat /out/{name}", str(image)],
        check=False,
        capture_output=True,
        timeout=60,
    )
    if done.returncode != 0 or b"File not found" in done.stderr:
        return None
    return done.stdout
