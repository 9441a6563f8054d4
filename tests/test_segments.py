"""A cluster shard's segments (`cluster/segments.py`): what a read of them returns."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster.segments import SEGMENT_SCHEMA, ShardStore, StateRoot


def row(key: str, request_hash: str, error: str | None, finished_at: float) -> tuple[object, ...]:
    values: dict[str, object] = dict.fromkeys(SEGMENT_SCHEMA.names)
    values.update(row_key=key, request_hash=request_hash, error=error, finished_at=finished_at)
    return tuple(values[name] for name in SEGMENT_SCHEMA.names)


def test_a_rows_latest_result_wins_whichever_attempts_segment_sorts_first(
    tmp_path: Path,
) -> None:
    """Segments are named by the attempt that wrote them, at random: a rerun's answer to
    a row whose input was fixed must not lose to the earlier run's error."""
    root = StateRoot(str(tmp_path / "state"))
    ShardStore(root, 0, attempt="ffffffffffff").commit([row("r1", "old", "http_400", 1.0)], [])
    ShardStore(root, 0, attempt="000000000000").commit([row("r1", "new", None, 2.0)], [])

    found = ShardStore(root, 0).read().finished(["r1"])

    assert found["r1"].request_hash == "new"
    assert found["r1"].ok
