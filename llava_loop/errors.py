"""Errors a user can act on; the CLI prints these without a traceback."""


class UserError(ValueError):
    """Bad input, config or checkpoint; the message names the file/record/key and the fix."""


class BuildError(UserError):
    """The inputs to ``build`` cannot be composed; the message says which input and why."""


def size_text(n: float) -> str:
    """A byte count as people read it in a message: ``4.7 MB``, ``1.25 GB``, ``512 B``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
