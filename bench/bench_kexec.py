"""The kexec channel's store step: the sealed memfd initrd, against a plain copy of the initrd.

``kexec.combined_initrd()`` copies the distribution's initrd into a memfd (sendfile), pads
it to a multiple of 4, appends keyhandoff's archive (a 0700 directory and the 0400 record)
and seals the memfd.  The reference is what any kexec loader pays to hand the kernel the
same initrd: its bytes copied into a memfd (the same sendfile loop, no archive, no seals).
The initrd here is random bytes of a Debian dracut image's size (36 MiB, the VM's
``initrd.img`` was 35.8 MB): the kernel is not asked to load it (this host has no kexec).
Target: ours <= 1.1x the copy; the archive adds a few hundred bytes.

Usage: .venv/bin/python bench/bench_kexec.py [runs]   (no root, no kexec needed)
"""

from __future__ import annotations

import os
import resource
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from keyhandoff import kexec, names
from keyhandoff.newc import Archive

if TYPE_CHECKING:
    from collections.abc import Callable

INITRD_BYTES = 36 << 20
RECORD = bytes(127)  # a one-volume record: header 59, entries 52, tag 16
ENTRIES = {names.KEXEC_SEGMENT_RECORD.rsplit("/", 1)[0]: (stat.S_IFDIR | 0o700, b""),
           names.KEXEC_SEGMENT_RECORD: (0o400, RECORD)}


def plain_copy(path: Path) -> int:
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.memfd_create("reference-initrd", os.MFD_CLOEXEC)
        size = os.fstat(src).st_size
        offset = 0
        while offset < size:
            offset += os.sendfile(fd, src, offset, size - offset)
        return fd
    finally:
        os.close(src)


def one(fn: Callable[[Path], int], path: Path, times: list[float]) -> int:
    start = time.perf_counter()
    fd = fn(path)
    times.append(time.perf_counter() - start)
    size = os.fstat(fd).st_size
    os.close(fd)
    return size


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "initrd.img"
        initrd.write_bytes(os.urandom(INITRD_BYTES))
        warm: list[float] = []
        for _ in range(2):  # the page cache warm for both
            one(plain_copy, initrd, warm)
        reference: list[float] = []
        ours: list[float] = []
        ref_size = our_size = 0
        for _ in range(runs):  # interleaved, so neither gets the quieter half of the run
            ref_size = one(plain_copy, initrd, reference)
            our_size = one(lambda p: kexec.combined_initrd(p, ENTRIES), initrd, ours)
    archive = len(Archive(ENTRIES).to_bytes())
    print(f"runs: {runs}; initrd {INITRD_BYTES:,} bytes (random), record {len(RECORD)} bytes")
    for label, times in (("plain copy into a memfd (reference)", reference),
                         ("combined_initrd (copy, pad, archive, seal)", ours)):
        print(f"{label:<45} p50 {pct(times, 50) * 1000:7.1f} ms  "
              f"p95 {pct(times, 95) * 1000:7.1f} ms")
    ratio = statistics.median(ours) / statistics.median(reference)
    print(f"ratio ours / reference (p50): {ratio:.2f}x (target <= 1.1x)")
    print(f"loaded initrd: {our_size:,} bytes = {ref_size:,} + padding "
          f"{our_size - ref_size - archive} + keyhandoff's archive {archive}")
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss:,} KiB "
          "(the 36 MiB of random bytes written once; the memfds' pages are shmem, not RSS)")


if __name__ == "__main__":
    main()
