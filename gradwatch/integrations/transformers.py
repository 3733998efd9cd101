"""`GradwatchCallback` for the transformers Trainer (the runtime's, loaded on first use)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.integrations.transformers import GradwatchCallback

__all__ = ["GradwatchCallback"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("workers.integrations.transformers"), name)
    raise AttributeError(f"module 'gradwatch.integrations.transformers' has no attribute {name!r}")
