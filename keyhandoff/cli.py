"""The ``keyhandoff`` command line.

Exit codes (the same table is in README.md and keyhandoff(8); tests/integration/test_cli.py
checks that the three agree and that each row happens):

====  =====================================================================================
code  meaning
====  =====================================================================================
0     success; also ``rearm`` in the boot that armed (already armed: nothing to do),
      ``rearm --if-armed`` with nothing armed, ``schedule`` with nothing captured
1     refused or failed: one line on stderr says why (``schedule``: arming refused, lock busy;
      ``config``: a file or setting has an error, each said with its file and line)
2     usage error: a bad option or value (also an :class:`~keyhandoff.errors.InvalidArgument`)
3     nothing found: nothing armed (``rearm``), nothing armed or cached for a
      ``disarm --volume``, nothing cached (``cache forget``, ``login-handoff``)
4     not permitted: not root (checked before anything else), or root's user keyring not
      possessed (every command but ``status``, ``agent`` and ``config``)
130   interrupted
====  =====================================================================================

Messages go through :func:`keyhandoff.errors.describe`: no ``[Errno N]``, the file named;
no argument ends in a traceback.  With ``--json`` an error is also ``{"error": {"message":
..., "code": <exit code>}}`` on stdout (:mod:`keyhandoff.jsonout`).
Passphrases are read from stdin (one line, or all of it when not a tty) or asked on the
terminal without echo; never taken from the command line or the environment.

Every command that touches a secret (``cache put``, ``arm``, ``rearm``, ``disarm``,
``schedule``, ``restore``, ``finish``, ``capture-initrd``, ``login-handoff``, ``agent``) hardens its
process first (:func:`keyhandoff.process.harden`: not dumpable, memory locked), before it
reads one.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Final, NoReturn

from keyhandoff import __version__, timefmt
from keyhandoff.errors import (
    InvalidArgument,
    KeyhandoffError,
    KeyringNotPossessed,
    NotRoot,
    describe,
)
from keyhandoff.secret import MAX_PASSPHRASE, Secret

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from keyhandoff.chain import Target
    from keyhandoff.config import Config, Problem


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NOT_PERMITTED = 4
EXIT_INTERRUPTED = 130

#: The longest span any option takes: a day, the longest a cache entry
#: (:data:`keyhandoff.cache.MAX_TIMEOUT`) or a chain may live.
_MAX_SPAN: Final = 86400


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(_fail(EXIT_USAGE, message))


def read_passphrase(prompt: str = "Passphrase: ") -> Secret:
    """Read one passphrase from the terminal (no echo) or from stdin, as a Secret."""
    limit = MAX_PASSPHRASE + 2  # room to see that it is too long, and a newline
    if os.isatty(sys.stdin.fileno()):
        import termios  # only for interactive use

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        sys.stderr.write(prompt)
        sys.stderr.flush()
        try:
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
            raw = _read_fd(fd, limit, stop_at_newline=True)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            sys.stderr.write("\n")
    else:
        raw = _read_fd(sys.stdin.fileno(), limit, stop_at_newline=True)
    if raw.endswith(b"\n"):
        raw[-1:] = b""
    return Secret.passphrase(raw)


def _read_fd(fd: int, limit: int, *, stop_at_newline: bool) -> bytearray:
    """Read up to ``limit`` bytes into one preallocated bytearray (no growing copies)."""
    buf = bytearray(limit)
    view = memoryview(buf)
    n = 0
    while n < limit:
        got = os.readv(fd, [view[n : n + 1]] if stop_at_newline else [view[n:]])
        if got == 0:
            break
        n += got
        if stop_at_newline and buf[n - 1] == 0x0A:
            break
    view.release()
    for i in range(n, limit):
        buf[i] = 0
    del buf[n:]
    return buf


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    """``data`` (:mod:`keyhandoff.jsonout`'s vocabulary) with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text)


def cmd_status(args: argparse.Namespace) -> int:
    """Report what the machine offers and what we hold (never a payload)."""
    from keyhandoff import jsonout
    from keyhandoff.status import collect

    report = collect()
    _emit(args, jsonout.status(report.as_dict(), int(time.time())), report.as_text())
    return EXIT_OK


def _harden() -> None:
    """Make this process non-dumpable and lock its memory before it holds a secret.

    Not being able to make it non-dumpable is an error (exit 1, nothing read); memory
    that could not be locked is said on stderr and the command goes on, as the agent does.
    """
    from keyhandoff import process

    for problem in process.harden():
        sys.stderr.write(f"keyhandoff: warning: process hardening incomplete: {problem}\n")


def cmd_cache_put(args: argparse.Namespace) -> int:
    """Store a passphrase for a volume, read from stdin or the terminal.

    When the volume is plugged in, the passphrase is checked against its LUKS header first
    (one PBKDF, as the agent checks what it captures): one that does not open it is refused
    and nothing is stored.
    """
    from keyhandoff.cache import PassphraseCache

    volume = _volume(args.volume)  # refuse a bad volume before asking for a passphrase
    _harden()
    present = os.path.exists(volume.path)
    with read_passphrase(f"Passphrase for {_named(volume)}: ") as secret:
        secret.check_passphrase()
        if present:
            _verify(volume, secret)
        PassphraseCache().put(volume.uuid, secret, timeout=args.timeout)
    if not present:
        sys.stderr.write(f"keyhandoff: not verified: {_named(volume)} is not plugged in "
                         f"({volume.path} does not exist)\n")
    now = int(time.time())
    until = timefmt.timestamp(now + args.timeout, now=now)
    sys.stderr.write(f"keyhandoff: cached the passphrase for {_named(volume)} until {until}\n")
    return EXIT_OK


def _verify(volume: Target, secret: Secret) -> None:
    """One PBKDF: ``secret`` opens the LUKS header at ``volume.path``, which is that volume."""
    from keyhandoff.errors import NotLuks, WrongPassphrase
    from keyhandoff.luks import LuksHeader

    with LuksHeader.open(volume.path) as header:
        if header.uuid != volume.uuid:
            raise NotLuks(errno.EINVAL, f"{volume.path} holds LUKS volume {header.uuid}, "
                          f"not {volume.uuid}")
        try:
            header.verify(secret)
        except WrongPassphrase:
            raise WrongPassphrase(errno.EPERM, f"the passphrase does not open "
                                  f"{_named(volume)}: nothing was cached") from None


def cmd_cache_list(args: argparse.Namespace) -> int:
    """List cached volumes with the time the kernel leaves them."""
    from keyhandoff import jsonout
    from keyhandoff.cache import PassphraseCache

    entries = PassphraseCache().entries()
    lines = [f"{e.volume}  {_left(e.seconds_left)}\n" for e in entries]
    _emit(args, jsonout.cache_list(entries, int(time.time())),
          "".join(lines) or "no cached passphrases\n")
    return EXIT_OK


def _left(seconds: int | None) -> str:
    if seconds is None:
        return "no expiry"
    now = int(time.time())
    return timefmt.timestamp(now + seconds, now=now) if seconds else "expired"


def cmd_cache_forget(args: argparse.Namespace) -> int:
    """Destroy one volume's entry, or all."""
    from keyhandoff.cache import PassphraseCache

    cache = PassphraseCache()
    if args.all:
        count = cache.forget_all()
        sys.stderr.write(f"keyhandoff: forgot {count} cached passphrase(s)\n")
        return EXIT_OK
    volume = _volume(args.volume)
    if not cache.forget(volume.uuid):
        return _fail(EXIT_NOT_FOUND, f"nothing cached for {_named(volume)}")
    sys.stderr.write(f"keyhandoff: forgot the passphrase for {_named(volume)}\n")
    return EXIT_OK


def _volume(spec: str) -> Target:
    """What ``--volume`` names, resolved the same way in every command.

    A crypttab name, a LUKS UUID with or without ``UUID=``, or a source path
    (:func:`keyhandoff.asking.resolve_volume`).
    """
    from keyhandoff.asking import resolve_volume

    return resolve_volume(spec)


def _volume_paths(specs: list[str] | None) -> list[str] | None:
    """For the boot steps, which may wait for a device: a path as given, else resolved."""
    if specs is None:
        return None
    return [s if s.startswith("/") else _volume(s).path for s in specs]


def _named(t: Target) -> str:
    return t.uuid if t.name == t.uuid else f"{t.name} ({t.uuid})"


def _span(*, least: int, most: int, whole: bool = True) -> Callable[[str], float]:
    """An argparse type: a systemd time span (``90``, ``30min``, ``1h 30min``) in seconds."""
    def parse(text: str) -> float:
        try:
            if whole:
                return timefmt.parse_span_seconds(text, least=least, most=most)
            return timefmt.parse_span(text, least=least, most=most)
        except ValueError as exc:
            hint = "" if "out of range" in str(exc) else " (a time span: 90, 10min, 1h 30min)"
            raise argparse.ArgumentTypeError(f"{exc}{hint}") from None
    parse.__name__ = "time span"  # argparse names the type in its messages
    return parse


def _progress(message: str) -> None:
    ellipsis = "" if message.startswith("skipping ") else "..."
    sys.stderr.write(f"keyhandoff: {message}{ellipsis}\n")
    sys.stderr.flush()


def cmd_arm(args: argparse.Namespace) -> int:
    """Arm the handoff and print what the next boot will do."""
    _harden()
    from keyhandoff import jsonout, update

    kernel = None
    if args.kernel is not None or args.initrd is not None:
        from keyhandoff import kexec

        if args.reboot != "kexec" or args.kernel is None:
            raise InvalidArgument("--kernel (and --initrd) go with --reboot kexec")
        kernel = kexec.named_kernel(args.kernel, args.initrd)
    report = update.arm(  # an InvalidArgument (a --ttl out of range...) is a usage error
        reboot=args.reboot, boots=args.boots, ttl=timedelta(seconds=args.ttl),
        login=args.login, volumes=args.volumes,
        ask=None if args.no_ask else update.SystemdAsk(args.ask_timeout),
        progress=_progress, kernel=kernel,
    )
    _emit(args, jsonout.arm(report), report.summary() + "\n")
    return EXIT_OK


def cmd_rearm(args: argparse.Namespace) -> int:
    """Re-arm an armed chain for its next boot."""
    _harden()
    from keyhandoff import jsonout, update

    try:
        report = update.rearm(progress=_progress)
    except update.AlreadyArmed as exc:  # armed (or re-armed) in this boot: nothing to do
        if args.if_armed:
            return EXIT_OK
        sys.stderr.write(f"keyhandoff: {describe(exc)}\n")
        report = exc.report
    except update.NotArmed as exc:
        if args.if_armed:
            return EXIT_OK
        return _fail(EXIT_NOT_FOUND, describe(exc))
    _emit(args, jsonout.arm(report), report.summary() + "\n")
    return EXIT_OK


def cmd_disarm(args: argparse.Namespace) -> int:
    """Wipe everything armed."""
    _harden()
    from keyhandoff import jsonout, update

    try:
        counts = update.disarm(volumes=args.volumes, must_match=True)
    except update.NotArmed as exc:
        return _fail(EXIT_NOT_FOUND, describe(exc))
    sys.stderr.write("keyhandoff: disarmed (" + ", ".join(
        f"{v} {k}" for k, v in counts.items()) + ")\n")
    _emit(args, jsonout.disarm(counts), "")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    """Arm for a scheduled offline update, or disarm a cancelled one (the path unit's)."""
    _harden()
    from keyhandoff import jsonout, schedule

    report = schedule.reconcile()
    _emit(args, jsonout.schedule(report.as_dict()), f"keyhandoff: {report.summary()}\n")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_restore(args: argparse.Namespace) -> int:
    """Boot time: load an armed record."""
    _harden()
    from keyhandoff import jsonout, update

    report = update.restore(volumes=_volume_paths(args.volumes), wait=args.wait)
    if report.refused:
        sys.stderr.write(f"keyhandoff: record refused: {report.refused}\n")
    sys.stderr.write(f"keyhandoff: restored {len(report.restored)} volume(s) "
                     f"(channel {report.channel or 'none'}), destroyed "
                     f"{report.keyslots_destroyed} stale one-time keyslot(s)\n")
    _emit(args, jsonout.restore(report), "")
    return EXIT_OK


def cmd_finish(args: argparse.Namespace) -> int:
    """Boot time, after the volumes opened."""
    _harden()
    from keyhandoff import config, jsonout, update

    # a bad setting is logged and left out: it must not keep one-time keyslots alive
    report = update.finish(login_timeout=config.load_for_boot("finish").login_timeout)
    sys.stderr.write(f"keyhandoff: destroyed {report.keyslots_destroyed} one-time "
                     f"keyslot(s); login: {report.login}\n")
    _emit(args, jsonout.finish(report), "")
    return EXIT_OK


def cmd_login_handoff(args: argparse.Namespace) -> int:
    """Hand a passphrase the agent captured this boot to the login path."""
    _harden()
    from keyhandoff import login, update
    from keyhandoff.cache import PassphraseCache

    conf = _checked_config(None, "login-handoff")
    if not conf.login_enabled:
        sys.stderr.write("keyhandoff: login hand-off is disabled ([login] enabled = false)\n")
        return EXIT_OK
    cache = PassphraseCache()
    volumes = [_volume(args.volume).uuid] if args.volume else [e.volume for e in cache.entries()]
    if not volumes:
        sys.stderr.write("keyhandoff: no cached passphrase to hand to the login\n")
        return EXIT_NOT_FOUND
    if not update.first_in_boot("login-handoff"):  # a restarted unit hands nothing again
        sys.stderr.write("keyhandoff: the login hand-off ran already in this boot\n")
        return EXIT_OK
    with cache.get(volumes[0]) as secret:
        login.handoff(secret, timeout=conf.login_timeout)
    return EXIT_OK


def cmd_capture_initrd(args: argparse.Namespace) -> int:
    """After the switch to the real root: keep what was typed in the initramfs, verified."""
    _harden()
    from keyhandoff import config
    from keyhandoff.initrd_capture import capture_once

    conf = config.load_for_boot("capture-initrd")
    if conf.config_error is not None:  # fail-safe: nothing read from systemd's key, nothing kept
        sys.stderr.write(f"keyhandoff: {conf.config_error}: nothing captured\n")
        return EXIT_OK
    report = capture_once(retain=conf.capture_timeout, volumes=_volume_paths(args.volumes))
    sys.stderr.write(f"keyhandoff: {report.summary()}\n")
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


_VOLUME_HELP: Final = "a crypttab name, a LUKS UUID (or UUID=<uuid>) or a source path"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = _Parser(prog="keyhandoff", description="Type the disk passphrase once.")
    # the one version source (pyproject.toml reads it too); nothing compiled is imported
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("status", help="what the machine offers and what keyhandoff holds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    cache = sub.add_parser("cache", help="the per-volume passphrase cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    p = csub.add_parser(
        "put", help="cache a passphrase (read from stdin or the terminal)",
        description="Cache a volume's passphrase in the kernel keyring.  The passphrase is read "
        "from stdin (one line) or asked on the terminal without echo; never from the command "
        "line or the environment, where other processes could see it.",
    )
    p.add_argument("--volume", required=True, metavar="VOLUME", help=_VOLUME_HELP)
    p.add_argument("--timeout", type=_span(least=1, most=_MAX_SPAN), default=600,
                   metavar="SPAN", help="time span until the kernel expires it: 90, 10min, "
                   "1h 30min (default 10min, at most 1d)")
    p.set_defaults(func=cmd_cache_put)
    p = csub.add_parser("list", help="volumes with a cached passphrase and their time left")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache_list)
    p = csub.add_parser("forget", help="destroy cached passphrases")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--volume", metavar="VOLUME", help=_VOLUME_HELP)
    g.add_argument("--all", action="store_true", help="every cached passphrase")
    p.set_defaults(func=cmd_cache_forget)

    p = sub.add_parser("arm", help="arm the handoff for the next boot(s) of an update")
    p.add_argument("--reboot", choices=["soft", "full", "kexec"], required=True,
                   help="soft: systemctl soft-reboot (kernel keyring); full: EFI record; "
                   "kexec: systemctl kexec (the record in the loaded kernel's initrd, RAM)")
    p.add_argument("--kernel", metavar="FILE",
                   help="with --reboot kexec: the kernel image to load (default: the one the "
                   "boot loader would start, /vmlinuz)")
    p.add_argument("--initrd", metavar="FILE",
                   help="with --kernel: its initramfs (default: /boot/initrd.img-<release>)")
    p.add_argument("--boots", type=_positive_int, default=1, metavar="N",
                   help="how many boots the handoff covers (default 1)")
    p.add_argument("--ttl", type=_span(least=60, most=_MAX_SPAN), default=1800,
                   metavar="SPAN", help="deadline from now, a time span: 90s, 30min, "
                   "1h 30min (default 30min, 1min to 1d)")
    p.add_argument("--login", action="store_true",
                   help="also hand the passphrase to the login path on the last boot")
    p.add_argument("--volume", action="append", metavar="VOLUME", dest="volumes",
                   help=_VOLUME_HELP + " (repeatable; default: /etc/crypttab)")
    p.add_argument("--no-ask", action="store_true",
                   help="use only cached passphrases; never prompt")
    p.add_argument("--ask-timeout", type=_span(least=1, most=_MAX_SPAN), default=90,
                   metavar="SPAN", help="give up asking the password agents after this time "
                   "span (default 90s, at most 1d)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_arm)
    p = sub.add_parser("rearm", help="inside an update boot: arm the chain's next boot")
    p.add_argument("--if-armed", action="store_true",
                   help="exit 0 quietly when nothing is armed (for the shutdown unit)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_rearm)
    p = sub.add_parser("disarm", help="wipe every record, key and one-time keyslot")
    p.add_argument("--volume", action="append", metavar="VOLUME", dest="volumes",
                   help=_VOLUME_HELP + " (repeatable): an error when nothing is armed or "
                   "cached for it")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_disarm)
    p = sub.add_parser(
        "schedule", help="arm for a scheduled offline update, disarm a cancelled one "
        "(keyhandoff-schedule.path runs it)",
        description="Look whether an offline update is scheduled (/system-update or "
        "/etc/system-update): if so and nothing is armed, arm the full-reboot handoff for the "
        "update boot and the one after it from the passphrases captured at boot, never "
        "asking; if it was cancelled, disarm what this boot armed automatically.  Exits 0 "
        "when nothing was captured (the boots then ask as usual).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_schedule)
    _add_boot_steps(sub)
    p = sub.add_parser("agent", help="run the password agent (systemd service)")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="read only this file (default: the layers of keyhandoff.conf(5))")
    p.set_defaults(func=cmd_agent)
    _add_config(sub)
    return parser


def _add_config(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "config", help="the effective configuration and where each setting comes from",
        description="Read the configuration as the commands read it (keyhandoff.conf(5): "
        "/usr/lib/keyhandoff/keyhandoff.conf, /etc/keyhandoff/keyhandoff.conf, the "
        "keyhandoff.conf.d/*.conf drop-ins) and print every setting, its value and the "
        'file:line that set it, or "default".  Warnings and errors go to stderr, each with '
        "its file and line; exits 1 when a file or setting has an error (it is left out).",
    )
    p.add_argument("--config", default=None, metavar="PATH",
                   help="read only this file (no layers, no drop-ins); it must exist")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="read the files below DIR instead of / (an image, a scratch root)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_config)


def _say_problems(problems: Sequence[Problem]) -> None:
    """Each warning and error of the configuration, with its file and line, on stderr."""
    for problem in problems:
        sys.stderr.write(f"keyhandoff: {problem.severity}: {problem}\n")


def _checked_config(path: str | None, command: str) -> Config:
    """The configuration for a command that refuses to run on an error (each on stderr)."""
    from keyhandoff import config
    from keyhandoff.errors import ConfigError

    loaded = config.read(path)
    _say_problems(loaded.problems)
    if loaded.errors:
        count = len(loaded.errors)
        raise ConfigError(f"{count} configuration error{'s' if count > 1 else ''}: "
                          f"{command} does not run (keyhandoff config shows them)")
    return loaded.config


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (every setting, its value, where it was set)."""
    from keyhandoff import config, jsonout

    loaded = config.read(args.config, root=args.root)
    _say_problems(loaded.problems)
    _emit(args, jsonout.config(loaded), config.as_toml(loaded))
    return EXIT_ERROR if loaded.errors else EXIT_OK


def _add_boot_steps(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The subcommands the units run at boot."""
    p = sub.add_parser("restore", help="early boot: load an armed handoff (unit use)")
    p.add_argument("--volume", action="append", metavar="VOLUME", dest="volumes",
                   help=_VOLUME_HELP + " (repeatable)")
    p.add_argument("--wait", type=_span(least=0, most=_MAX_SPAN, whole=False), default=0,
                   metavar="SPAN", help="when a record is there, wait up to this time span "
                   "for the devices (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("finish", help="after the volumes opened: destroy one-time keyslots, "
                       "login hand-off on the last boot (unit use)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_finish)
    p = sub.add_parser("capture-initrd",
                       help="after the initramfs: cache the passphrases typed there, verified "
                       "(unit use)")
    p.add_argument("--volume", action="append", metavar="VOLUME", dest="volumes",
                   help=_VOLUME_HELP + " to check (repeatable; default: /etc/crypttab "
                   "and every LUKS device)")
    p.set_defaults(func=cmd_capture_initrd)
    p = sub.add_parser("login-handoff",
                       help="hand a cached passphrase to the login path (unit use)")
    p.add_argument("--volume", metavar="VOLUME",
                   help="whose passphrase: " + _VOLUME_HELP + " (default: the first)")
    p.set_defaults(func=cmd_login_handoff)


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM."""
    from keyhandoff import journal, process
    from keyhandoff.agent import Agent

    problems = process.harden()
    conf = _checked_config(args.config, "the agent")
    for problem in problems:
        journal.log(journal.Event.ERROR, f"process hardening incomplete: {problem}",
                    priority=journal.WARNING)
    return Agent(conf).run()


#: Commands that work without root's user keyring possessed (status reports whether it is;
#: the agent's own cache refuses without it, see :class:`keyhandoff.errors.KeyringNotPossessed`;
#: config reads files only)
_NO_KEYRING_CHECK: Final = frozenset({"status", "agent", "config"})


def _preflight(args: argparse.Namespace) -> None:
    """Before anything else a command does: root, and root's user keyring possessed."""
    if os.geteuid() != 0:
        name = " ".join(filter(None, (args.command, getattr(args, "cache_command", None))))
        raise NotRoot(f"must run as root (`keyhandoff {name}` uses root's kernel keyring, "
                      "LUKS headers and the state under /run/keyhandoff)")
    if args.command not in _NO_KEYRING_CHECK:
        from keyhandoff import keyring

        if not keyring.possesses_user_keyring():
            raise KeyringNotPossessed


#: set by main() when the command was given --json: errors then also go to stdout as JSON
_json_errors = False


def _fail(code: int, message: str) -> int:
    """The one way an error leaves the command line: one line on stderr, ``code``.

    With ``--json`` also ``{"error": {"message": ..., "code": ...}}`` on stdout.
    """
    sys.stderr.write(f"keyhandoff: {message}\n")
    if _json_errors:
        from keyhandoff import jsonout

        json.dump(jsonout.error(message, code), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyhandoff`` console script."""
    global _json_errors  # noqa: PLW0603  # one command per process
    _json_errors = any(a == "--json" for a in (sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    _json_errors = bool(getattr(args, "json", False))
    try:
        _preflight(args)
        return int(args.func(args))
    except (NotRoot, KeyringNotPossessed) as exc:
        return _fail(EXIT_NOT_PERMITTED, describe(exc))
    except InvalidArgument as exc:  # a value the call does not accept: a usage error
        return _fail(EXIT_USAGE, describe(exc))
    except (KeyhandoffError, OSError) as exc:
        return _fail(EXIT_ERROR, describe(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  # a bug: still one line, never a traceback
        return _fail(EXIT_ERROR, f"internal error (please report it): {type(exc).__name__}: "
                     f"{describe(exc)}")


if __name__ == "__main__":
    sys.exit(main())
