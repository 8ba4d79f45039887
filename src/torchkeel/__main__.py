"""``python -m torchkeel``."""

from __future__ import annotations

import sys

from torchkeel.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
