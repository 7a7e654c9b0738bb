"""User-facing errors.

`CRTError` carries a one-line message that names the problem and the fix. The CLI prints
it without a traceback and exits non-zero; library callers can catch it like any exception.
"""


class CRTError(Exception):
    """A problem with the user's input (data, config, checkpoint), not a bug in crt."""
