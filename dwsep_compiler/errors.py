"""The one error type a user sees: a one-line message naming the problem."""


class DwsepError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI exit code 2)."""

    exit_code = 2
