"""gradwatch: training-dynamics telemetry, guards and alerts for PyTorch on Ray.

`import gradwatch` gives the training API (`gradwatch.start()`, README "Your own training loop");
the submodules hold what the service and the workers share: the job spec (`gradwatch.spec`), the
names (`gradwatch.names`), job ids (`gradwatch.ids`) and the driver's status and result
(`gradwatch.status`). The training API imports torch, so it loads on first use: the service,
which never imports torch, can import the shared modules cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.training import MAX_NAMED_SERIES, DivergenceStop, GuardedOptimizer, Run, current, start

__all__ = ["MAX_NAMED_SERIES", "DivergenceStop", "GuardedOptimizer", "Run", "current", "start"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradwatch import training

        return getattr(training, name)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
