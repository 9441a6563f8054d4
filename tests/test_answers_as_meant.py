"""Every valid answer stored as the provider meant it: the real CLI against the simulator.

Refusals, paused turns, answers cut by max_tokens (inside a tool call's JSON too),
usage a stream reports in pieces or with null fields, thinking tokens: each is stored
with the finish reason and usage the body says, on both protocols, plain, streamed and
through the batch APIs, and no answer is paid for twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import SIM_KEY, make_job, messages_for, run_cli

from pipeline.simulator import (
    PAUSE_TEXT,
    REFUSAL_TEXT,
    RunningSimulator,
    estimate_prompt_tokens,
    expected_response,
)

MODEL = "x-ai-grok-3-mini"
MODES = ["plain", "stream", "batch"]
PROTOCOLS = ["openai", "anthropic"]
TEXTS = {
    "ok": "the kettle boils fast",
    "refuse": "the lamp [[sim:refuse]]",
    "pause": "the shoes [[sim:pause]]",
    "length": "the bag [[sim:length]]",
}


def mode_overrides(simulator: RunningSimulator, protocol: str, mode: str) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if protocol == "anthropic":
        extra.update(model__provider="anthropic", model__base_url=simulator.url)
    if mode == "stream":
        extra["model__stream"] = True
    if mode == "batch":
        extra.update(model__batch=True, model__batch_poll_s=0.1)
    return extra


def run_rows(
    workdir: Path,
    simulator: RunningSimulator,
    texts: dict[str, str],
    name: str,
    *,
    exit_code: int,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Run one job over `texts` (id -> text); its output rows by id."""
    pl.DataFrame({"review_id": list(texts), "text": list(texts.values())}).write_csv(
        workdir / f"{name}.csv"
    )
    job = make_job(
        workdir,
        simulator,
        name=name,
        input_path=f"{name}.csv",
        output__path=f"out/{name}.parquet",
        **overrides,
    )
    result = run_cli("run", str(job), "--quiet", cwd=workdir)
    assert result.returncode == exit_code, result.stderr
    out = pl.read_parquet(workdir / "out" / f"{name}.parquet")
    return {row["review_id"]: row for row in out.iter_rows(named=True)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_refusals_paused_turns_and_cut_answers_are_stored_as_sent(
    tmp_path: Path, simulator: RunningSimulator, protocol: str, mode: str
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    texts = (
        dict(TEXTS) if protocol == "anthropic" else {k: v for k, v in TEXTS.items() if k != "pause"}
    )
    name = f"{protocol}-{mode}"

    rows = run_rows(
        tmp_path, simulator, texts, name, exit_code=1, **mode_overrides(simulator, protocol, mode)
    )

    ok = rows["ok"]
    assert ok["error"] is None and ok["finish_reason"] == "stop"
    assert ok["response"] == expected_response(MODEL, messages_for(ok["text"]))
    refused = rows["refuse"]
    assert refused["finish_reason"] == "refusal"
    assert refused["response"] == REFUSAL_TEXT
    assert refused["error"].startswith("refused")
    assert refused["completion_tokens"] > 0  # the refusal was paid for: its usage is kept
    cut = rows["length"]
    assert cut["error"] is None and cut["finish_reason"] == "length"
    if protocol == "anthropic":
        paused = rows["pause"]
        assert paused["finish_reason"] == "pause_turn"
        assert paused["response"] == PAUSE_TEXT  # the server tool's call is not text
        assert paused["error"].startswith("paused_turn")
    assert all(row["attempts"] == 1 for row in rows.values())
    assert simulator.stats()["duplicate_paid"] == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_a_schema_refusals_and_cuts_keep_their_finish_reason_and_are_not_asked_again(
    tmp_path: Path, simulator: RunningSimulator, protocol: str, mode: str
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    texts = {k: TEXTS[k] for k in ("ok", "refuse", "length")}
    name = f"schema-{protocol}-{mode}"

    rows = run_rows(
        tmp_path,
        simulator,
        texts,
        name,
        exit_code=1,
        output__schema={"label": {"enum": ["positive", "negative"]}},
        output__schema_retries=2,
        **mode_overrides(simulator, protocol, mode),
    )

    assert rows["ok"]["error"] is None and rows["ok"]["finish_reason"] == "stop"
    assert rows["ok"]["label"] in ("positive", "negative")
    refused = rows["refuse"]
    assert refused["finish_reason"] == "refusal" and refused["response"] == REFUSAL_TEXT
    assert refused["error"].startswith("refused")
    cut = rows["length"]
    assert cut["finish_reason"] == "length"
    assert all(row["attempts"] == 1 for row in rows.values())
    assert simulator.stats()["duplicate_paid"] == 0


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_an_anthropic_answer_cut_inside_a_tool_call_is_kept_as_raw_text(
    tmp_path: Path, simulator: RunningSimulator, mode: str
) -> None:
    tool = {
        "name": "record",
        "input_schema": {"type": "object", "properties": {"summary": {"type": "string"}}},
    }
    texts = {"cut": "the bag [[sim:tool]] [[sim:length]]", "whole": "the hat [[sim:tool]]"}

    rows = run_rows(
        tmp_path,
        simulator,
        texts,
        f"tool-cut-{mode}",
        exit_code=0,
        model__tools=[tool],
        **mode_overrides(simulator, "anthropic", mode),
    )

    cut, whole = rows["cut"], rows["whole"]
    assert cut["error"] is None and cut["finish_reason"] == "length" and cut["attempts"] == 1
    assert cut["prompt_tokens"] > 0 and cut["completion_tokens"] > 0  # usage kept
    assert whole["finish_reason"] == "tool_calls"
    if mode == "stream":
        # The JSON stopped halfway: the call's arguments are the text the model wrote.
        [call] = pl.Series([cut["tool_calls"]]).str.json_decode().to_list()[0]
        assert isinstance(call["arguments"], str) and call["arguments"].startswith('{"')
    assert simulator.stats()["duplicate_paid"] == 0


@pytest.mark.parametrize("delta_usage", ["output", "cumulative", "nulls"])
def test_anthropic_stream_usage_in_any_allowed_form_counts_every_prompt_token(
    tmp_path: Path, simulator: RunningSimulator, delta_usage: str
) -> None:
    simulator.configure(cached_fraction=0.5, anthropic_delta_usage=delta_usage)
    texts = {"a": "a long review " * 40}

    rows = run_rows(
        tmp_path,
        simulator,
        texts,
        f"usage-{delta_usage}",
        exit_code=0,
        **mode_overrides(simulator, "anthropic", "stream"),
    )

    prompt = estimate_prompt_tokens(messages_for(texts["a"]))
    row = rows["a"]
    assert row["prompt_tokens"] == prompt
    assert row["cached_tokens"] == math.floor(prompt * 0.5) > 0
    assert row["total_tokens"] == prompt + row["completion_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_thinking_tokens_are_read_from_output_tokens_details(
    tmp_path: Path, simulator: RunningSimulator, mode: str
) -> None:
    simulator.configure(thinking_details=True, batch_turnaround_s=0.1)
    texts = {"a": "the kettle boils fast"}
    thinking = {"type": "enabled", "budget_tokens": 1024}

    rows = run_rows(
        tmp_path,
        simulator,
        texts,
        f"thinking-{mode}",
        exit_code=0,
        model__params={"max_tokens": 2048, "thinking": thinking},
        **mode_overrides(simulator, "anthropic", mode),
    )

    row = rows["a"]
    assert row["reasoning"] and row["reasoning_tokens"] == math.ceil(len(row["reasoning"]) / 4)
    # Thinking is part of output_tokens (billed once, as output).
    assert row["completion_tokens"] > row["reasoning_tokens"]
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


THINKING = {"max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}}


@pytest.mark.parametrize(
    ("protocol", "overrides", "expected"),
    [
        ("openai", {"model__params": {"n": 3}}, "n: 3 asks for several answers per row"),
        (
            "anthropic",
            {"output__schema": {"label": "string"}, "model__params": THINKING},
            "remove model.params.thinking, or remove output.schema",
        ),
        (
            "anthropic",
            {
                "model__params": THINKING,
                "model__tools": [{"name": "record", "input_schema": {"type": "object"}}],
                "model__tool_choice": "required",
            },
            "rejects a forced tool call while thinking is on",
        ),
    ],
    ids=["n", "thinking-schema", "thinking-forced-tool"],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_combinations_the_provider_rejects_on_every_row_are_refused_before_sending(
    tmp_path: Path,
    simulator: RunningSimulator,
    protocol: str,
    overrides: dict[str, Any],
    expected: str,
    command: str,
) -> None:
    pl.DataFrame({"review_id": ["a"], "text": ["x"]}).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path, simulator, **{**mode_overrides(simulator, protocol, "plain"), **overrides}
    )

    result = run_cli(command, str(job), cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert simulator.stats()["requests"] == 0


def test_the_simulator_rejects_thinking_with_a_forced_tool_as_anthropic_does(
    simulator: RunningSimulator,
) -> None:
    import httpx

    body = {
        "model": MODEL,
        "max_tokens": 2048,
        "thinking": THINKING["thinking"],
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "record", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "record"},
    }
    headers = {"x-api-key": SIM_KEY, "anthropic-version": "2023-06-01"}

    answer = httpx.post(f"{simulator.url}/v1/messages", json=body, headers=headers)

    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_the_fingerprint_and_tier_are_stored_and_the_tier_prices_the_row(
    tmp_path: Path, simulator: RunningSimulator, mode: str
) -> None:
    priority = {"input": 1.0, "cached_input": 0.5, "output": 4.0}
    pricing = {"input": 0.3, "output": 0.5, "service_tiers": {"priority": priority}}

    rows = run_rows(
        tmp_path,
        simulator,
        {"a": "the kettle boils fast"},
        f"tier-{mode}",
        exit_code=0,
        model__params={"max_tokens": 200, "seed": 7, "service_tier": "priority"},
        model__pricing=pricing,
        **mode_overrides(simulator, "openai", mode),
    )

    row = rows["a"]
    assert row["system_fingerprint"] == "fp_sim" and row["service_tier"] == "priority"
    uncached = row["prompt_tokens"] - row["cached_tokens"]
    # xAI-style usage: reasoning is billed as output beside completion_tokens.
    output = row["completion_tokens"] + row["reasoning_tokens"]
    expected = (uncached * 1.0 + row["cached_tokens"] * 0.5 + output * 4.0) / 1e6
    assert math.isclose(row["cost_usd"], expected, rel_tol=1e-9)


def test_refusals_are_reported_in_the_summary_show_status_and_report(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    pl.DataFrame({"review_id": ["ok", "no"], "text": ["fine", "bad [[sim:refuse]]"]}).write_csv(
        tmp_path / "reviews.csv"
    )
    job = make_job(tmp_path, simulator)

    run = run_cli("run", str(job), cwd=tmp_path)
    show = run_cli("show", "out/result.parquet", "--errors", cwd=tmp_path)
    status = run_cli("status", str(job), cwd=tmp_path)
    report = run_cli("report", str(job), cwd=tmp_path)

    assert run.returncode == 1
    assert "1 ok, 1 failed (refused 1)" in run.stderr
    assert "error: refused" in show.stdout and REFUSAL_TEXT in show.stdout
    assert "2/2 rows finished (1 failed)" in status.stdout
    assert report.returncode == 0, report.stderr
    assert "refused" in (tmp_path / "out" / "result.report.html").read_text()
