"""pipeline: run an LLM prompt over every row of a table, fast, safely and resumably.

import pipeline
job = pipeline.Job.from_yaml("jobs/classify.yaml")
results = pipeline.run(job, data=frame)         # a polars DataFrame back
results = await pipeline.arun(job, data=frame)  # inside a running event loop
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

_FREED_AT_ONCE = "dirty_decay_ms:0,muzzy_decay_ms:0"
_POLARS_DEFAULTS = {"dirty_decay_ms:500", "muzzy_decay_ms:1000"}  # what `import polars` sets


def _return_freed_memory() -> None:
    """Memory a step has freed goes back to the operating system at once.

    polars allocates through its own jemalloc, which otherwise keeps freed pages
    resident for a while (the input check's memory then sits under the start of the
    run), and pyarrow's default pool keeps what the output assembly freed: together
    30-50 MB of a million-row run's peak (docs/BENCHMARKS.md). Both settings are read
    when the library first allocates, so they are made before polars or pyarrow is
    imported. A choice already in the environment wins; polars' own defaults, passed
    on by a parent process that imported polars, are not a choice.
    """
    inherited = os.environ.get("_RJEM_MALLOC_CONF", "").split(",")
    chosen = [option for option in inherited if option and option not in _POLARS_DEFAULTS]
    if not any("decay_ms" in option for option in chosen):
        os.environ["_RJEM_MALLOC_CONF"] = ",".join([*chosen, _FREED_AT_ONCE])
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


_return_freed_memory()

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
