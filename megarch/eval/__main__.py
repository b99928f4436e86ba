"""``python -m megarch.eval`` is ``megarch-eval``."""

import sys

from megarch.eval.cli import main

sys.exit(main())
