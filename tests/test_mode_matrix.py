"""One job, one output: the same jobs run online, through the batch API (`--batch`) and
on a Ray cluster (`--ray`) give the same rows, column for column, and the same exit code.

Each (case, mode) runs the real CLI in a folder of its own (its own checkpoint), against
the session's simulator and, for `--ray`, the session's local Ray cluster. The online
output of each case is the reference; every mode must also show what the case is about
(skipped rows, typed input, schema retries, deduplicated rows, template errors,
prompts refused for the model's context window).
What legitimately differs: `latency_s` (timing), and `cost_usd` under batch prices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import make_job, messages_for, run_cli
from polars.testing import assert_frame_equal

from pipeline.columns import RESULT_NAMES
from pipeline.simulator import RunningSimulator, expected_response

MODEL = "x-ai-grok-3-mini"
MODES = ("online", "batch", "ray")
TIMING = ["latency_s"]  # differs run to run by nature
# configs/pricing.yaml: this model's batch prices are half its online ones.
BATCH_PRICE_SHARE = 0.5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's, on import


@dataclass(frozen=True)
class Case:
    name: str
    inputs: dict[str, pl.DataFrame]  # file name -> rows (CSV)
    output: str  # file name under out/: its extension picks the format
    exit_code: int
    check: Callable[[pl.DataFrame], None]  # what every mode's output must show
    job: dict[str, Any] = field(default_factory=dict)  # make_job overrides
    shards: int = 1  # on the cluster: one per CSV file of at least 50 rows (cluster/shards.py)


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    output: pl.DataFrame
    stderr: str


def texts(n: int, start: int = 0) -> list[str]:
    return [f"Review {i}: it was {'good' if i % 2 else 'bad'}." for i in range(start, start + n)]


def terse(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": user}]


# --- the cases ----------------------------------------------------------------------


def _plain_check(out: pl.DataFrame) -> None:
    assert out["error"].null_count() == out.height
    assert out["response"].to_list() == [
        expected_response(MODEL, messages_for(t)) for t in out["text"]
    ]


def _skip_empty_data() -> pl.DataFrame:
    text = texts(20)
    for i in (3, 11, 17):
        text[i] = ""  # an empty CSV cell
    return pl.DataFrame({"review_id": [f"R{i:03d}" for i in range(20)], "text": text})


def _skip_empty_check(out: pl.DataFrame) -> None:
    empty = out["text"].is_null() | (out["text"] == "")
    assert empty.sum() == 3
    skipped = out.filter(empty)
    assert skipped["finish_reason"].to_list() == ["skipped"] * 3
    assert skipped["error"].null_count() == 3
    sent = out.filter(~empty)
    assert "skipped" not in sent["finish_reason"].to_list()
    assert sent["response"].to_list() == [expected_response(MODEL, terse(t)) for t in sent["text"]]


def _typed_data() -> pl.DataFrame:
    # Read as numbers these would lose their zeros: 007 would be 7, and id 0010 would be 10.
    return pl.DataFrame(
        {
            "review_id": [f"{i:04d}" for i in range(0, 30, 3)],
            "code": [f"{i:03d}" for i in range(7, 17)],
            "text": texts(10),
        }
    )


def _typed_check(out: pl.DataFrame) -> None:
    assert out["review_id"].cast(pl.String).to_list()[:2] == ["0000", "0003"]
    assert out["code"].cast(pl.String).to_list()[0] == "007"
    for row in out.iter_rows(named=True):
        prompt = f"Code {row['code']}: {row['text']}"
        assert row["response"] == expected_response(MODEL, terse(prompt))


def _schema_data() -> pl.DataFrame:
    text = texts(16)
    for i in (2, 9):
        text[i] += " [[sim:bad_json]]"  # off-schema once: the retry matches
    text[13] += " [[sim:always_bad_json]]"  # never matches
    return pl.DataFrame({"review_id": [f"R{i:03d}" for i in range(16)], "text": text})


def _schema_check(out: pl.DataFrame) -> None:
    assert out.schema["confidence"] == pl.Float64
    retried = out.filter(pl.col("text").str.contains("[[sim:bad_json]]", literal=True))
    assert retried["attempts"].to_list() == [2, 2]
    assert retried["error"].null_count() == 2
    violated = out.filter(pl.col("text").str.contains("always_bad_json", literal=True))
    assert violated["error"].str.starts_with("schema_violation").to_list() == [True]
    good = out.filter(pl.col("error").is_null())
    assert good.height == 15
    assert set(good["label"].cast(pl.String).to_list()) <= {"positive", "negative"}
    assert good["confidence"].null_count() == 0


def _duplicates_data() -> pl.DataFrame:
    text = texts(12)
    return pl.DataFrame({"text": text + text[:6] + text[:3]})  # 21 rows, 12 requests


def _duplicates_check(out: pl.DataFrame) -> None:
    assert out.height == 21
    assert out["error"].null_count() == 21
    by_text = out.group_by("text").agg(pl.col("response").n_unique())
    assert by_text["response"].to_list() == [1] * 12
    _plain_check(out)


def _template_error_data() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "review_id": [f"R{i:03d}" for i in range(12)],
            "share": [0 if i == 4 else i + 1 for i in range(12)],
            "text": texts(12),
        }
    )


def _template_error_check(out: pl.DataFrame) -> None:
    failed = out.filter(pl.col("error").is_not_null())
    assert failed["review_id"].to_list() == ["R004"]
    assert failed["error"][0].startswith("template_error: ZeroDivisionError")
    assert failed["attempts"].to_list() == [0]
    assert out.filter(pl.col("error").is_null()).height == 11


WINDOW = 600  # tokens: a review's prompt (~30) fits; a long one (~2,500) is far past 1.5x
LONG_ROWS = ("R002", "R007")


def _over_window_data() -> pl.DataFrame:
    text = texts(12)
    for i in (2, 7):
        text[i] = "word " * 2000  # ~2,500 tokens by the estimate: refused before sending
    return pl.DataFrame({"review_id": [f"R{i:03d}" for i in range(12)], "text": text})


def _over_window_check(out: pl.DataFrame) -> None:
    """Refused by the plan, not by the provider: no attempt, no cost, the model named."""
    refused = out.filter(pl.col("error").is_not_null())
    assert refused["review_id"].to_list() == list(LONG_ROWS)
    for error in refused["error"]:
        assert error.startswith("context_window_exceeded: the prompt is estimated at ")
        assert f"{MODEL}'s context window of {WINDOW:,}" in error
        assert "nothing was sent" in error
    assert refused["attempts"].to_list() == [0, 0]
    assert refused["cost_usd"].null_count() == 2
    assert refused["response"].null_count() == 2
    answered = out.filter(pl.col("error").is_null())
    assert answered.height == 10
    assert (answered["attempts"] == 1).all()
    _plain_check(answered)


CASES = [
    Case(
        "plain-parquet-two-shards",
        {
            "a.csv": pl.DataFrame({"n": range(50), "text": texts(50)}),
            "b.csv": pl.DataFrame({"n": range(50, 100), "text": texts(50, 50)}),
        },
        "result.parquet",
        0,
        _plain_check,
        {"input__path": "*.csv", "input__id_column": "n"},
        shards=2,
    ),
    Case(
        "skip-empty-csv",
        {"reviews.csv": _skip_empty_data()},
        "result.csv",
        0,
        _skip_empty_check,
        {"prompt__template": "{{ text }}", "prompt__skip_empty": True},
    ),
    Case(
        "input-types-jsonl",
        {"reviews.csv": _typed_data()},
        "result.jsonl",
        0,
        _typed_check,
        {"input__types": {"code": "string"}, "prompt__template": "Code {{ code }}: {{ text }}"},
    ),
    Case(
        "schema-retries-parquet",
        {"reviews.csv": _schema_data()},
        "result.parquet",
        1,
        _schema_check,
        {
            "output__schema": {"label": {"enum": ["positive", "negative"]}, "confidence": "number"},
            "output__schema_retries": 1,
        },
    ),
    Case(
        "no-id-duplicates-csv",
        {"reviews.csv": _duplicates_data()},
        "result.csv",
        0,
        _duplicates_check,
        {"input__id_column": None},
    ),
    Case(
        "template-error-jsonl",
        {"reviews.csv": _template_error_data()},
        "result.jsonl",
        1,
        _template_error_check,
        {"prompt__template": "Summarize: {{ text }} ({{ 100 // share }}%)"},
    ),
    Case(
        "over-context-window-parquet",
        {"reviews.csv": _over_window_data()},
        "result.parquet",
        1,
        _over_window_check,
        {"model__context_window": WINDOW},
    ),
]


# --- running a case -----------------------------------------------------------------


def run_case(
    case: Case, mode: str, workdir: Path, simulator: RunningSimulator, ray: str
) -> Outcome:
    """Write the case's inputs and job into `workdir` and run it in `mode` with the CLI."""
    simulator.reset()  # triggers such as [[sim:bad_json]] count attempts per run
    workdir.mkdir(parents=True, exist_ok=True)
    for name, rows in case.inputs.items():
        rows.write_csv(workdir / name)
    overrides = {"input__path": "reviews.csv", **case.job}
    job = make_job(
        workdir,
        simulator,
        name="matrix",
        output__path=f"out/{case.output}",
        model__batch_poll_s=0.05,
        **overrides,
    )
    switches = {"online": [], "batch": ["--batch"], "ray": ["--ray-address", ray]}[mode]
    result = run_cli("run", str(job), *switches, "--quiet", cwd=workdir, timeout=180)
    path = workdir / "out" / case.output
    output = read_output(path) if path.exists() else pl.DataFrame()
    return Outcome(result.returncode, output, result.stderr)


def read_output(path: Path) -> pl.DataFrame:
    """The output as written: a CSV's cells as text, JSON values as JSON types."""
    if path.suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)
    if path.suffix == ".jsonl":
        return pl.read_ndjson(path)
    return pl.read_parquet(path)


@pytest.fixture(scope="module")
def online_outputs() -> dict[str, Outcome]:
    """Each case's online outcome, once per module: the reference the other modes match."""
    return {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_mode_writes_the_online_rows(
    case: Case,
    mode: str,
    simulator: RunningSimulator,
    online_outputs: dict[str, Outcome],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    simulator.configure(batch_turnaround_s=0.05)
    ray = request.getfixturevalue("ray_cluster") if mode == "ray" else ""
    if case.name not in online_outputs:
        online_outputs[case.name] = run_case(case, "online", tmp_path / "online", simulator, ray)
    reference = online_outputs[case.name]
    assert reference.exit_code == case.exit_code, reference.stderr

    outcome = (
        reference if mode == "online" else run_case(case, mode, tmp_path / mode, simulator, ray)
    )

    assert outcome.exit_code == case.exit_code, outcome.stderr
    out = outcome.output
    inputs = pl.concat(list(case.inputs.values()))
    assert out.columns[: len(inputs.columns)] == inputs.columns
    assert set(RESULT_NAMES) <= set(out.columns)
    assert out.height == inputs.height
    case.check(out)
    if mode == "online":
        return
    if mode == "ray":
        assert f"cluster: {case.shards} shards" in outcome.stderr
    compared = [*TIMING, "cost_usd"]
    assert_frame_equal(out.drop(compared), reference.output.drop(compared))
    share = BATCH_PRICE_SHARE if mode == "batch" else 1.0
    costs = zip(_costs(out), _costs(reference.output), strict=True)
    for cost, online_cost in costs:
        if online_cost is None:
            assert cost is None
        else:
            assert cost is not None and math.isclose(cost, online_cost * share, rel_tol=1e-9)


def _costs(out: pl.DataFrame) -> list[float | None]:
    return out["cost_usd"].cast(pl.Float64).to_list()
