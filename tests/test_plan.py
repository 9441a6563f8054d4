"""The plan: which rows need a request, and in which order a resumed run sends them."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.checkpoint import Checkpoint
from pipeline.inputs import InputTable
from pipeline.plan import WorkPlan
from pipeline.render import PromptRenderer
from pipeline.spec import PromptSpec
from pipeline.types import ChatRequest, Completion, RowResult, Usage


def make_plan(tmp_path: Path, rows: int, **fields: object) -> WorkPlan:
    pl.DataFrame({"id": list(range(rows)), "text": [f"t{i}" for i in range(rows)]}).write_parquet(
        tmp_path / "in.parquet"
    )
    table = InputTable(str(tmp_path / "in.parquet"), "id")
    checkpoint = Checkpoint(tmp_path / "run" / "checkpoint.sqlite")
    renderer = PromptRenderer(PromptSpec(template="{{ text }}"))
    return WorkPlan(table, renderer, checkpoint, "m", {}, **fields)  # type: ignore[arg-type]


def finish(plan: WorkPlan, indices: set[int]) -> None:
    done = Completion("x", None, Usage(1, 1, 0, 0, 2), "stop", "m")
    requests = [r for r in plan.requests() if isinstance(r, ChatRequest) and r.index in indices]
    plan.checkpoint.write(
        [RowResult(r.index, r.key, r.request_hash, 1, 0.1, completion=done) for r in requests]
    )


def test_a_resume_starts_where_planning_stopped_and_misses_nothing(tmp_path: Path) -> None:
    first = make_plan(tmp_path, 50)
    finish(first, set(range(0, 30)) - {12, 27})  # 12 and 27 were in flight at the kill

    resumed = make_plan(tmp_path, 50, start_at=30)
    order = [r.index for r in resumed.requests()]

    assert order == [*range(30, 50), 12, 27]
    assert resumed.reused == 28


def test_without_a_cursor_rows_come_in_input_order(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, 30)
    finish(plan, {3, 4, 5})

    fresh = make_plan(tmp_path, 30)

    assert [r.index for r in fresh.requests()] == [i for i in range(30) if i not in {3, 4, 5}]


def test_the_cursor_follows_planning(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, 10)
    requests = plan.requests()

    next(requests), next(requests), next(requests)

    assert plan.cursor == 2
