"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class MetarunError(Exception):
    """Bad input or environment: the message names the problem and the fix, in one line."""

    exit_code = 2


class DataError(MetarunError):
    """Data missing, corrupt, or incompatible with the requested episodes."""
