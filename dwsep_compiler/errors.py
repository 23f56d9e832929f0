"""The one error type a user sees: a one-line message naming the problem."""


class DwsepError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI exit code 2)."""

    exit_code = 2


def first_line(exc: BaseException, last: bool = False) -> str:
    """One line of an exception's text for a one-line error message (tracebacks dropped).

    ``last``: the last line instead of the first (TVM errors end with "<Kind>: message").
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Traceback", "File "))]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:300]
