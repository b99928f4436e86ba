#!/usr/bin/env python3
"""Same as `megarch-data train-tokenizer`: see `megarch-data train-tokenizer --help`."""

import sys

from megarch.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
