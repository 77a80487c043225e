"""The ``keyhandoff`` command line.

Exit codes: 0 success; 1 a refusal or error (one line on stderr); 2 usage error;
3 nothing found (``cache forget`` of a volume we hold nothing for).
Passphrases are read from stdin (one line, or all of it when not a tty) or asked on the
terminal without echo; never taken from the command line or the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from keyhandoff.errors import KeyhandoffError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from keyhandoff.secret import Secret

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
    from keyhandoff.secret import MAX_PASSPHRASE, Secret  # noqa: PLC0415  # lazy: start-up time

    limit = MAX_PASSPHRASE + 2  # room to see that it is too long, and a newline
    if os.isatty(sys.stdin.fileno()):
        import termios  # noqa: PLC0415  # only for interactive use

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
    from keyhandoff.status import collect  # noqa: PLC0415

    report = collect()
    _emit(args, report.as_dict(), report.as_text())
    return EXIT_OK


def cmd_cache_put(args: argparse.Namespace) -> int:
    """Store a passphrase for a volume, read from stdin or the terminal."""
    from keyhandoff.cache import PassphraseCache, normalize_uuid  # noqa: PLC0415

    volume = normalize_uuid(args.volume)  # refuse a bad UUID before asking for a passphrase
    with read_passphrase(f"Passphrase for {volume}: ") as secret:
        PassphraseCache().put(volume, secret, timeout=args.timeout)
    sys.stderr.write(f"keyhandoff: cached passphrase for {volume} for {args.timeout} s\n")
    return EXIT_OK


def cmd_cache_list(args: argparse.Namespace) -> int:
    """List cached volumes with the time the kernel leaves them."""
    from keyhandoff.cache import PassphraseCache  # noqa: PLC0415

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
    from keyhandoff.cache import PassphraseCache  # noqa: PLC0415

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = _Parser(prog="keyhandoff", description="Type the disk passphrase once.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("status", help="what the machine offers and what keyhandoff holds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    cache = sub.add_parser("cache", help="the per-volume passphrase cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    p = csub.add_parser("put", help="cache a passphrase (read from stdin or the terminal)")
    p.add_argument("--volume", required=True, metavar="UUID", help="LUKS UUID of the volume")
    p.add_argument("--timeout", type=_positive_int, default=600, metavar="S",
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

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: Later subsystems (agent, update, login) add their sub-commands here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[_Parser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyhandoff`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
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
