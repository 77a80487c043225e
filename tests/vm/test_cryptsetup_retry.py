"""systemd-cryptsetup's retries and the agent's AcceptCached rule, where device-mapper exists.

systemd-cryptsetup asks again only after libcryptsetup refused a passphrase while
activating, and activating needs device-mapper, which the test host's kernel lacks.  One
boot of the guest (Debian 13: systemd 257, its systemd-cryptsetup, dm-crypt) runs
``guest/cryptsetup_retry.py`` as root and reports each fact; the two tests read its
report.  The tests/integration tests these replace said why they could not run on the host.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .image import REPO_ROOT
from .machine import JobOutcome, Machine
from .runner import GuestJob

if TYPE_CHECKING:
    from .image import RunImage

sys.path.insert(0, str(REPO_ROOT / "tests"))
from passphrases import MARKER

log = logging.getLogger("keyhandoff.vmtest")

# The two tests share one boot (the module's retry_boot), so they ask to run on one xdist
# worker.  pytest-xdist 3.8 with pytest 9.2 ignores that (see tests/vm/README.md): each worker
# that gets one of them boots once, which is correct, only one boot slower.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("cryptsetup-retry")]

GUEST_SCRIPT = Path(__file__).parent / "guest" / "cryptsetup_retry.py"
JOB_TIMEOUT = 300  # the guest's own bounds are 60 s per event; TCG


@dataclass(frozen=True)
class RetryBoot:
    """The boot's report, and the job's own output (run.log on the job disk)."""

    outcome: JobOutcome
    run_log: bytes


@pytest.fixture(scope="module")
def retry_boot(vm_image: RunImage, tmp_path_factory: pytest.TempPathFactory) -> RetryBoot:
    """One boot running the guest job; both tests read its report."""
    machine = Machine(vm_image, tmp_path_factory.mktemp("cryptsetup-retry"))
    job = GuestJob(script=GUEST_SCRIPT.read_text(), timeout=JOB_TIMEOUT)
    try:
        outcome = machine.boot_and_run(job)
    finally:
        machine.kill()
    # the job's stdout (systemd-cryptsetup's stderr, the agent's log) is on the job disk
    run_log = machine.job_file("run.log") or b""
    log.info(
        "cryptsetup-retry: multi-user after %.1f s, boot with job %.1f s; %s",
        outcome.booted_seconds,
        outcome.seconds,
        ", ".join(f"{r.name} {'ok' if r.passed else 'FAILED'}" for r in outcome.results),
    )
    for result in outcome.results:
        log.info("  %s: %s", result.name, result.detail)
    if MARKER in run_log:
        log.info("  run.log: holds a test passphrase, not shown")
    else:
        for line in run_log.decode(errors="replace").splitlines():
            log.info("  run.log: %s", line)
    return RetryBoot(outcome, run_log)


def _assert_part(boot: RetryBoot, part: str, prefix: str, *names: str) -> None:
    """Every fact of one guest part passed, and nothing of the boot leaked a passphrase."""
    outcome = boot.outcome
    failed = [
        r
        for r in outcome.results
        if not r.passed and (r.name in {part, "kernel-parts"} or r.name.startswith(prefix))
    ]
    assert not failed, failed  # an abort is reported under the part's name
    # result() fails on a fact the guest never reported: a part that stopped early
    for name in ("kernel-parts", *names):
        assert outcome.result(name).passed, outcome.result(name)
    leaks = [r for r in outcome.results if r.name.startswith("no-leak")]
    assert all(r.passed for r in leaks), leaks
    assert outcome.result("no-leak").passed
    assert MARKER.decode() not in outcome.console, "a test passphrase is on the serial console"
    assert boot.run_log, "the job wrote no run.log"
    assert MARKER not in boot.run_log, "a test passphrase is in the job's output"


def test_systemd_cryptsetup_retries_do_not_accept_cached(retry_boot: RetryBoot) -> None:
    # The real systemd-cryptsetup 257 on a LUKS2 image file: first ask file AcceptCached=1;
    # after a wrong reply (keyhandoff.askpass's send_reply) its retry comes from the same PID
    # with AcceptCached=0 and the same Id; the retry is then cancelled.
    _assert_part(
        retry_boot,
        "part_retries_do_not_accept_cached",
        "cs-",
        "cs-first-accepts-cached",
        "cs-retry-same-pid",
        "cs-retry-no-accept-cached",
        "cs-retry-same-id",
        "cs-retry-cancelled",
    )
    assert retry_boot.outcome.result("cs-first-accepts-cached").detail.startswith("AcceptCached=1")
    assert retry_boot.outcome.result("cs-retry-no-accept-cached").detail == "AcceptCached=0"


def test_retry_after_our_wrong_answer_is_not_answered(retry_boot: RetryBoot) -> None:
    # Finding 10, the rule kept: keyhandoff's agent holding a wrong cached passphrase answers
    # systemd-cryptsetup's first prompt once; its retry (same PID, AcceptCached=0) is never
    # answered, and the entry is dropped once the check in the verifier child says it does
    # not open the volume (RETRY before DROPPED); the retry is then cancelled.
    _assert_part(
        retry_boot,
        "part_agent_answers_once",
        "agent-",
        "systemd-cache-empty",
        "agent-answered-first",
        "agent-retry-no-accept-cached",
        "agent-retry-before-dropped",
        "agent-entry-dropped",
        "agent-retry-cancelled",
        "agent-answered-once",
    )
    assert retry_boot.outcome.result("agent-answered-once").detail.startswith("1 ANSWERED line(s)")
    assert retry_boot.outcome.rc == 0  # the job's own verdict: every part ran to its end
