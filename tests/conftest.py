"""Shared test setup."""

import os
import warnings

# Kernel tests run the Triton interpreter on CPU; it must be set before any kernel is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
