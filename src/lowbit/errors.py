"""The one exception type that lowbit raises for bad input; the CLI prints it as one line."""


class LowbitError(Exception):
    """A user-facing error: bad input, missing file, unknown preset. The message is the whole story."""
