"""Refuse what cannot work before sending: every spec key, given an invalid value,
makes `pipeline run` exit 2 and send nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import SIM_KEY, make_job, reviews
from pydantic import BaseModel

from pipeline.cli import main
from pipeline.simulator import RunningSimulator
from pipeline.spec import JobSpec

# One invalid value for every key of the job spec (dotted path -> value).
INVALID: dict[str, Any] = {
    "name": "not a valid name!",
    "input": "reviews.csv",
    "input.path": "no-such-file.csv",
    "input.id_column": "no_such_column",
    "input.types": {"text": "no-such-type"},
    "model": "openai",
    "model.provider": "no-such-provider",
    "model.model": "",
    "model.base_url": "htp:/x",
    "model.api_key_env": "PIPELINE_TEST_KEY_THAT_IS_NOT_SET",
    "model.params": {"messages": []},
    "model.pricing": {"input": 1.0},
    "model.pricing.input": -1,
    "model.pricing.output": -1,
    "model.pricing.cached_input": -1,
    "model.pricing.batch_input": -1,
    "model.pricing.batch_output": -1,
    "model.pricing.batch_cached_input": -1,
    "model.pricing.cache_write": -1,
    "model.pricing.service_tiers": {"priority": {"input": 1.0}},
    "model.pricing.service_tiers.input": -1,
    "model.pricing.service_tiers.output": -1,
    "model.pricing.service_tiers.cached_input": -1,
    "model.pricing.service_tiers.cache_write": -1,
    "model.prompt_cache": 42,
    "model.stream": "sometimes",
    "model.tools": [{"type": "function", "function": {"description": "no name"}}],
    "model.tool_choice": 42,
    "model.batch": "overnight",
    "model.batch_poll_s": 0,
    "model.context_window": 0,
    "prompt": "Summarize",
    "prompt.skip_empty": "sometimes",
    "prompt.system": "{{ no_such_column }}",
    "prompt.template": "{{ no_such_column }}",
    "prompt.messages": [{"role": "robot", "content": "hi"}],
    "prompt.messages.role": "robot",
    "prompt.messages.content": "",
    "limits": 5,
    "limits.concurrency": 0,
    "limits.requests_per_minute": -1,
    "limits.tokens_per_minute": 0,
    "limits.max_attempts": 0,
    "limits.timeout_s": 0,
    "limits.max_cost_usd": -5,
    "limits.max_tokens_total": 0,
    "limits.stall_timeout_s": 0,
    "output": "out.parquet",
    "output.path": ".",
    "output.schema": {"label": "no-such-type"},
    "output.schema_retries": -1,
    "reuse_across_params": "sometimes",
    "cache": 5,
    "cache.path": "",
    "cache.max_entries": 0,
}
# A step's keys: its own, and the job's prompt, model and limits keys under it (the same
# invalid values: a step's model and limits are overrides of the job's).
STEP_INVALID: dict[str, Any] = {
    "steps": "Summarize",
    "steps.name": "two words",
    "steps.when": "text ==",
    "steps.reduce": "text",
    "steps.reduce.by": ["no_such_column"],
    "steps.reduce.max_prompt_tokens": 0,
    **{
        f"steps.reduce.combine{key.removeprefix('prompt')}": value
        for key, value in INVALID.items()
        if key.split(".")[0] == "prompt"
    },
    "steps.output": "out.parquet",
    "steps.output.schema": {"label": "no-such-type"},
    "steps.output.schema_retries": -1,
    **{
        f"steps.{key}": value
        for key, value in INVALID.items()
        if key.split(".")[0] in ("prompt", "model", "limits")
    },
}
LIST_ITEMS = {"prompt.messages"}  # keys whose sub-keys live in the list's items


def spec_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the spec, by its YAML name, depth first."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        keys.append(key)
        for arg in _model_types(field.annotation):
            keys += spec_keys(arg, f"{key}.")
    return keys


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def test_every_spec_key_has_an_invalid_value_here() -> None:
    assert sorted(spec_keys(JobSpec)) == sorted([*INVALID, *STEP_INVALID])


def with_invalid(spec: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    target: Any = spec
    for part in parts[:-1]:
        if part not in target:
            target[part] = [{"role": "user", "content": "x"}] if part == "messages" else {}
        target = target[part]
        if isinstance(target, list):
            target = target[0]
    if parts[0] == "prompt" and parts[-1] == "messages":
        spec["prompt"].pop("template", None)
    if parts[:2] == ["prompt", "messages"] and len(parts) == 3:
        spec["prompt"].pop("template", None)
    target[parts[-1]] = value
    return spec


@pytest.mark.parametrize("key", sorted(INVALID))
def test_an_invalid_value_is_refused_before_sending(
    key: str, tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    spec = with_invalid(yaml.safe_load(job.read_text()), key, INVALID[key])
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    monkeypatch.delenv("PIPELINE_TEST_KEY_THAT_IS_NOT_SET", raising=False)

    result = CliRunner().invoke(main, ["run", str(job)])

    assert result.exit_code == 2, (key, result.output, result.exception)
    assert simulator.stats()["requests"] == 0
    assert "Traceback" not in result.output


@pytest.mark.parametrize("key", sorted(STEP_INVALID))
def test_an_invalid_step_value_is_refused_before_sending(
    key: str, tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    spec = yaml.safe_load(job.read_text())
    step = {"name": "first", "prompt": spec.pop("prompt")}
    if key.startswith("steps.reduce."):
        combine = {"template": "{{ rows|length }}"}
        step["reduce"] = {"by": "text", "max_prompt_tokens": 100, "combine": combine}
    if key == "steps":
        spec["steps"] = STEP_INVALID[key]
    else:
        spec["steps"] = [with_invalid(step, key.removeprefix("steps."), STEP_INVALID[key])]
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    monkeypatch.delenv("PIPELINE_TEST_KEY_THAT_IS_NOT_SET", raising=False)

    result = CliRunner().invoke(main, ["run", str(job)])

    assert result.exit_code == 2, (key, result.output, result.exception)
    assert simulator.stats()["requests"] == 0
    assert "Traceback" not in result.output
