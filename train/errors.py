"""The one error type the command line turns into a clear message and a non-zero exit."""


class UsageError(Exception):
    """A user mistake (bad path, bad data, bad option): reported as one line, never a traceback."""
