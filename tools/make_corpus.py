#!/usr/bin/env python3
"""Same as `megarch-data corpus`: see `megarch-data corpus --help`."""

import sys

from megarch.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["corpus", *sys.argv[1:]]))
