#!/usr/bin/env python3
"""Same as `megarch-data preprocess`: see `megarch-data preprocess --help`."""

import sys

from megarch.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
