"""What Ray Train runs on every rank of a job whose spec names its own training function.

It hands the rank the job (id, spec, job board) for `gradwatch.start()` to pick up, calls the
function with the spec's `train.config`, and ends the run when the function returns.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from gradwatch.spec import EntrypointTrain, JobSpec
from workers.board import BoardClient
from workers.data import load_factory
from workers.training import JobContext, current, enter_job


def train_function_per_worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = JobSpec.model_validate(config["spec"], context={"user_code": "skip"})
    assert isinstance(spec.train, EntrypointTrain)
    job_id = config["job_id"]
    enter_job(
        JobContext(
            spec=spec,
            job_id=job_id,
            board=BoardClient.connect(job_id),
            run_dir=Path(config["run_dir"]) if config.get("run_dir") else None,
            serve_metrics=config.get("serve_metrics", True),
        )
    )
    function = load_factory(spec.train.entrypoint)
    try:
        function(copy.deepcopy(spec.train.config))
        run = current()
        if run is None:
            raise RuntimeError(
                f"{spec.train.entrypoint} returned without calling gradwatch.start(): a training "
                "function reports its steps through gradwatch (see docs/training-api.md)"
            )
        run.finish()
    finally:
        run = current()
        if run is not None:
            run.close()
        enter_job(None)
