"""The one exception type users see.

Anything raised as `SortedError` is a problem with the user's input or environment (bad model id, exit out
of range, malformed data row...). The CLI prints its message as one line on stderr and exits with code 2;
everything else is a bug and keeps its traceback.
"""


class SortedError(Exception):
    """A user-facing problem: the message names it and, where possible, the fix."""

    exit_code = 2
