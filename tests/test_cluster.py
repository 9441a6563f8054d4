"""Cluster runs (`pipeline run --ray`): a real local Ray cluster, the real simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import polars as pl
import pytest
from conftest import SIM_KEY, make_job, messages_for, reviews, run_cli, start_cli
from test_resume import billed_usd, settle

from pipeline.checkpoint import Journal
from pipeline.columns import RESULT_NAMES
from pipeline.resolve import resolve_job as prepare
from pipeline.runs import RunEnd, RunOptions
from pipeline.simulator import RunningSimulator, expected_response

MODEL = "x-ai-grok-3-mini"
TIMING = ["latency_s"]
POLL_S = 0.05  # differs run to run by nature; every other column must match

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cluster_run(job: Path, workers: int = 2, **options: object):  # type: ignore[no-untyped-def]
    from pipeline.cluster import ClusterOptions, run_on_ray

    prepared = prepare(job)
    return run_on_ray(
        prepared, RunOptions(show_progress=False, **options), ClusterOptions(workers=workers)
    )


def check_answers(out: pl.DataFrame) -> None:
    for row in out.iter_rows(named=True):
        assert row["error"] is None, row["error"]
        assert row["response"] == expected_response(MODEL, messages_for(row["text"]))


@pytest.fixture
def sim_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)


def test_cluster_output_is_the_local_output(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, sim_key: None
) -> None:
    data = reviews(400)
    data.write_parquet(tmp_path / "reviews.parquet", row_group_size=50)
    local_job = make_job(tmp_path, simulator, input_path="reviews.parquet", name="local")
    assert run_cli("run", str(local_job), cwd=tmp_path).returncode == 0
    local = pl.read_parquet(tmp_path / "out" / "result.parquet")
    simulator.reset()

    job = make_job(
        tmp_path,
        simulator,
        input_path=str(tmp_path / "reviews.parquet"),
        name="cluster",
        output__path=str(tmp_path / "out" / "cluster.parquet"),
    )
    summary = cluster_run(job)

    assert summary.end is RunEnd.ALL_OK
    out = pl.read_parquet(tmp_path / "out" / "cluster.parquet")
    assert out.columns == [*data.columns, *RESULT_NAMES]
    assert out.drop(TIMING).equals(local.drop(TIMING))
    check_answers(out)
    stats = simulator.stats()
    assert stats["completions"] == 400
    assert stats["duplicate_paid"] == 0
    # One run log for the whole cluster, every attempt in it.
    events = [orjson.loads(line) for line in summary_log(tmp_path, "cluster.parquet")]
    assert sum(e["event"] == "attempt" for e in events) == 400
    assert len({e["shard"] for e in events if e["event"] == "shard_finished"}) > 1

    # A rerun sends nothing.
    again = cluster_run(job)
    assert again.end is RunEnd.ALL_OK and again.sent == 0 and again.reused == 400
    assert simulator.stats()["completions"] == 400


def summary_log(workdir: Path, name: str) -> list[bytes]:
    return (workdir / "out" / f"{name}.run" / "events.jsonl").read_bytes().splitlines()


def test_workers_share_one_rate_limit(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, sim_key: None
) -> None:
    # The server enforces 3,000 RPM per second (50 a second); two workers together stay under.
    simulator.configure(rpm=3000, limit_window="second", latency_ms=(20, 60))
    reviews(500).write_parquet(tmp_path / "reviews.parquet", row_group_size=50)
    job = make_job(
        tmp_path,
        simulator,
        input_path=str(tmp_path / "reviews.parquet"),
        output__path=str(tmp_path / "out" / "result.parquet"),
        limits__requests_per_minute=3000,
        limits__concurrency=32,
    )

    summary = cluster_run(job)

    assert summary.end is RunEnd.ALL_OK
    check_answers(pl.read_parquet(tmp_path / "out" / "result.parquet"))
    stats = simulator.stats()
    # benchmarks/cluster.py measures 0.04% over 20,000 rows. Here the simulator shares
    # the test process, and on a busy machine its own delays move a few requests into
    # the next one-second window. Workers pacing apart, each at the whole limit, send
    # twice the limit and see hundreds rejected.
    assert stats["rate_limited"] <= 0.03 * 500
    assert stats["completions"] == 500


def test_folder_output_has_one_part_per_shard(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, sim_key: None
) -> None:
    data = reviews(200)
    data.write_csv(tmp_path / "a.csv")
    (tmp_path / "more").mkdir()
    reviews(300)[200:].write_csv(tmp_path / "more" / "b.csv")
    job = make_job(
        tmp_path,
        simulator,
        input_path=str(tmp_path / "*.csv"),
        output__path=str(tmp_path / "parts") + "/",
    )

    summary = cluster_run(job)

    assert summary.end is RunEnd.ALL_OK
    parts = sorted((tmp_path / "parts").glob("part-*.parquet"))
    assert len(parts) > 1
    out = pl.concat([pl.read_parquet(p) for p in parts])
    assert out["review_id"].to_list() == data["review_id"].to_list()
    check_answers(out)


def test_sigkill_of_a_worker_loses_nothing_and_repays_only_what_was_in_flight(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    simulator.configure(latency_ms=(30, 60))
    rows = 1200
    reviews(rows).write_parquet(tmp_path / "reviews.parquet", row_group_size=100)
    job = make_job(
        tmp_path,
        simulator,
        input_path="reviews.parquet",
        limits__requests_per_minute=6000,  # 100 a second: long enough to kill mid-run
        limits__concurrency=8,
    )
    driver = start_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)
    state = tmp_path / "out" / "result.parquet.cluster"
    try:
        victim, shard = wait_for_a_running_shard(state, driver)
        # Killed while answers it has not committed yet wait in its journal.
        wait_for_journaled_answers(state / "journal" / f"{shard:05d}", 5, driver)
        os.kill(victim, signal.SIGKILL)
        _, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == rows
    assert out["review_id"].n_unique() == rows
    check_answers(out)
    stats = simulator.stats()
    # Paid twice: at most what the worker had in flight when it was killed, which its
    # window bounds (its share of the cap: 8 over 2 workers; the simulator's gauge
    # misses answers sent but not yet read). The 5 or more answers it had not
    # committed were in its journal, and the worker that took the shard over kept them.
    assert stats["duplicate_paid"] <= 8 // 2
    assert stats["distinct_paid"] == rows
    # Every shard finished, the killed one on another attempt.
    events = [orjson.loads(line) for line in summary_log(tmp_path, "result.parquet")]
    finished = {e["shard"] for e in events if e["event"] == "shard_finished"}
    layout = orjson.loads((state / "shards.json").read_bytes())
    assert finished == {s["index"] for s in layout["shards"]}


def wait_for_a_running_shard(state: Path, driver: subprocess.Popen[str]) -> tuple[int, int]:
    """The pid of a worker that has committed rows of a shard it has not finished,
    and that shard."""
    while driver.poll() is None:
        started: dict[int, int] = {}
        finished: set[int] = set()
        committed: dict[int, int] = {}
        for log in state.glob("shards/*/*.jsonl"):
            for line in log.read_bytes().splitlines():
                event = orjson.loads(line)
                if event["event"] == "shard_started":
                    started[event["shard"]] = event["pid"]
                elif event["event"] in ("shard_finished", "shard_stopped"):
                    finished.add(event["shard"])
        for segment in state.glob("shards/*/*.parquet"):
            shard = int(segment.parent.name)
            committed[shard] = committed.get(shard, 0) + 1
        for shard, pid in started.items():
            if shard not in finished and committed.get(shard, 0) >= 2:
                return pid, shard
        time.sleep(POLL_S)  # re-read the state a few times a second, not in a busy loop
    raise AssertionError(f"the run ended before a worker was killed: {driver.communicate()}")


def wait_for_journaled_answers(folder: Path, rows: int, driver: subprocess.Popen[str]) -> None:
    """Until the shard's journal holds `rows` answers not yet committed."""
    while driver.poll() is None:
        if len(Journal(folder, "landed").replay()) >= rows:
            return
        time.sleep(POLL_S / 10)  # a commit empties the journal twice a second
    raise AssertionError(f"the run ended before a worker was killed: {driver.communicate()}")


def test_driver_killed_and_rerun_resumes_without_resending(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    simulator.configure(latency_ms=(20, 40))
    rows = 1200
    reviews(rows).write_parquet(tmp_path / "reviews.parquet", row_group_size=100)
    job = make_job(
        tmp_path,
        simulator,
        input_path="reviews.parquet",
        limits__requests_per_minute=6000,
        limits__concurrency=8,
    )
    driver = start_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)
    state = tmp_path / "out" / "result.parquet.cluster"
    try:
        while driver.poll() is None and len(list(state.glob("shards/*/*.parquet"))) < 4:
            time.sleep(POLL_S)  # re-read the state a few times a second
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    # Ray ends a dead driver's workers; wait for that, then see what was committed.
    wait_until_no_shard_runs()
    committed = committed_keys(state)
    paid_before = simulator.stats()["completions"]
    assert 0 < len(committed) < rows

    result = run_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == rows and out["review_id"].n_unique() == rows
    check_answers(out)
    stats = simulator.stats()
    assert stats["distinct_paid"] == rows
    # Nothing committed is sent again: the rerun sent exactly the rest.
    assert stats["completions"] - paid_before == rows - len(committed)
    # Paid twice: at most what was in flight when Ray ended the workers (the window, 8);
    # what they had answered was journaled and is not sent again.
    assert stats["duplicate_paid"] <= 8


def wait_until_no_shard_runs() -> None:
    """Until no process on this machine is a Ray worker running a shard."""
    while True:
        running = False
        for proc in Path("/proc").iterdir():
            try:
                running = (proc / "cmdline").read_bytes().startswith(b"ray::run_shard")
            except OSError:
                continue
            if running:
                break
        if not running:
            return
        time.sleep(POLL_S)


def committed_keys(state: Path) -> set[str]:
    """Rows a run answered: committed to segments, or journaled by a worker killed
    before its next commit."""
    keys: set[str] = set()
    for segment in state.glob("shards/*/*.parquet"):
        keys.update(pl.read_parquet(segment)["row_key"].to_list())
    for folder in state.glob("journal/*"):
        keys.update(str(row[0]) for row in Journal(folder, "landed").replay())
    return keys


def test_s3_input_and_output_on_the_cluster_match_a_local_run(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, s3: dict[str, str], sim_key: None
) -> None:
    from pipeline import storage

    bucket = s3["BUCKET"]
    data = reviews(300)
    data.write_parquet(tmp_path / "reviews.parquet", row_group_size=60)
    storage.upload(tmp_path / "reviews.parquet", f"s3://{bucket}/in/reviews.parquet")
    local_job = make_job(tmp_path, simulator, input_path="reviews.parquet", name="local")
    assert run_cli("run", str(local_job), cwd=tmp_path).returncode == 0
    local = pl.read_parquet(tmp_path / "out" / "result.parquet")

    job = make_job(
        tmp_path,
        simulator,
        name="remote",
        input_path=f"s3://{bucket}/in/reviews.parquet",
        output__path=f"s3://{bucket}/out/result.parquet",
    )
    os.environ.setdefault("PIPELINE_STAGE_DIR", str(tmp_path / "stage"))
    summary = cluster_run(job)

    assert summary.end is RunEnd.ALL_OK
    fs, path = storage.filesystem(f"s3://{bucket}/out/result.parquet")
    with fs.open_input_file(path) as handle:
        remote = pl.read_parquet(handle.read())
    assert remote.drop(TIMING).equals(local.drop(TIMING))
    # Segments live beside the output, in the bucket.
    listing = storage.expand(f"s3://{bucket}/out/result.parquet.cluster/shards/*/*.parquet")
    assert listing
    # Status and export read them there.
    status = run_cli("status", str(job), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "300/300 rows finished (0 failed), 0 pending" in status.stdout
    assert "shards; done, every row has a result" in status.stdout
    exported = run_cli("export", str(job), "--to", str(tmp_path / "all.parquet"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert pl.read_parquet(tmp_path / "all.parquet").drop(TIMING).equals(local.drop(TIMING))


def test_without_ray_the_switch_says_how_to_install_it(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, None)

    result = run_cli("run", str(job), "--ray", cwd=tmp_path, PYTHONPATH=str(blocker))

    assert result.returncode == 2
    assert "pip install 'pipeline[ray]'" in result.stderr
    assert sys.executable  # the same interpreter ran it


def test_python_api_runs_on_the_cluster(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, sim_key: None
) -> None:
    import pipeline

    data = reviews(120)
    job = make_job(
        tmp_path, simulator, input_path="unused.csv", output__path=str(tmp_path / "o.csv")
    )
    out = pipeline.run(
        pipeline.Job.from_yaml(job), data=data, ray=True, ray_workers=2, progress=False
    )
    assert out["review_id"].to_list() == data["review_id"].to_list()
    check_answers(out)


def test_cluster_rows_without_an_id_are_keyed_by_request(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str, sim_key: None
) -> None:
    data = reviews(120).drop("review_id")
    data.write_parquet(tmp_path / "reviews.parquet", row_group_size=30)
    job = make_job(
        tmp_path,
        simulator,
        input_path=str(tmp_path / "reviews.parquet"),
        input__id_column=None,
        output__path=str(tmp_path / "out" / "cluster.parquet"),
    )

    summary = cluster_run(job)

    assert summary.end is RunEnd.ALL_OK
    out = pl.read_parquet(tmp_path / "out" / "cluster.parquet")
    assert out["text"].to_list() == data["text"].to_list()
    check_answers(out)


def test_a_rejected_key_stops_every_worker_with_exit_3(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    reviews(400).write_parquet(tmp_path / "reviews.parquet", row_group_size=50)
    job = make_job(tmp_path, simulator, input_path="reviews.parquet")

    result = run_cli(
        "run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path, key="sk-wrong-key"
    )

    assert result.returncode == 3, result.stderr
    assert "stopped:" in result.stderr
    assert "sk-wrong-key" not in result.stderr
    # Every worker stopped at once: a few probing requests each, not the whole input.
    assert simulator.stats()["requests"] < 100


def test_one_budget_for_the_whole_cluster_stops_every_worker_and_a_larger_one_resumes(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    simulator.configure(latency_ms=(20, 40))
    rows = 400
    data = reviews(rows)
    data.write_parquet(tmp_path / "reviews.parquet", row_group_size=50)
    # About $0.000028 a row: $0.002 buys about 70 of the 400, over two workers.
    job = make_job(tmp_path, simulator, input_path="reviews.parquet", limits__max_cost_usd=0.002)

    first = run_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)

    assert first.returncode == 3, first.stderr
    assert "budget reached across the cluster" in first.stderr
    assert "limits.max_cost_usd = $0.002" in first.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert "finished so far: 0 ok" not in first.stderr  # the summary counts the shards' rows
    settle(simulator)
    assert billed_usd(simulator.stats(full=False)) <= 0.002, "a limit on what is really spent"
    committed = committed_keys(tmp_path / "out" / "result.parquet.cluster")
    assert 0 < len(committed) < rows
    # Both workers spent from the one budget: rows of more than one shard were answered.
    assert len(list((tmp_path / "out" / "result.parquet.cluster").glob("shards/*/*.parquet"))) > 1

    make_job(tmp_path, simulator, input_path="reviews.parquet", limits__max_cost_usd=1.0)
    second = run_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    stats = simulator.stats(full=False)
    assert stats["completions"] == rows and stats["duplicate_paid"] == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == data["review_id"].to_list()
    check_answers(out)


def test_ctrl_c_stops_the_cluster_status_and_export_read_it_and_a_rerun_finishes(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    simulator.configure(latency_ms=(20, 40))
    rows = 1000
    reviews(rows).write_parquet(tmp_path / "reviews.parquet", row_group_size=100)
    job = make_job(
        tmp_path, simulator, input_path="reviews.parquet", limits__requests_per_minute=6000
    )
    driver = start_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)
    state = tmp_path / "out" / "result.parquet.cluster"
    try:
        while driver.poll() is None and len(list(state.glob("shards/*/*.parquet"))) < 4:
            time.sleep(POLL_S)  # re-read the state a few times a second
        # While it runs, status reads what the shards committed.
        live = run_cli("status", str(job), cwd=tmp_path)
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 130, stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert live.returncode == 0, live.stderr
    assert "shards, committing:" in live.stdout, live.stdout
    assert int(live.stdout.split("/")[0].rsplit(" ", 1)[1].replace(",", "")) > 0

    committed = committed_keys(state)
    assert 0 < len(committed) < rows
    stopped = run_cli("status", str(job), cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{len(committed):,}/{rows:,} rows finished (0 failed)" in stopped.stdout
    assert f"{rows - len(committed):,} pending" in stopped.stdout
    assert "--ray` resumes" in stopped.stdout
    exported = run_cli("export", str(job), "--to", str(tmp_path / "partial.parquet"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    partial = pl.read_parquet(tmp_path / "partial.parquet")
    assert sorted(partial["review_id"].to_list()) == sorted(committed)
    check_answers(partial)

    result = run_cli("run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == rows and out["review_id"].n_unique() == rows
    # The interrupted run committed what it had finished: nothing was paid twice.
    assert simulator.stats()["duplicate_paid"] == 0
    done = run_cli("status", str(job), cwd=tmp_path)
    assert f"{rows:,}/{rows:,} rows finished" in done.stdout
    assert "shards; done, every row has a result" in done.stdout


def test_a_second_driver_of_the_same_job_is_refused(
    tmp_path: Path, simulator: RunningSimulator, ray_cluster: str
) -> None:
    from pipeline.runlock import RunLock

    reviews(10).write_parquet(tmp_path / "reviews.parquet")
    job = make_job(tmp_path, simulator, input_path="reviews.parquet")

    with RunLock(tmp_path / "out" / "result.parquet.run"):  # as a running driver holds it
        result = run_cli("run", str(job), "--ray-address", ray_cluster, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "another run" in result.stderr
    assert simulator.stats()["requests"] == 0
