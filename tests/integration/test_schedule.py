"""Automatic arming (keyhandoff.schedule) with the real kernel keyring, real LUKS2 image
files and the efi channel on a scratch efivarfs directory.

The machine is a scratch root: ``/system-update`` is a link under the test's own directory
(``Host(root=...)``), crypttab names the image file, the boot id is a file (a "reboot" is a
new id and an emptied cache, as in tests/integration/test_update.py).  libefivar picks its
backend at load time, so each story runs in a fresh interpreter.
"""

from __future__ import annotations

import pytest
from support.luks_images import format_image, metadata, opens
from support.passphrases import make
from support.scratch_efi import run_in_scratch_efivars

from keyhandoff import schedule
from keyhandoff.config import Config
from keyhandoff.host import Host

#: the ``cache`` fixture (tests/conftest.py) disarms after each test here
pytestmark = pytest.mark.arms

PRELUDE = """
import json, os, sys, uuid
from datetime import timedelta
from keyhandoff import efi, schedule, statelock, update
from keyhandoff.cache import PassphraseCache
from keyhandoff.chain import load
from keyhandoff.config import Config
from keyhandoff.host import Host
from keyhandoff.secret import Secret

img, pw_file, state, story = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
statelock.LOCK_DIR = os.path.join(state, "run")       # the test's own state lock
root = os.path.join(state, "root")                    # the scratch machine
os.makedirs(os.path.join(root, "etc"), exist_ok=True)
with open(os.path.join(root, "etc", "crypttab"), "w") as f:
    f.write(f"data {img} none luks\\n")
boot_file = os.path.join(state, "boot_id")
in_update_target = [False]
coming = [None]                                       # the shutdown queued: none yet
host = Host(boot_id_path=boot_file, crypttab_path=os.path.join(root, "etc", "crypttab"),
            root=root, update_target_active=lambda: in_update_target[0],
            coming_shutdown=lambda: coming[0],
            kexec_mark_path=os.path.join(state, "run", "kexec-loaded"))
cache = PassphraseCache()
link = os.path.join(root, "system-update")
out = {}

def reboot():
    cache.forget_all()          # RAM is gone, and our keyring with it
    with open(boot_file, "w") as f:
        f.write(str(uuid.uuid4()))

def capture(timeout=120):
    with open(pw_file, "rb") as f:
        cache.put(update.targets(host=host)[0].uuid, Secret.passphrase(f.read()),
                  timeout=timeout)

def schedule_update():
    os.symlink("/var/cache/PackageKit", link)  # the target need not exist here

def onetime_slots():
    from keyhandoff import onetime
    from keyhandoff.luks import LuksHeader
    with LuksHeader.open(img) as h:
        return [s.keyslot for s in onetime.slots(h)]

def chain_now():
    c = load(cache)
    if c is None:
        return None
    return {"reboot": c.reboot, "boots_left": c.boots_left, "auto": c.auto_boot == boot(),
            "auto_boot": bool(c.auto_boot), "ttl": c.not_after - host.now(),
            "login": c.login}

def boot():
    return host.boot_id()

def snapshot():                 # what is armed, cached and written after a step
    out["chain"] = chain_now()
    out["cached_after"] = len(cache.entries())
    out["slots"] = onetime_slots()
    out["record"] = efi.RECORD_VARIABLE.exists()

def reconcile(**conf):
    r = schedule.reconcile(host=host, config=Config(**conf))
    return r.as_dict()

reboot()
"""

STORIES = {
    "armed": """
capture()
schedule_update()
out["report"] = reconcile(wait_for_update=7200)
out["chain"] = chain_now()
out["cached_after"] = [e.volume for e in cache.entries()]
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["again"] = reconcile()["action"]
out["status"] = schedule.status(host=host, config=Config())
""",
    "cancelled": """
capture()
schedule_update()
out["armed"] = reconcile()["action"]
out["slots_armed"] = onetime_slots()
os.unlink(link)                                     # the runner cancels
out["report"] = reconcile()
out["chain"] = chain_now()
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["status"] = schedule.status(host=host, config=Config())
""",
    "nothing-captured": """
schedule_update()
out["report"] = reconcile()
out["chain"] = chain_now()
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["status"] = schedule.status(host=host, config=Config())
""",
    "update-boot": """
capture()
schedule_update()
out["armed"] = reconcile(login_enabled=True)["action"]
reboot()                                            # into the update boot
r = update.restore(host=host, volumes=[img])
out["restored"] = len(r.restored)
update.finish(host=host)
out["link_in_update_boot"] = os.path.lexists(link)
os.unlink(link)                                     # the runner, before its final reboot
out["report"] = reconcile()
out["chain"] = chain_now()
rr = update.rearm(host=host)                        # the rearm unit at shutdown
out["rearm"] = [rr.channel, len(onetime_slots())]
reboot()                                            # the final boot
r = update.restore(host=host, volumes=[img])
out["restored2"] = len(r.restored)
f2 = update.finish(host=host, login_timeout=30)
out["login"] = f2.login
out["armed_after"] = update.status(host=host)["armed"]
""",
    "update-target": """
capture()
schedule_update()
in_update_target[0] = True                          # system-update.target is active
out["report"] = reconcile()
out["chain"] = chain_now()
out["cached_after"] = len(cache.entries())
""",
    "runner-armed": """
capture()
update.arm(host=host, reboot="full", boots=2, ttl=timedelta(minutes=30), volumes=[img],
           ask=None)                                # a runner that calls keyhandoff
schedule_update()
out["report"] = reconcile()
os.unlink(link)
out["cancel"] = reconcile()
out["chain"] = chain_now()
out["slots"] = len(onetime_slots())
out["record"] = efi.RECORD_VARIABLE.exists()
""",
    "config-error": """
from keyhandoff.config import load_for_boot
dropins = os.path.join(root, "etc", "keyhandoff", "keyhandoff.conf.d")
os.makedirs(dropins)
with open(os.path.join(dropins, "50-bad.conf"), "w") as f:
    f.write('[login]\\ntimeout = "2min"\\n')       # a wrong type, line 2
capture()
schedule_update()
conf = load_for_boot("schedule", root=root)
out["report"] = schedule.reconcile(host=host, config=conf).as_dict()
out["chain"] = chain_now()
out["cached_after"] = len(cache.entries())
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["status"] = schedule.status(host=host, config=conf)
out["dropin"] = os.path.join(dropins, "50-bad.conf")
""",
    "disabled": """
capture()
schedule_update()
out["report"] = reconcile(auto_arm=False)
out["chain"] = chain_now()
out["cached_after"] = len(cache.entries())
""",
    "shutdown-soft": """
capture()
schedule_update()
out["armed"] = reconcile()
out["cached_armed"] = len(cache.entries())         # kept: a soft reboot would need it
coming[0] = "soft-reboot"                           # the shutdown unit, at systemctl soft-reboot
out["report"] = reconcile(wait_for_update=7200)
out["chain"] = chain_now()
out["cached_after"] = len(cache.entries())
out["key_ttl"] = cache.entries()[0].seconds_left if cache.entries() else None
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["status"] = schedule.status(host=host, config=Config())
""",
    "shutdown-reboot": """
capture()
schedule_update()
out["armed"] = reconcile()["action"]
coming[0] = "reboot"
out["report"] = reconcile()
snapshot()
""",
    "shutdown-first": """
capture()
schedule_update()
coming[0] = "soft-reboot"                           # the path unit never got to run
out["report"] = reconcile()
snapshot()
""",
    "shutdown-expired": """
capture()
schedule_update()
out["armed"] = reconcile()["action"]
cache.forget(update.targets(host=host)[0].uuid)     # the capture's own timeout ran out
coming[0] = "soft-reboot"
out["report"] = reconcile()
out["chain"] = chain_now()
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
""",
    "foreign-kexec": """
os.makedirs(os.path.join(root, "sys", "kernel"))
with open(os.path.join(root, "sys", "kernel", "kexec_loaded"), "w") as f:
    f.write("1\\n")                                 # someone else's image, no mark of ours
capture()
schedule_update()
out["report"] = reconcile(auto_reboot="kexec")
out["chain"] = chain_now()
coming[0] = "kexec"
out["at_kexec"] = reconcile(auto_reboot="kexec")
out["cached_after"] = len(cache.entries())
out["record"] = efi.RECORD_VARIABLE.exists()
""",
    "kexec": """
from keyhandoff import kexec
capture()
schedule_update()
out["report"] = reconcile(auto_reboot="kexec")
out["chain"] = chain_now()
out["cached_after"] = len(cache.entries())
out["slots"] = onetime_slots()
out["record"] = efi.RECORD_VARIABLE.exists()
out["state"] = [kexec.state().possible, kexec.state().reason]
""",
}


def run(story: str, tmp_path, pw: bytes):
    img = format_image(tmp_path / "data.img", pw)
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(pw)
    state = tmp_path / "state"
    state.mkdir()
    try:
        out, proc, efivars = run_in_scratch_efivars(PRELUDE + STORIES[story]
                                                    + "\ncache.forget_all()\n"
                                                    "print(json.dumps(out))\n",
                                                    tmp_path, img, pw_file, state, story)
    finally:
        pw_file.unlink()
    # the passphrase in nothing written: stdout, stderr, EFI variables, the state files
    blobs = [proc.stdout, proc.stderr] + [p.read_bytes() for p in efivars.iterdir()]
    blobs += [p.read_bytes() for p in (state / "run").iterdir() if p.is_file()]
    for blob in blobs:
        assert pw not in blob
    return out, proc, img


def test_scheduled_and_captured_arms_full_for_two_boots(tmp_path, cache):
    pw = make("sched")
    out, proc, img = run("armed", tmp_path, pw)
    report = out["report"]
    assert report["action"] == "armed", report
    assert report["ok"] is True
    assert report["channel"] == "efi"
    assert report["boots"] == 2
    assert report["consumed"] == 0                     # kept until the shutdown looks
    assert "stays in the cache under its own timeout until the shutdown" in report["detail"]
    assert "coming" not in report                      # no shutdown under way
    chain = out["chain"]
    assert chain["reboot"] == "full"
    assert chain["boots_left"] == 2
    assert chain["auto"] is True                       # armed automatically, in this boot
    assert 7200 - 5 <= chain["ttl"] <= 7200            # the policy's time, not the default
    assert len(out["cached_after"]) == 1               # a soft reboot may still need it
    assert len(out["slots"]) == 1
    assert out["record"] is True
    assert out["again"] == "left-alone"                # a second run changes nothing
    status = out["status"]
    assert status["update_scheduled"].endswith("/system-update")
    assert status["armed_automatically"] is True
    assert status["armed_automatically_in_this_boot"] is True
    assert status["last_action"] == "left-alone"
    assert b"ARMED" in proc.stderr
    assert b"SCHEDULE an offline update is scheduled" in proc.stderr
    assert b"action=armed volumes=data" in proc.stderr
    assert opens(img, pw)


def test_a_soft_reboot_coming_arms_the_keyring_channel_instead(tmp_path, cache):
    """The shutdown unit sees soft-reboot.target queued: the EFI arming would not carry over
    (a soft reboot keeps the boot id); the keyring channel replaces it, the record and the
    one-time keyslot go, and the capture leaves the cache."""
    pw = make("sched-soft")
    out, proc, img = run("shutdown-soft", tmp_path, pw)
    assert out["armed"]["channel"] == "efi"
    assert out["cached_armed"] == 1
    report = out["report"]
    assert report["action"] == "armed", report
    assert (report["channel"], report["coming"], report["consumed"]) == ("keyring",
                                                                         "soft-reboot", 0)
    assert ("a soft reboot is coming; the passphrase stays in the kernel keyring, under the "
            "chain's deadline") in report["detail"]
    chain = out["chain"]
    assert (chain["reboot"], chain["boots_left"], chain["auto"]) == ("soft", 2, True)
    assert out["cached_after"] == 1                    # the chain's own: the same key
    assert 7200 - 5 <= out["key_ttl"] <= 7200          # under the chain's deadline
    assert out["slots"] == []                          # the EFI arming's keyslot: superseded
    assert out["record"] is False
    assert out["status"]["last_action"] == "armed"
    assert b"armed 1 volume(s) via keyring" in proc.stderr
    assert opens(img, pw)


def test_a_reboot_coming_keeps_the_efi_arming_and_drops_the_capture(tmp_path, cache):
    out, _proc, _img = run("shutdown-reboot", tmp_path, make("sched-rb"))
    assert out["armed"] == "armed"
    report = out["report"]
    assert (report["action"], report["coming"], report["consumed"]) == ("left-alone", "reboot",
                                                                        1), report
    said = "a reboot is coming and the handoff armed automatically in this boot (efi) carries"
    assert said in report["detail"]
    assert out["chain"]["reboot"] == "full"
    assert out["cached_after"] == 0
    assert len(out["slots"]) == 1
    assert out["record"] is True


def test_a_soft_reboot_coming_before_the_path_unit_ran_arms_it_at_once(tmp_path, cache):
    out, _proc, _img = run("shutdown-first", tmp_path, make("sched-first"))
    report = out["report"]
    assert (report["action"], report["channel"], report["consumed"]) == ("armed", "keyring", 0)
    assert out["chain"]["reboot"] == "soft"
    assert (out["cached_after"], out["slots"], out["record"]) == (1, [], False)


def test_a_soft_reboot_coming_after_the_capture_expired_leaves_the_efi_arming(tmp_path, cache):
    out, _proc, _img = run("shutdown-expired", tmp_path, make("sched-exp"))
    assert out["armed"] == "armed"
    report = out["report"]
    assert report["action"] == "left-alone", report
    said = ("a soft reboot is coming, which the handoff armed automatically in this boot (efi) "
            "does not carry over, and the passphrase is no longer captured")
    assert said in report["detail"]
    assert out["chain"]["reboot"] == "full"            # a later full boot still gets it
    assert len(out["slots"]) == 1
    assert out["record"] is True


def test_a_kexec_image_someone_else_loaded_is_not_replaced(tmp_path, cache):
    """``[update] reboot = "kexec"``, but a kexec image keyhandoff did not load is there:
    the efi channel arms instead (its variable reaches the kernel that image starts)."""
    out, _proc, _img = run("foreign-kexec", tmp_path, make("sched-foreign"))
    report = out["report"]
    assert (report["action"], report["channel"]) == ("armed", "efi"), report
    assert out["chain"]["reboot"] == "full"
    at_kexec = out["at_kexec"]
    assert (at_kexec["action"], at_kexec["coming"], at_kexec["consumed"]) == ("left-alone",
                                                                              "kexec", 1)
    assert out["cached_after"] == 0
    assert out["record"] is True


def test_cancelled_schedule_disarms_what_it_armed(tmp_path, cache):
    pw = make("cancel")
    out, proc, img = run("cancelled", tmp_path, pw)
    assert out["armed"] == "armed"
    assert len(out["slots_armed"]) == 1
    assert out["report"]["action"] == "disarmed", out["report"]
    assert out["report"]["counts"]["keyslots"] == 1
    assert out["chain"] is None
    assert out["slots"] == []                          # the one-time keyslot is gone
    assert out["record"] is False                      # and the EFI record
    assert out["status"]["update_scheduled"] is None
    assert out["status"]["last_action"] == "disarmed"
    assert b"SCHEDULE_CANCELLED" in proc.stderr
    meta = metadata(img)
    assert not any(t.get("type") == "keyhandoff-onetime" for t in meta["tokens"].values())
    assert opens(img, pw)


def test_scheduled_and_nothing_captured_says_so(tmp_path, cache):
    out, proc, _img = run("nothing-captured", tmp_path, make("none"))
    report = out["report"]
    assert report["action"] == "nothing-captured", report
    assert report["ok"] is True                        # the unit exits 0
    assert report["volumes"] == ["data"]
    assert "data" in report["detail"]
    assert "ask for the passphrase as usual" in report["detail"]
    assert out["chain"] is None
    assert out["slots"] == []
    assert out["record"] is False
    assert out["status"]["last_action"] == "nothing-captured"
    assert out["status"]["armed"] is False
    # the journal entry, with its MESSAGE_ID's event name, names the volume
    line = next(ln for ln in proc.stderr.decode().splitlines() if "NOTHING_CAPTURED" in ln)
    assert "data" in line


def test_chain_restored_from_an_earlier_boot_survives_the_link_removal(tmp_path, cache):
    """The update boot: the runner removes the link before its final reboot; boots=2 holds."""
    pw = make("upd")
    out, _proc, _img = run("update-boot", tmp_path, pw)
    assert out["armed"] == "armed"
    assert out["restored"] == 1
    assert out["link_in_update_boot"] is True
    assert out["report"]["action"] == "update-boot", out["report"]
    assert out["chain"]["boots_left"] == 1             # untouched
    # restored from the record, which does not say who armed: not "automatic in this boot"
    assert out["chain"]["auto"] is False
    assert out["rearm"] == ["efi", 1]
    assert out["restored2"] == 1                       # the final boot is handed over too
    assert out["login"] == "handed to the login path"
    assert out["armed_after"] is False


def test_nothing_is_done_while_system_update_target_is_active(tmp_path, cache):
    out, _proc, _img = run("update-target", tmp_path, make("tgt"))
    assert out["report"]["action"] == "update-boot", out["report"]
    assert out["chain"] is None
    assert out["cached_after"] == 1


def test_a_runners_arming_is_left_alone(tmp_path, cache):
    out, _proc, _img = run("runner-armed", tmp_path, make("runner"))
    assert out["report"]["action"] == "left-alone", out["report"]
    assert "by an update runner" in out["report"]["detail"]
    assert out["cancel"]["action"] == "not-scheduled", out["cancel"]
    chain = out["chain"]
    assert chain is not None                           # a removed link does not disarm it
    assert (chain["boots_left"], chain["auto_boot"]) == (2, False)
    assert out["slots"] == 1
    assert out["record"] is True


def test_automatic_kexec_arming_where_kexec_is_impossible_says_why(tmp_path, cache):
    """``[update] reboot = "kexec"`` on a kernel without kexec (this host): nothing armed,
    nothing written, the capture kept for the boots to be asked as usual; the reason is the
    kernel's.  (Where kexec is possible, the VM's kexec scenario arms and kexecs.)"""
    out, _proc, _img = run("kexec", tmp_path, make("sched-kexec"))
    possible, reason = out["state"]
    if possible:
        pytest.skip("this host can kexec: the VM's kexec scenario arms it for real")
    report = out["report"]
    assert report["action"] == "unavailable", report
    said = ("the kexec-reboot channel is unavailable here (cannot carry a record across "
            f"kexec: {reason})")
    assert said in report["detail"]
    assert (out["chain"], out["slots"], out["record"]) == (None, [], False)
    assert out["cached_after"] == 1


def test_auto_arm_off_arms_nothing(tmp_path, cache):
    out, _proc, _img = run("disabled", tmp_path, make("off"))
    assert out["report"]["action"] == "disabled", out["report"]
    assert out["chain"] is None
    assert out["cached_after"] == 1                    # the capture is left as it was


def test_a_config_error_in_a_drop_in_arms_nothing(tmp_path, cache):
    """The defaults would arm (capture and auto_arm on); an error turns both off instead."""
    pw = make("conf-err")
    out, proc, img = run("config-error", tmp_path, pw)
    why = f"capture and auto-arm disabled because of config error at {out['dropin']}:2"
    report = out["report"]
    assert report["action"] == "disabled", report
    assert report["ok"] is True                        # the unit exits 0; the boots ask
    assert why in report["detail"]
    assert out["chain"] is None
    assert out["slots"] == []
    assert out["record"] is False
    assert out["cached_after"] == 1                    # the capture is left as it was
    assert out["status"]["auto_arm"] is False
    assert out["status"]["capture_timeout"] == 0
    assert out["status"]["config_error_detail"] == why
    assert f"CONFIG schedule: {why}".encode() in proc.stderr
    assert opens(img, pw)


def test_not_scheduled_on_a_scratch_root_without_a_link(tmp_path, cache, monkeypatch):
    """In this process: no link, nothing armed: nothing to do, and it says so."""
    from keyhandoff import statelock  # noqa: PLC0415

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setattr(statelock, "LOCK_DIR", str(run_dir))
    host = Host(root=str(tmp_path), crypttab_path=str(tmp_path / "crypttab"),
                update_target_active=lambda: False)
    report = schedule.reconcile(host=host, config=Config())
    assert (report.action, report.ok, report.scheduled) == ("not-scheduled", True, None)
    assert schedule.last_report(host=host)["action"] == "not-scheduled"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "system-update").symlink_to("/nonexistent")  # dangling counts
    assert host.scheduled_update() == str(tmp_path / "etc" / "system-update")
    report = schedule.reconcile(host=host, config=Config())
    assert report.action == "no-volumes"
