"""gradwatch: training-dynamics telemetry, guards and alerts for PyTorch on Ray.

`import gradwatch` gives the training API (`gradwatch.start()`, docs/training-api.md);
the submodules hold what the service and the workers share: the job spec (`gradwatch.spec`), the
names (`gradwatch.names`), job ids (`gradwatch.ids`) and the driver's status and result
(`gradwatch.status`). The training API is the runtime's (`workers.training`); this package only
re-exports it, loaded on first use, so the contract imports neither `workers` nor `service` nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch._lazy import reexport

if TYPE_CHECKING:
    from workers.training import MAX_NAMED_SERIES, DivergenceStop, GuardedOptimizer, Run, current, start

__all__ = ["MAX_NAMED_SERIES", "DivergenceStop", "GuardedOptimizer", "Run", "current", "start"]

__getattr__ = reexport("gradwatch", "workers.training", __all__)
