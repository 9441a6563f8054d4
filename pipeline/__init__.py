"""pipeline: run an LLM prompt over every row of a table, fast, safely and resumably.

import pipeline
job = pipeline.Job.from_yaml("jobs/classify.yaml")
results = pipeline.run(job, data=frame)         # a polars DataFrame back
results = await pipeline.arun(job, data=frame)  # inside a running event loop
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BudgetExceeded",
    "Job",
    "JobFatalError",
    "PipelineError",
    "RowResult",
    "RunFailed",
    "SpecError",
    "arun",
    "run",
]

_EXPORTS = {
    "Job": "pipeline.api",
    "RunFailed": "pipeline.api",
    "arun": "pipeline.api",
    "run": "pipeline.api",
    "RowResult": "pipeline.types",
    "BudgetExceeded": "pipeline.errors",
    "JobFatalError": "pipeline.errors",
    "PipelineError": "pipeline.errors",
    "SpecError": "pipeline.errors",
}

if TYPE_CHECKING:
    from pipeline.api import Job, RunFailed, arun, run
    from pipeline.errors import BudgetExceeded, JobFatalError, PipelineError, SpecError
    from pipeline.types import RowResult


def __getattr__(name: str) -> Any:
    # Imported on first use, so `pipeline.simulator` and the CLI's --help stay light.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
