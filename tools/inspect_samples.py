#!/usr/bin/env python3
"""Same as `megarch-data inspect`: see `megarch-data inspect --help`."""

import sys

from megarch.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
