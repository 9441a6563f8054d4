"""Prompt caching: the stable prefix marked cacheable, and cache reads and writes each
billed at their own price."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import make_job, run_cli

from pipeline.config import Price, resolve_provider
from pipeline.http import HttpClient
from pipeline.providers import create_provider
from pipeline.simulator import RunningSimulator, estimate_prompt_tokens, expected_response
from pipeline.spec import ModelSpec
from pipeline.types import ChatRequest, Usage

MODEL = "x-ai-grok-3-mini"
PRICING = {"input": 3.0, "cached_input": 0.3, "cache_write": 3.75, "output": 15.0}
SYSTEM = "You label product reviews. " + "Follow the house style guide closely. " * 120


def test_cache_writes_and_reads_are_priced_at_their_own_rates() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    usage = Usage(
        prompt_tokens=1_300,
        completion_tokens=100,
        cached_tokens=1_000,
        cache_write_tokens=200,
        total_tokens=1_400,
    )

    assert price.cost(usage) == pytest.approx(
        (100 * 3.0 + 1_000 * 0.3 + 200 * 3.75 + 100 * 15.0) / 1e6
    )
    # Without a write price, writes cost what input costs.
    plain = Price(input=3.0, output=15.0, cached_input=0.3)
    assert plain.cost(usage) == pytest.approx((300 * 3.0 + 1_000 * 0.3 + 100 * 15.0) / 1e6)


def body_for(provider: str, messages: list[dict[str, str]], **options: Any) -> dict[str, Any]:
    spec = ModelSpec(
        provider=provider, model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, **options
    )
    adapter = create_provider(resolve_provider(spec), HttpClient(1, 10))
    return adapter.request_body(ChatRequest(0, "r", messages, "h", 10, 10))


FEW_SHOT = [
    {"role": "system", "content": "Label it."},
    {"role": "user", "content": "Great kettle!"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "The lamp broke."},
]


def test_anthropic_marks_the_end_of_the_stable_prefix() -> None:
    with_turns = body_for("anthropic", FEW_SHOT, prompt_cache=True)
    system_only = body_for("anthropic", [FEW_SHOT[0], FEW_SHOT[3]], prompt_cache=True)

    ephemeral = {"type": "ephemeral"}
    assert with_turns["system"] == "Label it."
    assert with_turns["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "positive", "cache_control": ephemeral}],
    }
    assert with_turns["messages"][2] == FEW_SHOT[3]  # the row's own message: never marked
    assert system_only["system"] == [
        {"type": "text", "text": "Label it.", "cache_control": ephemeral}
    ]
    assert "cache_control" not in str(body_for("anthropic", FEW_SHOT))


def test_openai_sends_a_cache_key_naming_the_prefix() -> None:
    first = body_for("openai", FEW_SHOT, prompt_cache=True)
    other_row = body_for(
        "openai", [*FEW_SHOT[:3], {"role": "user", "content": "Nice."}], prompt_cache=True
    )
    named = body_for("openai", FEW_SHOT, prompt_cache="reviews-v2")

    assert first["prompt_cache_key"] == other_row["prompt_cache_key"]
    assert named["prompt_cache_key"] == "reviews-v2"
    assert "prompt_cache_key" not in body_for("openai", FEW_SHOT)
    assert "prompt_cache_key" not in body_for("xai", FEW_SHOT, prompt_cache=True)


@pytest.mark.parametrize("mode", ["plain", "stream", "batch"])
def test_anthropic_rows_write_the_prefix_once_then_read_it(
    tmp_path: Path, simulator: RunningSimulator, mode: str
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    texts = [f"Review {i}: it works." for i in range(5)]
    pl.DataFrame({"review_id": [f"R{i}" for i in range(5)], "text": texts}).write_csv(
        tmp_path / "reviews.csv"
    )
    extra: dict[str, Any] = {"model__stream": True} if mode == "stream" else {}
    if mode == "batch":
        extra.update(model__batch=True, model__batch_poll_s=0.1)
    job = make_job(
        tmp_path,
        simulator,
        model__provider="anthropic",
        model__base_url=simulator.url,
        model__prompt_cache=True,
        model__pricing=PRICING,
        prompt__system=SYSTEM,
        **extra,
    )

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    prefix = estimate_prompt_tokens([{"role": "system", "content": SYSTEM}])
    assert sorted(out["cache_write_tokens"].to_list()) == [0, 0, 0, 0, prefix]
    price = Price(**{k: float(v) for k, v in PRICING.items()})
    for row in out.iter_rows(named=True):
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Summarize: {row['text']}"},
        ]
        assert row["response"] == expected_response(MODEL, messages)  # same answer, cached or not
        assert row["prompt_tokens"] == estimate_prompt_tokens(messages)
        assert row["cached_tokens"] + row["cache_write_tokens"] == prefix
        usage = Usage(
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            cached_tokens=row["cached_tokens"],
            cache_write_tokens=row["cache_write_tokens"],
            total_tokens=row["total_tokens"],
        )
        factor = 0.5 if mode == "batch" else 1.0
        assert math.isclose(row["cost_usd"], price.cost(usage) * factor, rel_tol=1e-9)


def test_a_prefix_that_changes_per_row_is_refused(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    pl.DataFrame({"review_id": ["a"], "text": ["x"]}).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path, simulator, model__prompt_cache=True, prompt__system="About {{ text }}."
    )

    result = run_cli("validate", str(job), cwd=tmp_path)

    assert result.returncode == 2
    assert "prompt.system uses row variables" in result.stderr
    assert simulator.stats()["requests"] == 0
