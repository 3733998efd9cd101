"""A module's names served from a runtime module on first use (the contract package imports no runtime)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def reexport(module: str, target: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `module` that loads `names` from `target` when first asked for."""
    served = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in served:
            return getattr(importlib.import_module(target), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
