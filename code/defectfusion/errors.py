"""User-facing errors.

A `UserError` is a problem with the user's input (a path, a file, a config, a
checkpoint). The CLI prints its message as one line and exits non-zero, with no
traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit code 2."""
