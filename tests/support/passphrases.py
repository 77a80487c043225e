"""Distinctive test passphrases.

Every passphrase a test uses comes from :func:`make`, so one marker finds any of them in
output, logs, files and process environments (the leak scans in conftest and .ci).
"""

from __future__ import annotations

import secrets

MARKER = b"khTESTpw-"


def make(label: str = "") -> bytes:
    """A fresh passphrase: the marker, a label and 8 random hex digits."""
    return MARKER + label.encode() + b"-" + secrets.token_hex(4).encode()
