"""The two kinds of failure the CLI turns into exit codes instead of tracebacks."""


class BertoptError(Exception):
    """Bad input or usage: the user can fix it. The CLI prints the message alone and exits 2."""

    exit_code = 2


class CheckFailed(BertoptError):
    """The tool ran, but a check it was asked to make did not hold (e.g. parity). Exit 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
