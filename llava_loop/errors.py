"""Errors a user can act on; the CLI prints these without a traceback."""


class UserError(ValueError):
    """Bad input, config or checkpoint; the message names the file/record/key and the fix."""


class BuildError(UserError):
    """The inputs to ``build`` cannot be composed; the message says which input and why."""
