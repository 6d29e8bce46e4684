"""Turn the config's ``module:attribute`` names (losses, hooks, setup functions) into callables."""

from __future__ import annotations

import functools
import importlib
import inspect

from .errors import UserError

# config names that moved, and where to: refused with the new name rather than a bare "no attribute"
MOVED = {"llava_loop.hooks:LmmsEval": "llava_loop.lmms:LmmsEval"}


def resolve(spec: str, what: str):
    if spec in MOVED:
        raise UserError(f"{what} {spec!r} has moved: name it {MOVED[spec]}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


# What the caller passes a config callable besides its ``kwargs``: positional argument names, and keywords it passes
# where the callable declares them (losses.make_loss passes ``state``, the loop ``reference``, to a loss that takes it).
CALLED_WITH = {"hook": ((), ()), "loss": (("model", "batch"), ("state", "reference")), "setup": (("cfg",), ())}


def bind(call, what: str):
    """The callable a config ``Call`` names, with its ``kwargs`` bound once. A keyword it does not take, or a
    required argument the config leaves out, fails here, at startup, naming the function and what it takes."""
    target = resolve(call.fn, what)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return functools.partial(target, **call.kwargs) if call.kwargs else target
    try:
        signature.bind_partial(**call.kwargs)
    except TypeError as exc:
        raise UserError(f"{what} {call.fn}: {exc} (it takes {signature})") from None
    positional, supplied = CALLED_WITH.get(what, ((), ()))
    given = {name: None for name in supplied if name in signature.parameters}
    try:
        signature.bind(*positional, **given, **call.kwargs)
    except TypeError as exc:
        if "missing" not in str(exc):
            raise UserError(
                f"{what} {call.fn}: {exc} (it takes {signature}, and is called with "
                f"({', '.join(positional)}) plus the config's kwargs)"
            ) from None
        example = ", ".join(
            f"{p.name}: ..."
            for p in signature.parameters.values()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in positional
            and p.name not in given
            and p.name not in call.kwargs
        )
        raise UserError(
            f"{what} {call.fn}: {exc} (it takes {signature}); give it in the config: "
            f"{{fn: {call.fn}, kwargs: {{{example}}}}}"
        ) from None
    return functools.partial(target, **call.kwargs) if call.kwargs else target
