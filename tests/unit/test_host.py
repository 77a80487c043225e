"""keyhandoff.host: what the manager's job list says is coming, and whose kexec image is loaded.

The job list's text is what ``systemctl list-jobs --no-legend`` prints (systemd 257 in the
VM: its ``auto-soft-reboot`` scenario reads the real one at a soft reboot).
"""

from __future__ import annotations

import pytest

from keyhandoff.host import SHUTDOWN_TARGETS, Host, coming_from_jobs
from keyhandoff.schedule import _COMING_WORDS

SOFT_REBOOT_JOBS = """\
1462 soft-reboot.target                  start waiting
1466 systemd-soft-reboot.service         start waiting
1501 keyhandoff-schedule-shutdown.service stop  running
1470 shutdown.target                     start waiting
"""


@pytest.mark.parametrize(("target", "coming"), sorted(SHUTDOWN_TARGETS.items()))
def test_each_shutdown_target_names_what_is_coming(target, coming):
    text = SOFT_REBOOT_JOBS.replace("soft-reboot.target", target)
    assert coming_from_jobs(text) == coming


def test_no_shutdown_queued_is_none():
    assert coming_from_jobs("") is None
    assert coming_from_jobs("17 apt-daily.service start running\n") is None


def test_a_stop_job_of_a_target_is_not_a_shutdown():
    assert coming_from_jobs("99 reboot.target stop waiting\n") is None


def test_the_host_asks_its_callable(tmp_path):
    host = Host(coming_shutdown=lambda: "kexec", root=str(tmp_path),
                kexec_mark_path=str(tmp_path / "mark"))
    assert host.shutdown_coming() == "kexec"
    assert host.kexec_loaded_by_others() is False          # no kexec at all under this root
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/kexec_loaded").write_text("1\n")
    assert host.kexec_loaded_by_others() is True           # loaded, and no mark of ours
    assert host.kexec_image_ours() is False
    (tmp_path / "mark").write_text("boot\n")
    assert host.kexec_image_ours() is True
    assert host.kexec_loaded_by_others() is False          # ours
    (tmp_path / "sys/kernel/kexec_loaded").write_text("0\n")
    (tmp_path / "mark").unlink()
    assert host.kexec_loaded_by_others() is False          # nothing loaded


def test_every_shutdown_the_job_list_names_has_words_in_the_report():
    assert set(_COMING_WORDS) == set(SHUTDOWN_TARGETS.values())
