"""`GradwatchCallback` for the transformers Trainer (the runtime's, loaded on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch._lazy import reexport

if TYPE_CHECKING:
    from workers.integrations.transformers import GradwatchCallback

__all__ = ["GradwatchCallback"]


__getattr__ = reexport(__name__, "workers.integrations.transformers", __all__)
