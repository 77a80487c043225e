"""The volumes an update must unlock: ``/etc/crypttab`` entries that prompt for a passphrase.

Only entries without a key file (``-``, ``none`` or empty) are ours: a volume opened with a
key file or a token needs no handoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["CrypttabEntry", "parse", "read"]

DEFAULT_PATH: Final = "/etc/crypttab"
_NO_KEYFILE: Final = frozenset({"", "-", "none"})


@dataclass(frozen=True, slots=True)
class CrypttabEntry:
    """One line: mapper name, source as written, key file, options."""

    name: str
    source: str
    keyfile: str
    options: tuple[str, ...]

    @property
    def prompts(self) -> bool:
        """Whether systemd-cryptsetup asks a person for this volume's passphrase."""
        return self.keyfile in _NO_KEYFILE and not any(
            o == "tpm2-device" or o.startswith(("tpm2-device=", "fido2-device", "pkcs11-uri"))
            for o in self.options
        )

    @property
    def header(self) -> str | None:
        """The detached LUKS header of ``header=<path>``, else ``None`` (it is in the source)."""
        for o in self.options:
            if o.startswith("header="):
                return o.removeprefix("header=") or None
        return None

    @property
    def luks_path(self) -> str:
        """Where the LUKS header is read and written: ``header=``, else the source path."""
        return self.header or self.source_path

    def option(self, name: str) -> bool:
        """Whether the flag option ``name`` (``noauto``, ``nofail``...) is given."""
        return name in self.options

    @property
    def source_path(self) -> str:
        """The source as a path: ``UUID=x`` becomes ``/dev/disk/by-uuid/x`` (as systemd does)."""
        for tag, directory in (("UUID=", "by-uuid"), ("PARTUUID=", "by-partuuid"),
                               ("LABEL=", "by-label"), ("PARTLABEL=", "by-partlabel")):
            if self.source.startswith(tag):
                return f"/dev/disk/{directory}/{self.source[len(tag):]}"
        return self.source


def parse(text: str) -> list[CrypttabEntry]:
    """Parse crypttab text (comments and blank lines skipped, malformed lines ignored)."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:  # name and source are required
            continue
        keyfile = fields[2] if len(fields) > 2 else ""
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ()
        out.append(CrypttabEntry(fields[0], fields[1], keyfile, options))
    return out


def read(path: str = DEFAULT_PATH) -> list[CrypttabEntry]:
    """The prompting entries of the crypttab file (none when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [e for e in parse(f.read()) if e.prompts]
    except FileNotFoundError:
        return []
