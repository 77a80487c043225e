"""Configuration files for a test, without touching the machine's.

:func:`put` writes one file under a root (a scratch tree that ``config.read(root=...)``
reads).  :func:`etc_overlay` gives a command line prefix that runs a command in a private
mount namespace whose /etc is an overlay with the test's files over the machine's /etc, and
whose /run/keyhandoff is a private tmpfs: the boot steps mark themselves done once per boot
there, and a mark left on the machine would turn every later run into a no-op.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from support.parts import require_binary

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


def put(root: Path, rel: str, text: str | bytes) -> Path:
    """Write ``text`` at ``root/rel``, making its directories."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@contextlib.contextmanager
def etc_overlay(files: Mapping[str, str | bytes]) -> Iterator[list[str]]:
    """``[unshare, ..., "sh"]``: prefix a command to run it with ``files`` in its /etc."""
    with tempfile.TemporaryDirectory(prefix="kh-test-etc-") as d:
        upper, work = Path(d, "upper"), Path(d, "work")
        upper.mkdir()
        work.mkdir()
        for rel, text in files.items():
            put(upper, rel, text)
        unshare = require_binary("unshare", "apt-get install util-linux")
        script = ("mkdir -p -m 0700 /run/keyhandoff && "
                  "mount -t tmpfs -o mode=0700 keyhandoff-test /run/keyhandoff && "
                  f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} "
                  '/etc && exec "$@"')
        yield [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
