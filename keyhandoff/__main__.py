"""``python -m keyhandoff``: the same as the ``keyhandoff`` command."""

import sys

from keyhandoff.cli import main

sys.exit(main())
