"""Turn the config's ``module:attribute`` names (losses, hooks, setup functions) into callables."""

from __future__ import annotations

import functools
import importlib
import inspect

from .errors import UserError


def resolve(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def bind(call, what: str):
    """The callable a config ``Call`` names, with its ``kwargs`` bound once; a keyword it does not take fails
    here, at startup, naming the function and what it accepts."""
    target = resolve(call.fn, what)
    if not call.kwargs:
        return target
    signature = inspect.signature(target)
    try:
        signature.bind_partial(**call.kwargs)
    except TypeError as exc:
        raise UserError(f"{what} {call.fn}: {exc} (it takes {signature})") from None
    return functools.partial(target, **call.kwargs)
