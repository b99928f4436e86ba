"""The one error type for bad data input.

Its message names the file (and line or field) and says the fix.
"""


class DataError(ValueError):
    """Bad input data or a corrupt dataset file; the message says where and what to do."""
