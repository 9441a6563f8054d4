"""Job spec loading: strict keys, helpful messages, sensible defaults."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pipeline.config import Price, resolve_provider
from pipeline.errors import SpecError
from pipeline.spec import ModelSpec, SpecWarning, load_spec, parse_spec

MINIMAL = {
    "input": {"path": "data.csv"},
    "model": {"provider": "openai", "model": "m"},
    "prompt": {"template": "{{ x }}"},
}


def test_minimal_spec_gets_defaults(tmp_path: Path) -> None:
    job = tmp_path / "my-job.yaml"
    job.write_text(
        "input: {path: d.csv}\nmodel: {provider: openai, model: m}\nprompt: {template: hi}\n"
    )
    spec = load_spec(job)
    assert spec.name == "my-job"
    assert spec.limits.concurrency is None, "unset concurrency means adaptive"
    assert spec.limits.max_attempts > 1
    # Relative to the job file's folder, wherever it is run from.
    assert spec.output_path == tmp_path / "out" / "my-job.parquet"
    assert spec.input.path == str(tmp_path / "d.csv")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"limits": {"concurency": 3}},
            "limits.concurency: unknown key (did you mean 'concurrency'?)",
        ),
        ({"prompt": {"templte": "x"}}, "did you mean 'template'"),
        ({"outptu": {}}, "did you mean 'output'"),
        ({"limits": {"concurrency": 0}}, "limits.concurrency"),
        ({"limits": {"max_attempts": "many"}}, "limits.max_attempts"),
        ({"model": {"provider": "openai"}}, "model.model: required key is missing"),
        (
            {"model": {"provider": "openai", "model": "m", "params": {"messages": []}}},
            "model.params",
        ),
    ],
)
def test_bad_specs_name_the_key(change: dict, expected: str) -> None:
    data = {**MINIMAL, "name": "j", **change}
    if "prompt" in change and "template" not in change["prompt"]:
        data["prompt"] = {**change["prompt"], "template": "x"}
    with pytest.raises(SpecError) as raised:
        parse_spec(data, source="job.yaml")
    assert expected in str(raised.value)
    assert "job.yaml" in str(raised.value)


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec("does/not/exist.yaml")


def test_params_a_model_refuses_are_warned_about_from_its_preset() -> None:
    params = {"stop": ["\n"], "temperature": 0}
    xai = ModelSpec(provider="xai", model="grok-3-mini", params=params)
    with pytest.warns(SpecWarning, match="stop may be rejected by grok-3-mini"):
        resolve_provider(xai, read_key=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another model, or a preset that says nothing
        resolve_provider(xai.model_copy(update={"model": "grok-4"}), read_key=False)
        resolve_provider(ModelSpec(provider="vllm", model="grok-3-mini", params=params))


def test_presets_follow_the_config_dir_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ModelSpec(provider="openai", model="m")
    assert resolve_provider(model, read_key=False).base_url == "https://api.openai.com/v1"
    (tmp_path / "providers").mkdir()
    (tmp_path / "providers" / "openai.yaml").write_text(
        "protocol: openai\nbase_url: http://127.0.0.1:9/v1\n"
    )
    (tmp_path / "pricing.yaml").write_text("m: {input: 1.0, output: 2.0}\n")
    monkeypatch.setenv("PIPELINE_CONFIG_DIR", str(tmp_path))
    settings = resolve_provider(model, read_key=False)
    assert settings.base_url == "http://127.0.0.1:9/v1"
    assert settings.price == Price(input=1.0, output=2.0, cached_input=1.0)
