"""Inputs and outputs in object storage: a real S3 API (moto's server) on loopback."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import make_job, reviews, run_cli

from pipeline import storage
from pipeline.errors import SpecError
from pipeline.simulator import RunningSimulator

# Differs run to run by nature; every other column must be identical.
TIMING = ["latency_s"]


def put(local: Path, uri: str) -> None:
    storage.upload(local, uri)


def read_remote(uri: str) -> pl.DataFrame:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as handle:
        return pl.from_arrow(pq.read_table(handle))  # type: ignore[return-value]


def test_s3_input_and_output_give_the_same_output_as_a_local_run(
    tmp_path: Path, simulator: RunningSimulator, s3: dict[str, str]
) -> None:
    bucket = s3["BUCKET"]
    data = reviews(30)
    (tmp_path / "parts").mkdir()
    data[:12].write_parquet(tmp_path / "parts" / "a.parquet", row_group_size=5)
    data[12:].write_parquet(tmp_path / "parts" / "b.parquet", row_group_size=5)
    for name in ("a.parquet", "b.parquet"):
        put(tmp_path / "parts" / name, f"s3://{bucket}/in/{name}")

    local_job = make_job(tmp_path, simulator, input_path="parts/*.parquet", name="local")
    assert run_cli("run", str(local_job), cwd=tmp_path).returncode == 0
    local = pl.read_parquet(tmp_path / "out" / "result.parquet")

    remote_job = make_job(
        tmp_path,
        simulator,
        name="remote",
        input_path=f"s3://{bucket}/in/*.parquet",
        output__path=f"s3://{bucket}/out/result.parquet",
    )
    stage = tmp_path / "stage"
    result = run_cli("run", str(remote_job), cwd=tmp_path, **s3, PIPELINE_STAGE_DIR=str(stage))

    assert result.returncode == 0, result.stderr
    assert f"s3://{bucket}/out/result.parquet" in result.stderr
    remote = read_remote(f"s3://{bucket}/out/result.parquet")
    assert remote.drop(TIMING).equals(local.drop(TIMING))
    assert simulator.stats()["completions"] == 2 * 30  # each run sent every row once

    # A rerun resumes from the local stage: nothing is sent again.
    before = simulator.stats()["completions"]
    again = run_cli("run", str(remote_job), cwd=tmp_path, **s3, PIPELINE_STAGE_DIR=str(stage))
    assert again.returncode == 0, again.stderr
    assert simulator.stats()["completions"] == before


def test_s3_csv_input(tmp_path: Path, simulator: RunningSimulator, s3: dict[str, str]) -> None:
    bucket = s3["BUCKET"]
    reviews(7).write_csv(tmp_path / "reviews.csv")
    put(tmp_path / "reviews.csv", f"s3://{bucket}/reviews.csv")
    job = make_job(tmp_path, simulator, input_path=f"s3://{bucket}/reviews.csv")

    result = run_cli("run", str(job), cwd=tmp_path, **s3)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == reviews(7)["review_id"].to_list()
    assert out["error"].null_count() == 7


def test_missing_remote_input_is_refused_before_sending(
    tmp_path: Path, simulator: RunningSimulator, s3: dict[str, str]
) -> None:
    bucket = s3["BUCKET"]
    job = make_job(tmp_path, simulator, input_path=f"s3://{bucket}/nothing/*.csv")

    result = run_cli("run", str(job), cwd=tmp_path, **s3)

    assert result.returncode == 2
    assert f"no file matches 's3://{bucket}/nothing/*.csv'" in result.stderr
    assert simulator.stats()["completions"] == 0


def test_unwritable_bucket_is_refused(s3: dict[str, str]) -> None:
    with pytest.raises(SpecError, match=r"output\.path: cannot write to s3://no-such-bucket-x"):
        storage.check_writable("s3://no-such-bucket-x/out.parquet")


def test_local_paths_are_not_remote() -> None:
    assert not storage.is_remote("data/in.csv")
    assert not storage.is_remote(Path("s3:/odd"))
    assert storage.is_remote("s3://bucket/key.csv")
    assert storage.suffix("gs://b/dir/x.PARQUET") == ".parquet"


def test_remote_glob_lists_only_matching_files(s3: dict[str, str], tmp_path: Path) -> None:
    bucket = s3["BUCKET"]
    fs = pafs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"], region="us-east-1")
    for key in ("d/1.csv", "d/2.csv", "d/sub/3.csv", "d/x.txt"):
        with fs.open_output_stream(f"{bucket}/{key}") as stream:
            stream.write(b"a\n1\n")
    assert storage.expand(f"s3://{bucket}/d/*.csv") == [
        f"s3://{bucket}/d/1.csv",
        f"s3://{bucket}/d/2.csv",
    ]


def test_a_job_with_steps_writes_its_outputs_to_s3_and_resumes_from_the_stage(
    tmp_path: Path, simulator: RunningSimulator, s3: dict[str, str]
) -> None:
    bucket = s3["BUCKET"]
    reviews(40).write_csv(tmp_path / "reviews.csv")
    steps = [
        {
            "name": "sentiment",
            "prompt": {"template": "Classify: {{ text }}"},
            "output": {"schema": {"label": {"enum": ["positive", "negative", "neutral"]}}},
        },
        {"name": "per_label", "reduce": {"by": "label"}, "prompt": {"template": "{{ rows }}"}},
    ]
    uri = f"s3://{bucket}/out/result.parquet"
    job = make_job(tmp_path, simulator, prompt=None, steps=steps, output__path=uri)
    stage = {**s3, "PIPELINE_STAGE_DIR": str(tmp_path / "stage")}

    done = run_cli("run", str(job), cwd=tmp_path, **stage)

    assert done.returncode == 0, done.stderr
    rows = read_remote(uri)
    groups = read_remote(f"s3://{bucket}/out/result.per_label.parquet")
    assert rows.height == 40
    assert rows.get_column("sentiment_label").null_count() == 0
    assert sorted(groups.get_column("label").cast(pl.String).to_list()) == sorted(
        rows.get_column("sentiment_label").unique().to_list()
    )
    assert f"uploaded: {uri}" in done.stderr
    sent = simulator.stats()["completions"]
    assert sent == 40 + groups.height

    # The steps' records live in the local stage: a rerun sends nothing, and status reads them.
    again = run_cli("run", str(job), cwd=tmp_path, **stage)
    assert again.returncode == 0, again.stderr
    assert simulator.stats()["completions"] == sent
    status = run_cli("status", str(job), cwd=tmp_path, **stage)
    assert "sentiment" in status.stdout + status.stderr
    assert "not started" not in status.stdout + status.stderr


def test_a_job_with_steps_and_an_unwritable_bucket_is_refused_before_sending(
    tmp_path: Path, simulator: RunningSimulator, s3: dict[str, str]
) -> None:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    steps = [{"name": "summary", "prompt": {"template": "{{ text }}"}}]
    job = make_job(
        tmp_path,
        simulator,
        prompt=None,
        steps=steps,
        output__path="s3://no-such-bucket-x/out/result.parquet",
    )

    done = run_cli("run", str(job), cwd=tmp_path, **s3)

    assert done.returncode == 2
    assert "output.path: cannot write to s3://no-such-bucket-x" in done.stderr
    assert simulator.stats()["completions"] == 0
