#!/usr/bin/env python3
"""Same as `megarch-data merge`: see `megarch-data merge --help`."""

import sys

from megarch.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
