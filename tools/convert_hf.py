#!/usr/bin/env python3
"""Same as `megarch-convert`: see `megarch-convert --help` (from-hf, to-hf)."""

import sys

from megarch.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
