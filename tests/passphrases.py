"""Where tests/vm (demo.py, test_cryptsetup_retry.py, the guest's cryptsetup_retry.py) finds
the test passphrases: they put tests/ on ``sys.path`` and import ``passphrases``.  The
module itself is tests/support/passphrases.py."""

from support.passphrases import MARKER, make

__all__ = ["MARKER", "make"]
