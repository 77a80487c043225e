"""Helpers for the demo's guest jobs (shipped next to each job's script)."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time

from keyhandoff import onetime
from keyhandoff.luks import LuksHeader

DATA = "/data"


def result(name: str, ok: bool, detail: str = "") -> bool:
    subprocess.run(["vmtest-result", name, "PASS" if ok else "FAIL", detail or "-"], check=False)
    return ok


def wait_until(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def active(unit: str) -> bool:
    return subprocess.run(["systemctl", "is-active", "-q", unit], check=False).returncode == 0


def mounted(path: str = DATA) -> bool:
    return subprocess.run(["mountpoint", "-q", path], check=False).returncode == 0


def expected_sha() -> str:
    with open(os.path.join(os.environ["VMTEST_JOB"], "expect.sha256"), encoding="ascii") as f:
        return f.read().strip()


def token_sha(service: str) -> str | None:
    """Run the PAM stack ``service`` with pamtester; the SHA-256 of PAM_AUTHTOK, or None."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/run/kh-token")
    subprocess.run(["pamtester", service, "root", "authenticate"], stdin=subprocess.DEVNULL,
                   capture_output=True, check=False, timeout=60)
    try:
        with open("/run/kh-token", encoding="ascii") as f:
            value = f.read().strip()
    except FileNotFoundError:
        return None
    empty = hashlib.sha256(b"").hexdigest()
    return None if value == empty else value


def cached_volumes() -> list[str]:
    out = subprocess.run(["keyhandoff", "cache", "list", "--json"], capture_output=True,
                         text=True, check=False).stdout
    try:
        return [e["volume"] for e in json.loads(out)]
    except ValueError:
        return []


def onetime_tokens(device: str) -> int:
    with LuksHeader.open(device) as header:
        return len(onetime.slots(header))


def journal(message_id: str) -> list[dict]:
    out = subprocess.run(["journalctl", "-b", "-o", "json", f"MESSAGE_ID={message_id}"],
                         capture_output=True, text=True, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def journal_leaks(marker: bytes = b"khTESTpw-") -> int:
    """How often a test passphrase's marker occurs anywhere in this boot's journal."""
    out = subprocess.run(["journalctl", "-b", "-o", "export"], capture_output=True,
                         check=False).stdout
    return out.count(marker)


# --- the person's login keyring (gnome-keyring) ---------------------------------------------
#
# The person is uid 1000 (demo.customize adds them).  A job never sees the passphrase: the PAM
# stacks take it from the kernel keyring (systemd's "cryptsetup" key) and hand it to
# gnome-keyring-daemon over its control socket; what a job compares is the Secret Service's
# answer, or a SHA-256.

PERSON = "person"
PERSON_UID = 1000
RUNTIME = f"/run/user/{PERSON_UID}"
LOGIN_KEYRING = f"/home/{PERSON}/.local/share/keyrings/login.keyring"
LOGIN_COLLECTION = "/org/freedesktop/secrets/collection/login"
#: the item the person's session stores in the login keyring when it is created (not a secret)
ITEM = ("kh-demo", "login-item")
ITEM_SECRET = "kh-demo-item"  # noqa: S105 (a test item's value, not a credential)
#: the negative control's password, in the kh-demo-wrong key (not the passphrase)
WRONG_KEY = "kh-demo-wrong"
WRONG_PASSWORD = b"kh-demo-wrong-password"


def as_person(argv: list[str], *, data: bytes | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``argv`` as the person in their session's environment.

    Their own session keyring (``keyctl session -``): a child would otherwise share the job's,
    through which root's user keyring, and the passphrase in it, is possessed.
    """
    env = {"PATH": "/usr/bin:/bin", "HOME": f"/home/{PERSON}", "USER": PERSON,
           "LOGNAME": PERSON, "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": RUNTIME,
           "DBUS_SESSION_BUS_ADDRESS": f"unix:path={RUNTIME}/bus"}
    try:
        return subprocess.run(["keyctl", "session", "-", *argv], user=PERSON_UID,
                              group=PERSON_UID, extra_groups=[], env=env, cwd=env["HOME"],
                              input=data, capture_output=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, -1, b"", b"timed out")


def linger_person() -> None:
    """Let the person linger (``loginctl enable-linger``): logind starts their user manager.

    ``user@1000.service`` brings their D-Bus session bus (dbus-user-session's ``dbus.socket``)
    and gnome-keyring's control socket (its ``gnome-keyring-daemon.socket``, enabled for every
    user by the package) to ``/run/user/1000``, as their login would.  pamtester opens no
    logind session, so lingering is what keeps that manager (logind may stop one that no
    session or linger keeps); logind starts it again at every later boot.
    """
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["loginctl", "enable-linger", PERSON], capture_output=True, check=False,
                       timeout=60)


def start_person_session() -> bool:
    """:func:`linger_person`; whether the person's session bus and keyring socket are there."""
    linger_person()
    return wait_until(lambda: os.path.exists(f"{RUNTIME}/bus")
                      and os.path.exists(f"{RUNTIME}/keyring/control"), 90)


def pam_session(service: str) -> str:
    """Authenticate the person through the PAM stack ``service`` and open their session.

    What an autologin does (pamtester: ``authenticate open_session``).  No XDG_RUNTIME_DIR
    from here: the stack's session half sets it (pam_env, for pam_systemd), so the auth half
    finds no daemon and stashes the password for the session half, as under GDM.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS", "GNOME_KEYRING_CONTROL")}
    try:
        done = subprocess.run(["pamtester", "-v", service, PERSON, "authenticate", "open_session"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        return f"pamtester {service}: timed out"
    return (done.stdout + done.stderr).strip()


def keyring_locked() -> bool | None:
    """The login collection's ``Locked``, from the Secret Service on the person's bus.

    None: no Secret Service or no login collection.  busctl reads the property only: it
    never asks the daemon to unlock (which would prompt).
    """
    done = as_person(["busctl", "--user", "get-property", "org.freedesktop.secrets",
                      LOGIN_COLLECTION, "org.freedesktop.Secret.Collection", "Locked"])
    words = done.stdout.decode(errors="replace").split()
    if done.returncode != 0 or len(words) != 2 or words[0] != "b":
        print(f"KH-GKR busctl rc={done.returncode}: {_own_error(done)}", flush=True)
        return None
    return words[1] == "true"


def _own_error(done: subprocess.CompletedProcess) -> str:
    """The command's own error line: stderr without keyctl's "Joined session keyring" line."""
    lines = [line for line in done.stderr.decode(errors="replace").splitlines()
             if line.strip() and not line.startswith("Joined session keyring")]
    return " / ".join(lines)[-300:]


def secret_collections() -> list[str]:
    """The Secret Service's ``Collections`` property: the collections the daemon holds now.

    gnome-keyring-daemon computes it from its PKCS#11 store at each read
    (``gkd_secret_service_skeleton_get_property``), so it lists a collection that has no
    object on the bus yet (see :func:`keyring_login`'s ``created``).
    """
    done = as_person(["busctl", "--user", "get-property", "org.freedesktop.secrets",
                      "/org/freedesktop/secrets", "org.freedesktop.Secret.Service",
                      "Collections"])
    words = done.stdout.decode(errors="replace").split()
    if done.returncode != 0 or len(words) < 2 or words[0] != "ao":
        print(f"KH-GKR busctl rc={done.returncode}: {_own_error(done)}", flush=True)
        return []
    return [word.strip('"') for word in words[2:]]


def store_item() -> bool:
    """Store :data:`ITEM` in the login collection, as an application of the person would."""
    done = as_person(["secret-tool", "store", "--label=keyhandoff demo",
                      f"--collection={LOGIN_COLLECTION}", *ITEM], data=ITEM_SECRET.encode())
    return done.returncode == 0


def lookup_item() -> str | None:
    """:data:`ITEM`'s secret through the Secret Service (libsecret's secret-tool), or None."""
    done = as_person(["secret-tool", "lookup", *ITEM], timeout=30)
    return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else None


def keyring_daemon_pids() -> list[int]:
    """The person's gnome-keyring-daemon processes."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if (os.readlink(f"/proc/{entry}/exe") == "/usr/bin/gnome-keyring-daemon"
                    and os.stat(f"/proc/{entry}").st_uid == PERSON_UID):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def stop_keyring_daemon() -> bool:
    """End the person's gnome-keyring-daemon: the next login meets the keyring locked on disk.

    The user unit's, and by PID one that pam_gnome_keyring started itself (``--login``, when
    it found no control socket).  Its socket unit stays, as after a logout.
    """
    as_person(["systemctl", "--user", "stop", "gnome-keyring-daemon.service"])
    for pid in keyring_daemon_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    return wait_until(lambda: not keyring_daemon_pids(), 15)


def journal_cursor() -> str:
    """The cursor of this boot's last journal entry ("" if none)."""
    out = subprocess.run(["journalctl", "-b", "-n", "1", "--show-cursor", "-o", "cat", "-q"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("-- cursor: "):
            return line[len("-- cursor: "):].strip()
    return ""


def keyring_messages(cursor: str) -> list[str]:
    """pam_gnome_keyring's and gnome-keyring-daemon's journal lines after ``cursor``."""
    argv = ["journalctl", "-b", "--no-pager", "-o", "cat"]
    argv += [f"--after-cursor={cursor}"] if cursor else []
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if "gkr-pam:" in line or "login keyring" in line]


#: pam_gnome_keyring's and the daemon's words for each outcome (gkr-pam-module.c, gkd-main.c)
UNLOCKED_SAID = ("gkr-pam: unlocked login keyring",)
REFUSED_SAID = ("gkr-pam: the password for the login keyring was invalid.",
                "failed to unlock login keyring on startup")


def keyring_login(service: str, *, created: bool = False) -> tuple[bool | None, list[str]]:
    """A fresh login through ``service``: (the collection's Locked, the keyring's journal lines).

    The daemon is stopped first, so nothing from an earlier login is unlocked already; the
    control socket starts a new one when pam_gnome_keyring's session half connects.

    ``created``: this login creates the login keyring.  The daemon then has no object for it
    on the bus until it starts again: its Secret Service puts collections on the bus when it
    starts (``gkd_secret_service_init_collections``) and when one is created over D-Bus, but
    pam_gnome_keyring's unlock creates it in the PKCS#11 store (``gkd-login.c``,
    ``create_login_keyring``), so ``Locked`` is not asked for; :func:`secret_collections` lists it.
    """
    stop_keyring_daemon()
    cursor = journal_cursor()
    pam_said = pam_session(service)
    wait_until(lambda: any(w in line for line in keyring_messages(cursor)
                           for w in UNLOCKED_SAID + REFUSED_SAID), 15)
    locked = None
    if not created:
        # a slow guest (TCG) may answer after the journal line: ask until it does, bounded
        wait_until(lambda: keyring_locked() is not None, 60, step=2)
        locked = keyring_locked()
    lines = keyring_messages(cursor)
    print(f"KH-GKR {service}: Locked={locked}; pamtester: {pam_said!r}", flush=True)
    for line in lines:
        print(f"KH-GKR {service}:   {line}", flush=True)
    return locked, lines


def said(lines: list[str], words: tuple[str, ...]) -> bool:
    """Whether any of ``words`` is in the journal ``lines``."""
    return any(w in line for line in lines for w in words)


def with_wrong_key(fn):
    """Run ``fn()`` with :data:`WRONG_PASSWORD` in root's ``kh-demo-wrong`` key, then drop it.

    Without the key the negative control fails by itself: no password reaches the daemon, so
    nothing says it was refused.
    """
    serial = subprocess.run(["keyctl", "padd", "user", WRONG_KEY, "@u"], input=WRONG_PASSWORD,
                            capture_output=True, check=False).stdout.decode().strip()
    try:
        return fn()
    finally:
        if serial:
            subprocess.run(["keyctl", "invalidate", serial], capture_output=True, check=False)


