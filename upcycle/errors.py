"""The one exception type that the CLI turns into a one-line message."""


class UpcycleError(Exception):
    """A user-facing error: its message names the problem and the fix, on one line."""
