"""``python -m megarch.convert``: the same as ``megarch-convert``."""

import sys

from megarch.convert.cli import main

sys.exit(main())
