"""``python -m megarch.data`` is ``megarch-data``."""

import sys

from megarch.cli.data import main

sys.exit(main())
