"""The ``keyhandoff`` command line.

Exit codes: 0 success; 1 a refusal or error (one line on stderr); 2 usage error (also an
:class:`~keyhandoff.errors.InvalidArgument` from the library, one line on stderr);
3 nothing found (``cache forget`` of a volume we hold nothing for).
Passphrases are read from stdin (one line, or all of it when not a tty) or asked on the
terminal without echo; never taken from the command line or the environment.

Every command that touches a secret (``cache put``, ``arm``, ``rearm``, ``disarm``,
``schedule``, ``restore``, ``finish``, ``capture-initrd``, ``login-handoff``, ``agent``) hardens its
process first (:func:`keyhandoff.process.harden`: not dumpable, memory locked), before it
reads one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn

from keyhandoff import __version__
from keyhandoff.errors import InvalidArgument, KeyhandoffError
from keyhandoff.secret import MAX_PASSPHRASE, Secret

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.config import Config, Problem


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"keyhandoff: {message}\n")


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
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text)


def cmd_status(args: argparse.Namespace) -> int:
    """Report what the machine offers and what we hold (never a payload)."""
    from keyhandoff.status import collect

    report = collect()
    _emit(args, report.as_dict(), report.as_text())
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
    """Store a passphrase for a volume, read from stdin or the terminal."""
    from keyhandoff.cache import PassphraseCache, normalize_uuid

    volume = normalize_uuid(args.volume)  # refuse a bad UUID before asking for a passphrase
    _harden()
    with read_passphrase(f"Passphrase for {volume}: ") as secret:
        PassphraseCache().put(volume, secret, timeout=args.timeout)
    sys.stderr.write(f"keyhandoff: cached passphrase for {volume} for {args.timeout} s\n")
    return EXIT_OK


def cmd_cache_list(args: argparse.Namespace) -> int:
    """List cached volumes with the time the kernel leaves them."""
    from keyhandoff.cache import PassphraseCache

    entries = PassphraseCache().entries()
    lines = [f"{e.volume}  {_left(e.seconds_left)}\n" for e in entries]
    _emit(args, [e.as_dict() for e in entries], "".join(lines) or "no cached passphrases\n")
    return EXIT_OK


def _left(seconds: int | None) -> str:
    if seconds is None:
        return "no expiry"
    return "expired" if seconds == 0 else f"{seconds} s left"


def cmd_cache_forget(args: argparse.Namespace) -> int:
    """Destroy one volume's entry, or all."""
    from keyhandoff.cache import PassphraseCache

    cache = PassphraseCache()
    if args.all:
        count = cache.forget_all()
        sys.stderr.write(f"keyhandoff: forgot {count} cached passphrase(s)\n")
        return EXIT_OK
    if not cache.forget(args.volume):
        sys.stderr.write(f"keyhandoff: nothing cached for {args.volume}\n")
        return EXIT_NOT_FOUND
    sys.stderr.write(f"keyhandoff: forgot the passphrase for {args.volume}\n")
    return EXIT_OK


def _duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)") from None


def _progress(message: str) -> None:
    sys.stderr.write(f"keyhandoff: {message}...\n")
    sys.stderr.flush()


def cmd_arm(args: argparse.Namespace) -> int:
    """Arm the handoff and print what the next boot will do."""
    _harden()
    from keyhandoff import update

    try:
        report = update.arm(
            reboot=args.reboot, boots=args.boots, ttl=timedelta(seconds=args.ttl),
            login=args.login, volumes=args.volumes,
            ask=None if args.no_ask else update.SystemdAsk(args.ask_timeout),
            progress=_progress,
        )
    except ValueError as exc:
        sys.stderr.write(f"keyhandoff: {exc}\n")
        return EXIT_USAGE
    _emit(args, report.as_dict(), report.summary() + "\n")
    return EXIT_OK


def cmd_rearm(args: argparse.Namespace) -> int:
    """Re-arm an armed chain for its next boot."""
    _harden()
    from keyhandoff import update

    try:
        report = update.rearm(progress=_progress)
    except update.NotArmed as exc:
        if args.if_armed:
            return EXIT_OK
        sys.stderr.write(f"keyhandoff: {exc}\n")
        return EXIT_NOT_FOUND
    _emit(args, report.as_dict(), report.summary() + "\n")
    return EXIT_OK


def cmd_disarm(args: argparse.Namespace) -> int:
    """Wipe everything armed."""
    _harden()
    from keyhandoff import update

    counts = update.disarm(volumes=args.volumes)
    sys.stderr.write("keyhandoff: disarmed (" + ", ".join(
        f"{v} {k}" for k, v in counts.items()) + ")\n")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    """Arm for a scheduled offline update, or disarm a cancelled one (the path unit's)."""
    _harden()
    from keyhandoff import schedule

    report = schedule.reconcile()
    _emit(args, report.as_dict(), f"keyhandoff: {report.summary()}\n")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_restore(args: argparse.Namespace) -> int:
    """Boot time: load an armed record."""
    _harden()
    from keyhandoff import update

    report = update.restore(volumes=args.volumes, wait=args.wait)
    if report.refused:
        sys.stderr.write(f"keyhandoff: record refused: {report.refused}\n")
    sys.stderr.write(f"keyhandoff: restored {len(report.restored)} volume(s) "
                     f"(channel {report.channel or 'none'}), destroyed "
                     f"{report.keyslots_destroyed} stale one-time keyslot(s)\n")
    return EXIT_OK


def cmd_finish(args: argparse.Namespace) -> int:  # noqa: ARG001
    """Boot time, after the volumes opened."""
    _harden()
    from keyhandoff import config, update

    # a bad setting is logged and left out: it must not keep one-time keyslots alive
    report = update.finish(login_timeout=config.load_for_boot("finish").login_timeout)
    sys.stderr.write(f"keyhandoff: destroyed {report.keyslots_destroyed} one-time "
                     f"keyslot(s); login: {report.login}\n")
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
    volumes = [args.volume] if args.volume else [e.volume for e in cache.entries()]
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

    report = capture_once(retain=config.load_for_boot("capture-initrd").capture_timeout,
                          volumes=args.volumes)
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


def _cache_timeout(text: str) -> int:
    from keyhandoff.cache import MAX_TIMEOUT

    value = _positive_int(text)
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"at most {MAX_TIMEOUT} seconds (one day)")
    return value


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
    p.add_argument("--volume", required=True, metavar="UUID", help="LUKS UUID of the volume")
    p.add_argument("--timeout", type=_cache_timeout, default=600, metavar="S",
                   help="seconds until the kernel expires it (default 600, at most 86400)")
    p.set_defaults(func=cmd_cache_put)
    p = csub.add_parser("list", help="volumes with a cached passphrase and their time left")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache_list)
    p = csub.add_parser("forget", help="destroy cached passphrases")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--volume", metavar="UUID", help="LUKS UUID of the volume")
    g.add_argument("--all", action="store_true", help="every cached passphrase")
    p.set_defaults(func=cmd_cache_forget)

    p = sub.add_parser("arm", help="arm the handoff for the next boot(s) of an update")
    p.add_argument("--reboot", choices=["soft", "full"], required=True,
                   help="soft: systemctl soft-reboot (kernel keyring); full: EFI record")
    p.add_argument("--boots", type=_positive_int, default=1, metavar="N",
                   help="how many boots the handoff covers (default 1)")
    p.add_argument("--ttl", type=_duration, default=1800, metavar="DURATION",
                   help="deadline from now: 90s, 30m, 2h (default 30m, at most 1d)")
    p.add_argument("--login", action="store_true",
                   help="also hand the passphrase to the login path on the last boot")
    p.add_argument("--volume", action="append", metavar="PATH", dest="volumes",
                   help="a LUKS source path (repeatable; default: /etc/crypttab)")
    p.add_argument("--no-ask", action="store_true",
                   help="use only cached passphrases; never prompt")
    p.add_argument("--ask-timeout", type=_positive_int, default=90, metavar="S",
                   help="give up asking the password agents after S seconds (default 90)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_arm)
    p = sub.add_parser("rearm", help="inside an update boot: arm the chain's next boot")
    p.add_argument("--if-armed", action="store_true",
                   help="exit 0 quietly when nothing is armed (for the shutdown unit)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_rearm)
    p = sub.add_parser("disarm", help="wipe every record, key and one-time keyslot")
    p.add_argument("--volume", action="append", metavar="PATH", dest="volumes")
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
    from keyhandoff import config

    loaded = config.read(args.config, root=args.root)
    _say_problems(loaded.problems)
    _emit(args, config.as_dict(loaded), config.as_toml(loaded))
    return EXIT_ERROR if loaded.errors else EXIT_OK


def _add_boot_steps(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The subcommands the units run at boot."""
    p = sub.add_parser("restore", help="early boot: load an armed handoff (unit use)")
    p.add_argument("--volume", action="append", metavar="PATH", dest="volumes")
    p.add_argument("--wait", type=float, default=0, metavar="S",
                   help="when a record is there, wait up to S seconds for the devices")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("finish", help="after the volumes opened: destroy one-time keyslots, "
                       "login hand-off on the last boot (unit use)")
    p.set_defaults(func=cmd_finish)
    p = sub.add_parser("capture-initrd",
                       help="after the initramfs: cache the passphrases typed there, verified "
                       "(unit use)")
    p.add_argument("--volume", action="append", metavar="PATH", dest="volumes",
                   help="a LUKS source path to check (repeatable; default: /etc/crypttab "
                   "and every LUKS device)")
    p.set_defaults(func=cmd_capture_initrd)
    p = sub.add_parser("login-handoff",
                       help="hand a cached passphrase to the login path (unit use)")
    p.add_argument("--volume", metavar="UUID", help="whose passphrase (default: the first)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyhandoff`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidArgument as exc:  # a value the call does not accept: a usage error
        sys.stderr.write(f"keyhandoff: {exc}\n")
        return EXIT_USAGE
    except KeyhandoffError as exc:
        sys.stderr.write(f"keyhandoff: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"keyhandoff: {exc.strerror or exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
