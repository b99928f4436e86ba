"""``python -m megarch.study``: the same as ``megarch-study``."""

import sys

from megarch.study.cli import main

sys.exit(main())
