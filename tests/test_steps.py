"""Multi-step jobs (map, `when`, reduce) through the real CLI against the simulator.

The simulator answers each exact request deterministically and counts every paid
answer per request body, so "which requests were sent" is measured where the money
is spent: a classification's label decides which rows a `when` keeps, and the
counts follow from the output.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import SIM_KEY, make_job, reviews, run_cli, start_cli

from pipeline.simulator import RunningSimulator
from pipeline.spec import StepSpec
from pipeline.steps_reduce import row_tokens, split_groups

LABELS = ["positive", "negative", "neutral"]


def sentiment(template: str = "Classify: {{ text }}") -> dict[str, Any]:
    return {
        "name": "sentiment",
        "prompt": {"template": template},
        "output": {"schema": {"label": {"enum": LABELS}}},
    }


COMPLAINT = {
    "name": "complaint",
    "when": "label == 'negative'",
    "prompt": {"template": "What is the complaint? {{ text }}"},
}


def per_label(
    template: str = "Summarise {{ rows|length }}: {% for r in rows %}{{ r.text }} {% endfor %}",
) -> dict[str, Any]:
    return {"name": "per_label", "reduce": {"by": "label"}, "prompt": {"template": template}}


def steps_job(
    workdir: Path, simulator: RunningSimulator, steps: list[dict[str, Any]], **more: Any
) -> Path:
    return make_job(
        workdir, simulator, prompt=None, steps=steps, **{"limits__concurrency": 32, **more}
    )


def mode_switches(how: str, request: pytest.FixtureRequest) -> list[str]:
    """The `run` options of a mode; Ray's start the session's cluster."""
    if how == "batch":
        return ["--batch"]
    if how == "ray":
        return ["--ray-address", request.getfixturevalue("ray_cluster")]
    return []


def write_reviews(workdir: Path, rows: int) -> None:
    reviews(rows).write_csv(workdir / "reviews.csv")


def paid(simulator: RunningSimulator) -> int:
    return int(simulator.stats(full=False)["completions"])


def outputs(workdir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    out = workdir / "out"
    return pl.read_parquet(out / "result.parquet"), pl.read_parquet(
        out / "result.per_label.parquet"
    )


def parts_folder(workdir: Path) -> Path:
    return workdir / "out" / "result.parquet.run" / "steps"


def negatives(rows: pl.DataFrame) -> int:
    return int((rows.get_column("sentiment_label") == "negative").sum())


def test_the_issues_job_over_2000_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = 2000
    write_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, per_label()])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stderr
    final, reduced = outputs(tmp_path)
    assert final.height == rows
    assert (
        final.get_column("review_id").to_list() == reviews(rows).get_column("review_id").to_list()
    )
    assert final.get_column("sentiment_error").null_count() == rows
    negative = negatives(final)
    assert 0 < negative < rows
    # complaint: exactly the negative rows were sent; the others are null and free
    answered = final.filter(pl.col("complaint_response").is_not_null())
    assert answered.height == negative
    assert (answered.get_column("sentiment_label") == "negative").all()
    assert (
        final.filter(pl.col("sentiment_label") != "negative")
        .get_column("complaint_cost_usd")
        .null_count()
        == rows - negative
    )
    # reduce: one row per label, the `by` column first, then the result columns
    assert sorted(reduced.get_column("label").cast(pl.String).to_list()) == sorted(LABELS)
    assert reduced.columns[:2] == ["label", "response"]
    assert reduced.get_column("error").null_count() == len(LABELS)
    stats = simulator.stats(full=False)
    assert stats["completions"] == rows + negative + len(LABELS)
    assert stats["duplicate_paid"] == 0
    # every cost column adds up to the summary's total
    total = (
        final.get_column("sentiment_cost_usd").sum()
        + final.get_column("complaint_cost_usd").sum()
        + reduced.get_column("cost_usd").sum()
    )
    assert f"${total:.6f} for every answer in the outputs" in done.stderr
    assert f"cost: ${total:.6f} this run" in done.stderr


def test_edits_resend_only_what_changed(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = 120
    write_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, per_label()])
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    first, _ = outputs(tmp_path)

    # Step 3's template edited: only the reduce requests are sent.
    before = paid(simulator)
    job = steps_job(
        tmp_path, simulator, [sentiment(), COMPLAINT, per_label("All: {{ rows|length }}")]
    )
    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert paid(simulator) - before == len(LABELS)

    # A step 4 added: only its requests are sent.
    before = paid(simulator)
    judge = {
        "name": "judge",
        "when": "complaint_response is not none",
        "prompt": {"template": "Judge: {{ complaint_response }}"},
    }
    job = steps_job(
        tmp_path, simulator, [sentiment(), COMPLAINT, per_label("All: {{ rows|length }}"), judge]
    )
    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert paid(simulator) - before == negatives(first)
    final, _ = outputs(tmp_path)
    assert final.get_column("judge_response").null_count() == rows - negatives(first)

    # Step 1 changed: every row's label is asked again; a complaint is sent only for a
    # row negative now and not before (a row negative both times keeps its answer).
    before = paid(simulator)
    job = steps_job(
        tmp_path,
        simulator,
        [
            sentiment("Sentiment of: {{ text }}"),
            COMPLAINT,
            per_label("All: {{ rows|length }}"),
            judge,
        ],
    )
    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final, _ = outputs(tmp_path)
    was = set(first.filter(pl.col("sentiment_label") == "negative").get_column("review_id"))
    now = set(final.filter(pl.col("sentiment_label") == "negative").get_column("review_id"))
    assert now != was, "the new template must move some labels for this test to mean anything"
    complaints = len(now - was)
    sent = paid(simulator) - before
    groups_changed = len(LABELS)  # every group's rows changed with the labels
    assert sent == rows + complaints + groups_changed + complaints  # the judge follows complaint


def test_a_kill_during_step_2_resumes_without_paying_twice(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 600
    write_reviews(tmp_path, rows)
    simulator.configure(latency_ms=(20, 60))
    job = steps_job(
        tmp_path, simulator, [sentiment(), COMPLAINT, per_label()], limits__concurrency=8
    )
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    try:
        # Step 2 has started once requests beyond step 1's rows were answered.
        deadline = time.monotonic() + 120
        while paid(simulator) < rows + 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "step 2 never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    settle(simulator)
    assert not (tmp_path / "out" / "result.parquet").exists()
    status = run_cli("status", str(job), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    # Rows stream from step 1 into step 2 in waves: each step's line counts the rows it
    # has taken, and neither claims rows it never saw.
    for step in ("sentiment", "complaint"):
        line = next(x for x in status.stdout.splitlines() if x.strip().startswith(f"{step}: "))
        finished, taken = (int(n) for n in line.split(": ")[1].split(" ")[0].split("/"))
        assert 0 < finished <= taken <= rows, line
    assert "complaint: " in status.stdout and ", stopped;" in status.stdout
    assert "per_label: not started" in status.stdout

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stderr
    final, reduced = outputs(tmp_path)
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] <= 8, "at most the requests in flight at the kill are paid twice"
    assert stats["distinct_paid"] == rows + negatives(final) + len(LABELS)
    # the same outputs as an uninterrupted run
    simulator.reset()
    clean = tmp_path / "clean"
    clean.mkdir()
    write_reviews(clean, rows)
    again = steps_job(clean, simulator, [sentiment(), COMPLAINT, per_label()])
    assert run_cli("run", str(again), "--quiet", cwd=clean, timeout=300).returncode == 0
    clean_final, clean_reduced = outputs(clean)
    answers = ["review_id", "sentiment_label", "sentiment_response", "complaint_response"]
    assert final.select(answers).equals(clean_final.select(answers))
    assert reduced.select("label", "response").equals(clean_reduced.select("label", "response"))


def settle(simulator: RunningSimulator) -> None:
    deadline = time.monotonic() + 30
    while simulator.stats(full=False)["in_flight"]:
        assert time.monotonic() < deadline, "the simulator never went idle"
        time.sleep(0.01)


def test_validate_checks_every_step_and_sends_nothing(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 12)
    good = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, per_label()])
    done = run_cli("validate", str(good), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 steps" in done.stdout

    typo = {**COMPLAINT, "prompt": {"template": "{{ labl }}: {{ text }}"}}
    bad = steps_job(tmp_path, simulator, [sentiment(), typo])
    done = run_cli("validate", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert "steps.complaint" in done.stderr and "did you mean {{ label }}" in done.stderr

    late = {**COMPLAINT, "when": "judge_response is none"}
    bad = steps_job(tmp_path, simulator, [sentiment(), late])
    done = run_cli("run", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert "steps.complaint.when" in done.stderr and "judge_response" in done.stderr

    grouped = {**per_label(), "reduce": {"by": "colour"}}
    done = run_cli(
        "validate", str(steps_job(tmp_path, simulator, [sentiment(), grouped])), cwd=tmp_path
    )
    assert done.returncode == 2
    assert "steps.per_label.reduce.by" in done.stderr and "colour" in done.stderr

    assert simulator.stats(full=False)["requests"] == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({**COMPLAINT, "wehn": "x"}, "steps.0.wehn: unknown key (did you mean 'when'?)"),
        (
            {**COMPLAINT, "model": {"parms": {}}},
            "steps.0.model.parms: unknown key (did you mean 'params'?)",
        ),
        ({**COMPLAINT, "name": "two words"}, "steps.0.name"),
    ],
)
def test_step_keys_are_checked(tmp_path: Path, step: dict[str, Any], message: str) -> None:
    write_reviews(tmp_path, 3)
    job = steps_job(tmp_path, None, [step])  # type: ignore[arg-type]
    done = run_cli("validate", str(job), cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_step_overrides_the_jobs_model_params(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 6)
    short = {**COMPLAINT, "when": None, "model": {"params": {"max_tokens": 3}}}
    del short["when"]
    job = steps_job(tmp_path, simulator, [short])
    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    final = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert done.returncode == 0, done.stderr
    assert (final.get_column("complaint_completion_tokens") <= 3).all()
    assert (final.get_column("complaint_finish_reason") == "length").all()


def test_a_job_with_prompt_and_steps_is_refused(tmp_path: Path) -> None:
    write_reviews(tmp_path, 3)
    job = make_job(tmp_path, None, steps=[COMPLAINT])
    done = run_cli("validate", str(job), cwd=tmp_path)
    assert done.returncode == 2
    assert "either prompt" in done.stderr


def test_one_budget_across_the_steps(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = 120
    write_reviews(tmp_path, rows)
    # Step 1 alone costs about $0.0023 here, and with step 2 about $0.0030: a limit
    # between the two lets step 1 finish and stops step 2 inside it.
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT], limits__max_cost_usd=0.0027)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 3, done.stderr
    assert "stopped in step complaint" in done.stderr
    stats = simulator.stats(full=False)
    billed = (
        stats["prompt_tokens"] * 0.30e-6
        + (stats["completion_tokens"] + stats["reasoning_tokens"]) * 0.50e-6
    )
    assert billed <= 0.0027
    assert stats["completions"] > rows, "step 2 started within what was left"
    assert not (tmp_path / "out" / "result.parquet").exists()


@pytest.mark.parametrize("mode", ["batch", "ray"])
def test_batch_and_ray_run_every_step_through_the_same_path(
    mode: str, tmp_path: Path, simulator: RunningSimulator, request: pytest.FixtureRequest
) -> None:
    rows = 30
    simulator.configure(batch_turnaround_s=0.05)
    switches = mode_switches(mode, request)
    finished = {}
    for how, extra in (("online", []), (mode, switches)):
        workdir = tmp_path / how
        workdir.mkdir()
        write_reviews(workdir, rows)
        job = steps_job(
            workdir, simulator, [sentiment(), COMPLAINT, per_label()], model__batch_poll_s=0.05
        )
        # Online, the rows stream from step to step in waves of 10; batch and Ray runs
        # keep a barrier between steps. The rows must be the same.
        waves = {"PIPELINE_STEP_WAVE_ROWS": "10"} if how == "online" else {}
        done = run_cli("run", str(job), *extra, "--quiet", cwd=workdir, timeout=300, **waves)
        assert done.returncode == 0, done.stderr
        assert ("streaming steps" in done.stderr) == (how == "online")
        finished[how] = outputs(workdir)
    answers = ["review_id", "sentiment_label", "sentiment_response", "complaint_response"]
    online, other = finished["online"], finished[mode]
    assert online[0].select(answers).equals(other[0].select(answers))
    assert online[1].select("label", "response").equals(other[1].select("label", "response"))


def test_estimate_per_step_and_in_total_and_the_sample_is_kept(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows, sample = 60, 20
    write_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, per_label()])

    offline = run_cli("estimate", str(job), cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert paid(simulator) == 0
    lines = offline.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "sentiment",
        "complaint",
        "per_label",
        "total",
    ]
    assert "its `when` not applied" in lines[1]

    measured = run_cli("estimate", str(job), "--sample", str(sample), cwd=tmp_path)
    assert measured.returncode == 0, measured.stderr
    assert f"sentiment: {rows} row(s), 100% of the rows" in measured.stdout
    assert "expected $" in measured.stdout.splitlines()[-1]
    sampled = paid(simulator)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final, _ = outputs(tmp_path)
    sampled_negative = negatives(final.head(sample))
    # the sample's map answers are reused; only the reduce groups (their rows grew) again
    assert sampled == sample + sampled_negative + len(LABELS)
    assert paid(simulator) - sampled == (rows - sample) + (
        negatives(final) - sampled_negative
    ) + len(LABELS)


def test_the_python_api_takes_steps(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline

    job = pipeline.Job(
        name="api-steps",
        input={"path": "(pass data= to run)", "id_column": "review_id"},
        model={
            "provider": "openai",
            "model": "x-ai-grok-3-mini",
            "base_url": simulator.base_url,
            "api_key_env": "SIM_API_KEY",
        },
        steps=[sentiment(), COMPLAINT, per_label()],
    )
    data = reviews(30)
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)

    result = pipeline.run(job, data, output=tmp_path / "out" / "api.parquet", progress=False)

    assert result.height == 30
    assert result.get_column("review_id").to_list() == data.get_column("review_id").to_list()
    answered = result.filter(pl.col("complaint_response").is_not_null())
    assert answered.height == negatives(result)
    assert pl.read_parquet(tmp_path / "out" / "api.per_label.parquet").height == len(LABELS)


def test_a_group_over_the_token_budget_is_sent_in_parts_and_combined(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 60
    write_reviews(tmp_path, rows)
    split = {**per_label(), "reduce": {"by": "label", "max_prompt_tokens": 200}}
    job = steps_job(tmp_path, simulator, [sentiment(), split])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    parts = pl.read_parquet(
        tmp_path / "out" / "result.parquet.run" / "steps" / "per_label" / "output.parquet"
    )
    sizes = dict(parts.group_by("label").agg(pl.len()).iter_rows())
    split_groups = [label for label, n in sizes.items() if n > 1]
    assert split_groups, "the budget must split some group for this test to mean anything"
    # no row is cut: every row is in exactly one part
    assert int(parts.get_column("rows").list.len().sum()) == rows
    # the parts' answers are too many for one request too: combined in rounds
    combining = sorted(parts_folder(tmp_path).glob("per_label_combine*"))
    assert [d.name for d in combining] == ["per_label_combine", "per_label_combine_2"]
    combined = sum(pl.read_parquet(d / "output.parquet").height for d in combining)
    assert paid(simulator) == rows + parts.height + combined
    final, reduced = outputs(tmp_path)
    assert reduced.height == len(LABELS)
    combined = reduced.filter(pl.col("label").cast(pl.String).is_in(split_groups))
    assert all("Combine these" in text for text in combined.get_column("response"))
    # the group's row adds up every request it took, so the costs still add up
    total = final.get_column("sentiment_cost_usd").sum() + reduced.get_column("cost_usd").sum()
    assert f"cost: ${total:.6f} this run" in done.stderr
    status = run_cli("status", str(job), cwd=tmp_path)
    last_round = f"per_label_combine_2: {len(split_groups)}/{len(split_groups)} group(s)"
    assert last_round in status.stdout
    assert f"${total:.6f} spent in all" in status.stdout


def test_answers_too_many_for_one_combining_request_are_combined_in_rounds(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """80 rows a product under a budget of 150 tokens: ~14 parts a product, whose 14
    answers do not fit one request either, so they are combined 4 at a time, then those
    4 answers once more. Every request fits the budget, each is paid once, and the
    product's row adds up all of them."""
    budget = 150
    reviews(240).write_csv(tmp_path / "reviews.csv")
    per_product = {
        "name": "per_product",
        "reduce": {"by": "product", "max_prompt_tokens": budget},
        "prompt": {"template": "Summarise: {% for r in rows %}{{ r.text }} {% endfor %}"},
    }
    job = steps_job(tmp_path, simulator, [per_product])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    steps = tmp_path / "out" / "result.parquet.run" / "steps"
    rounds = [
        pl.read_parquet(steps / name / "output.parquet")
        for name in ("per_product", "per_product_combine", "per_product_combine_2")
    ]
    assert not (steps / "per_product_combine_3").exists()
    assert [r.height for r in rounds] == [42, 12, 3]
    for answers in rounds:
        for part in answers.iter_rows(named=True):  # within the budget, or a lone row
            assert len(part["rows"]) == 1 or sum(map(row_tokens, part["rows"])) <= budget
    assert paid(simulator) == sum(r.height for r in rounds)
    reduced = pl.read_parquet(tmp_path / "out" / "result.per_product.parquet")
    assert reduced.height == 3 and reduced.get_column("error").null_count() == 3
    last = dict(zip(*rounds[-1].select("product", "response"), strict=True))
    assert dict(zip(*reduced.select("product", "response"), strict=True)) == last
    assert int(reduced.get_column("attempts").sum()) == paid(simulator)
    total = sum(float(r.get_column("cost_usd").sum()) for r in rounds)
    assert reduced.get_column("cost_usd").sum() == pytest.approx(total)
    assert f"cost: ${total:.6f} this run" in done.stderr
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "per_product_combine_2: 3/3 group(s) finished" in status.stdout

    again = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert paid(simulator) == sum(r.height for r in rounds)  # every round's answers kept
    assert pl.read_parquet(tmp_path / "out" / "result.per_product.parquet").equals(reduced)

    # A budget that needs one combining round: the second, an earlier run's, is not
    # listed any more; one that splits no group: no combining round is.
    for larger, listed in ((400, ["per_product_combine"]), (5000, [])):
        per_product["reduce"] = {"by": "product", "max_prompt_tokens": larger}
        job = steps_job(tmp_path, simulator, [per_product])
        assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
        status = run_cli("status", str(job), cwd=tmp_path).stdout
        assert re.findall(r"(per_product_combine\w*):", status) == listed, status


def test_a_combining_round_that_cannot_shrink_a_group_sends_it_whole() -> None:
    """Answers each too large to share a request: another round would make as many
    parts as answers, forever, so they go as one part (which the check before sending,
    or the provider, then refuses as the group's error)."""
    step = StepSpec.model_validate(
        {
            "name": "per_product",
            "reduce": {"by": "product", "max_prompt_tokens": 10},
            "prompt": {"template": "x"},
        }
    )
    answers = [{"part": n, "response": "long answer " * 20, "error": None} for n in range(3)]
    groups = pl.DataFrame({"product": ["kettle"], "rows": [answers]})

    assert split_groups(groups, step).height == 3
    assert split_groups(groups, step, must_shrink=True).get_column("parts").to_list() == [1]


def test_a_limited_run_writes_beside_the_output_and_its_answers_are_kept(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows, first = 40, 10
    write_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, per_label()])

    done = run_cli("run", str(job), "--limit", str(first), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    limited = pl.read_parquet(tmp_path / "out" / f"result.first-{first}.parquet")
    assert limited.height == first
    assert (tmp_path / "out" / f"result.first-{first}.per_label.parquet").exists()
    assert not (tmp_path / "out" / "result.parquet").exists()
    sent = paid(simulator)
    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final, _ = outputs(tmp_path)
    more_negative = negatives(final) - negatives(limited)
    # the first rows' map answers are reused; the groups grew, so they are asked again
    assert paid(simulator) - sent == (rows - first) + more_negative + len(LABELS)


def test_a_step_column_that_an_input_column_already_has_is_refused(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(4).with_columns(pl.lit("x").alias("sentiment_label")).write_csv(
        tmp_path / "reviews.csv"
    )
    job = steps_job(tmp_path, simulator, [sentiment()])

    done = run_cli("validate", str(job), cwd=tmp_path)

    assert done.returncode == 2
    assert "steps.sentiment: its column(s) sentiment_label would clash" in done.stderr


def test_one_run_per_job_with_steps(tmp_path: Path, simulator: RunningSimulator) -> None:
    write_reviews(tmp_path, 200)
    simulator.configure(latency_ms=(20, 40))
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT], limits__concurrency=4)
    first = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while paid(simulator) == 0:  # the first run holds the job once it sends
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)

        second = run_cli("run", str(job), "--quiet", cwd=tmp_path)

        assert second.returncode == 2
        assert "another run" in second.stderr
        assert "result.parquet.run/run.lock" in second.stderr, "held before any step's input"
    finally:
        first.kill()
        first.communicate(timeout=30)
        settle(simulator)


def write_failing_reviews(workdir: Path, rows: int, marker: str = "[[sim:context]]") -> None:
    """Reviews whose first two the simulator refuses (by default, over its context
    window; a 400 is refused in a batch too)."""
    data = reviews(rows).with_columns(
        pl.when(pl.int_range(rows) < 2)
        .then(pl.col("text") + f" {marker}")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(workdir / "reviews.csv")


def test_rows_failed_in_a_step_exit_1_and_later_steps_still_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 30
    write_failing_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    final = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert final.get_column("sentiment_error").drop_nulls().len() == 2
    assert final.head(2).get_column("sentiment_label").null_count() == 2
    assert final.get_column("complaint_response").drop_nulls().len() == negatives(final) > 0
    assert f"sentiment: {rows} row(s), 0 reused, {rows} request(s) sent, 2 failed" in done.stderr


@pytest.mark.parametrize(
    ("wave", "how"),
    [("10", "online"), ("1000000", "online"), ("10", "batch"), ("10", "ray")],
    ids=["streamed", "step-by-step", "batch", "ray"],
)
def test_a_row_an_earlier_step_failed_on_is_not_sent_to_the_steps_that_read_its_answer(
    tmp_path: Path,
    simulator: RunningSimulator,
    wave: str,
    how: str,
    request: pytest.FixtureRequest,
) -> None:
    """Two rows fail in step 1. A step built on its answer is not sent them (it would pay
    for a request about nothing) and says why; a step that reads step 1's error is sent
    exactly them; the reduce by label has no group of unlabelled rows. Once the input is
    fixed, a rerun sends just what changed and exits 0."""
    mode = mode_switches(how, request)
    rows = 30
    write_failing_reviews(tmp_path, rows, "[[sim:status=400]]")
    explain = {"name": "explain", "prompt": {"template": "Why {{ sentiment_response }}?"}}
    fallback = {
        "name": "fallback",
        "when": "sentiment_error is not none",
        "prompt": {"template": "Try again on review {{ review_id }}"},
    }
    simulator.configure(batch_turnaround_s=0.05)
    job = steps_job(
        tmp_path, simulator, [sentiment(), explain, fallback, per_label()], model__batch_poll_s=0.05
    )

    done = run_cli("run", str(job), "--quiet", *mode, cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=wave)

    assert done.returncode == 1, done.stderr
    assert ("rows in 3 waves" in done.stderr) == (wave == "10" and how == "online")
    assert "explain: 28 row(s) (2 not sent as an earlier step failed on them)" in done.stderr
    assert paid(simulator) == (rows - 2) * 2 + 2 + len(LABELS)  # the 2 are refused, unpaid
    final, reduced = outputs(tmp_path)
    failed = final.head(2)
    assert failed.get_column("sentiment_error").null_count() == 0
    assert all(
        error.startswith("not sent: step sentiment failed on this row")
        for error in failed.get_column("explain_error")
    )
    assert failed.get_column("explain_cost_usd").null_count() == 2
    assert failed.get_column("fallback_response").null_count() == 0
    assert final.tail(rows - 2).get_column("explain_error").null_count() == rows - 2
    assert sorted(reduced.get_column("label").cast(pl.String)) == sorted(LABELS)

    reviews(rows).write_csv(tmp_path / "reviews.csv")  # the fix
    before = paid(simulator)
    again = run_cli("run", str(job), "--quiet", *mode, cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=wave)

    assert again.returncode == 0, again.stderr
    final, reduced = outputs(tmp_path)
    assert final.get_column("explain_error").null_count() == rows
    assert final.get_column("fallback_response").null_count() == rows
    # the two rows through steps 1 and 2, and each label's group now holding them
    assert 2 + 2 + 1 <= paid(simulator) - before <= 2 + 2 + len(LABELS)


def test_a_when_that_fails_on_a_row_stops_before_its_step_sends(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 10)
    failing = {**COMPLAINT, "when": "rating / 0 > 1"}
    job = steps_job(tmp_path, simulator, [sentiment(), failing])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert done.returncode == 2
    assert "steps.complaint.when: fails on row" in done.stderr
    assert "answers recorded so far are kept" in done.stderr
    assert paid(simulator) == 10, "step 1 ran; step 2 sent nothing"


def test_detach_submits_a_steps_batches_and_each_detached_rerun_goes_on_to_the_next(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 20)
    job = steps_job(
        tmp_path, simulator, [sentiment(), COMPLAINT], model__batch=True, model__batch_poll_s=0.05
    )
    simulator.configure(batch_turnaround_s=3600)

    first = run_cli("run", str(job), "--detach", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert "detached in step sentiment: 1 batch(es)" in first.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert simulator.stats()["batches_created"] == 1

    status = run_cli("status", str(job), cwd=tmp_path).stdout
    assert "sentiment: 0/20 row(s) finished (0 failed), 20 pending, 1 batch(es) open" in status
    # Still running at the provider: a detached rerun looks once and leaves it there.
    still = run_cli("run", str(job), "--detach", cwd=tmp_path)
    assert still.returncode == 0, still.stderr
    assert "detached in step sentiment" in still.stderr
    assert simulator.stats()["batches_created"] == 1

    assert simulator.finish_batches() == 1  # the sentiment batch ends; the next will not
    collected = run_cli("run", str(job), "--detach", cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    assert "detached in step complaint: 1 batch(es)" in collected.stderr
    assert simulator.stats()["batches_created"] == 2

    simulator.configure(batch_turnaround_s=0.01)
    done = run_cli("run", str(job), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = pl.read_parquet(tmp_path / "out" / "result.parquet")
    negative = negatives(final)
    assert final.get_column("complaint_response").drop_nulls().len() == negative
    assert simulator.stats()["batch_requests_paid"] == 20 + negative
    assert simulator.stats()["batches_created"] == 2


def test_detach_is_refused_for_a_step_sent_online(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 5)
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT])

    refused = run_cli("run", str(job), "--detach", cwd=tmp_path)

    assert refused.returncode == 2
    assert "--detach: step sentiment is sent online" in refused.stderr
    assert paid(simulator) == 0
