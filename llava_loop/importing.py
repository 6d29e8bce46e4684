"""Resolve ``package.module:attribute`` strings from the config (custom losses, hooks)."""

from __future__ import annotations

import importlib

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
