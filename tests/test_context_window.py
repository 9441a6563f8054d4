"""A model's context window, checked before sending: reduce groups split by what fits
in it, and a prompt that clearly cannot fit is an error row that costs nothing.

Real runs of the CLI against the simulator, which is given the same window and
rejects a longer prompt as a provider does: so "nothing oversized was sent" is
measured where a request would fail, and "not sent" by its request count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import make_job, reviews, run_cli
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import context_window
from pipeline.errors import SpecError
from pipeline.render import WINDOW_MARGIN, over_window
from pipeline.simulator import RunningSimulator
from pipeline.spec import ModelSpec, parse_spec
from pipeline.steps_reduce import packed

WINDOW = 600  # tokens: a group of 20 review rows (~480 tokens as JSON) does not fit
SUMMARY = "Summarise {{ rows|length }}: {% for r in rows %}{{ r.text }} {% endfor %}"


def per_product(**reduce: Any) -> dict[str, Any]:
    return {
        "name": "per_product",
        "reduce": {"by": "product", **reduce},
        "prompt": {"template": SUMMARY},
    }


def reduce_job(
    workdir: Path, simulator: RunningSimulator, data: pl.DataFrame, **reduce: Any
) -> Path:
    data.write_csv(workdir / "reviews.csv")
    return make_job(
        workdir,
        simulator,
        prompt=None,
        steps=[per_product(**reduce)],
        model__context_window=WINDOW,
    )


def long_reviews(rows: int) -> pl.DataFrame:
    """Reviews whose texts make a 20-row group's prompt bigger than the window."""
    return reviews(rows).with_columns(
        pl.col("text") + " " + pl.lit("It arrived on time and works as described. " * 2)
    )


def parts_of(workdir: Path) -> pl.DataFrame:
    return pl.read_parquet(
        workdir / "out" / "result.parquet.run" / "steps" / "per_product" / "output.parquet"
    )


def test_a_group_over_the_window_is_split_and_combined_without_a_budget(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 60
    simulator.configure(context_window=WINDOW)
    job = reduce_job(tmp_path, simulator, long_reviews(rows))

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    parts = parts_of(tmp_path)
    split = {label for label, n in parts.group_by("product").agg(pl.len()).iter_rows() if n > 1}
    assert split == {"kettle", "lamp", "shoes"}
    assert int(parts.get_column("rows").list.len().sum()) == rows  # no row cut or lost
    stats = simulator.stats(full=False)
    assert stats["requests"] == stats["completions"] == parts.height + len(split)
    reduced = pl.read_parquet(tmp_path / "out" / "result.per_product.parquet")
    assert reduced.height == 3
    assert reduced.get_column("error").null_count() == 3
    assert all("Combine these" in text for text in reduced.get_column("response"))


def test_a_group_that_fits_is_sent_whole(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = reduce_job(tmp_path, simulator, reviews(30))

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert parts_of(tmp_path).height == 3
    assert simulator.stats(full=False)["completions"] == 3


def test_a_row_bigger_than_the_window_is_an_error_row_and_never_sent(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 60
    huge = "This kettle is the worst thing I ever bought. " * 200  # ~2,300 tokens
    data = long_reviews(rows).with_columns(
        pl.when(pl.col("review_id") == "R003")
        .then(pl.lit(huge))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    simulator.configure(context_window=WINDOW)
    job = reduce_job(tmp_path, simulator, data)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    parts = parts_of(tmp_path)
    refused = parts.filter(pl.col("error").is_not_null())
    assert refused.height == 1
    assert refused.get_column("rows").list.len().item() == 1
    assert refused.get_column("attempts").item() == 0
    assert refused.get_column("cost_usd").fill_null(0).item() == 0
    # the kettle group is not combined without the refused part; the others are
    stats = simulator.stats(full=False)
    assert stats["requests"] == stats["completions"] == parts.height - 1 + 2
    reduced = pl.read_parquet(tmp_path / "out" / "result.per_product.parquet")
    kettle = reduced.filter(pl.col("product") == "kettle")
    error = kettle.get_column("error").item()
    # R003 is the kettle group's second row: the first part is R000 alone
    assert error.startswith("part 2 of ")
    assert "context_window_exceeded" in error and f"{WINDOW:,}" in error
    assert "x-ai-grok-3-mini" in error and "nothing was sent" in error
    assert kettle.get_column("response").item() is None
    assert reduced.get_column("error").null_count() == 2


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"context_window": WINDOW}, "context window of 600 tokens"),
        ({}, "context window of 131,072 tokens"),  # configs/pricing.yaml's
    ],
)
def test_validate_refuses_a_budget_over_the_window(
    tmp_path: Path, model: dict[str, Any], message: str
) -> None:
    reviews(6).write_csv(tmp_path / "reviews.csv")
    step = per_product(max_prompt_tokens=200_000)
    window = {f"model__{key}": value for key, value in model.items()}
    job = make_job(tmp_path, None, prompt=None, steps=[step], **window)

    done = run_cli("validate", str(job), cwd=tmp_path)

    assert done.returncode == 2
    assert "steps.per_product.reduce.max_prompt_tokens" in done.stderr
    assert "x-ai-grok-3-mini" in done.stderr and message in done.stderr


def test_a_plain_row_over_the_window_is_an_error_row_and_never_sent(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 10
    huge = "word " * 2000  # ~2,500 tokens by the estimate: over 1.5x a 600-token window
    data = reviews(rows).with_columns(
        pl.when(pl.col("review_id") == "R004")
        .then(pl.lit(huge))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    simulator.configure(context_window=WINDOW)
    job = make_job(tmp_path, simulator, model__context_window=WINDOW)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    refused = out.filter(pl.col("error").is_not_null())
    assert refused.get_column("review_id").to_list() == ["R004"]
    assert "context_window_exceeded" in refused.get_column("error").item()
    stats = simulator.stats(full=False)
    assert stats["requests"] == stats["completions"] == rows - 1


def test_the_simulator_rejects_a_prompt_over_its_window_as_a_provider_does(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # The model's window is unknown to the job, so the row is sent and the server says no.
    data = reviews(3).with_columns(pl.lit("word " * 400).alias("text"))
    data.write_csv(tmp_path / "reviews.csv")
    simulator.configure(context_window=100)
    job = make_job(tmp_path, simulator, model__model="sim-unknown")
    simulator.configure(accept_any_model=True)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.get_column("error").null_count() == 0
    assert all("context" in error for error in out.get_column("error"))
    assert out.get_column("attempts").to_list() == [1, 1, 1]  # not retried
    assert simulator.stats(full=False)["completions"] == 0


def test_the_window_comes_from_the_job_else_the_models_entry() -> None:
    assert context_window(ModelSpec(provider="openai", model="gpt-4o")) == 128_000
    assert context_window(ModelSpec(provider="openai", model="gpt-4o", context_window=9)) == 9
    assert context_window(ModelSpec(provider="openai", model="unheard-of")) is None
    with pytest.raises(SpecError, match=r"model\.context_window"):
        parse_spec(
            {
                "input": {"path": "x.csv"},
                "model": {"provider": "openai", "model": "m", "context_window": 0},
                "prompt": {"template": "x"},
                "name": "j",
            }
        )


def test_a_prompt_is_refused_only_past_the_margin() -> None:
    assert not over_window(int(1000 * WINDOW_MARGIN), 1000)
    assert over_window(int(1000 * WINDOW_MARGIN) + 1, 1000)
    assert not over_window(10**9, None)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=500), max_size=60),
    budget=st.integers(min_value=-10, max_value=1000),
)
def test_packing_keeps_every_row_in_order_and_each_part_within_budget(
    sizes: list[int], budget: int
) -> None:
    rows = [{"n": n} for n in range(len(sizes))]
    parts = packed(rows, sizes, budget)
    assert [row for part in parts for row in part] == rows
    assert all(part for part in parts) or rows == []
    for part in parts:
        used = sum(sizes[row["n"]] for row in part)
        assert used <= budget or len(part) == 1
