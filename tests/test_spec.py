"""Job spec loading: strict keys, helpful messages, sensible defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import load_spec, parse_spec

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
