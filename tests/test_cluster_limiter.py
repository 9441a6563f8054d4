"""The cluster-wide limiter's schedule, on a virtual clock (no Ray needed)."""

from __future__ import annotations

import anyio
import pytest

from pipeline.cluster.limiter import (
    MAX_LEASE,
    SLICE_S,
    UNPACED_LEASE,
    ClusterLimiter,
    Lease,
    LeasedPacer,
    WorkerReport,
)
from pipeline.cluster.shards import Shard, plan_shards


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_leases_from_many_workers_never_exceed_the_rate() -> None:
    clock = Clock()
    limiter = ClusterLimiter(6000, None, concurrency=64, clock=clock)
    grants: list[float] = []
    for round_ in range(50):
        for worker in ("a", "b", "c", "d"):
            grants += limiter.lease(WorkerReport(worker), tokens_each=100).grants()
        clock.now += 0.05 * (round_ % 3)
    grants.sort()
    # Any one-second window holds at most 99% of the 100 a second allowed (+1 for the edge).
    for i, start in enumerate(grants):
        in_window = sum(1 for t in grants[i:] if t < start + 1.0)
        assert in_window <= 100 * 0.99 + 1
    # Each lease covers about SLICE_S of the schedule: a few calls a second, not one a request.
    assert limiter.leases == 200
    assert len(grants) == 200 * int(SLICE_S * 99)


def test_token_limit_spaces_leases_by_each_requests_tokens() -> None:
    clock = Clock()
    limiter = ClusterLimiter(None, 60_000, concurrency=8, clock=clock)  # 1,000 tokens a second
    lease = limiter.lease(WorkerReport("a"), tokens_each=500)
    assert lease.spacing_s == pytest.approx(500 / (1000 * 0.99))


def test_a_429_pauses_every_worker_and_shrinks_the_window() -> None:
    clock = Clock()
    limiter = ClusterLimiter(6000, None, concurrency=40, clock=clock)
    limiter.lease(WorkerReport("a"), 10)
    limiter.lease(WorkerReport("b"), 10)
    lease = limiter.lease(
        WorkerReport("a", rate_limited_s=2.0, rate_limited_at=clock.now), tokens_each=10
    )
    assert lease.paused_until == pytest.approx(clock.now + 2.0)
    other = limiter.lease(WorkerReport("b"), 10)
    assert other.start_at >= clock.now + 2.0
    assert limiter.window.size == 28  # 40 * 0.7
    assert other.window == 14  # shared by the two active workers


def test_no_known_limit_hands_out_unpaced_leases_and_learns_from_headers() -> None:
    clock = Clock()
    limiter = ClusterLimiter(None, None, concurrency=16, clock=clock)
    lease = limiter.lease(WorkerReport("a"), 10)
    assert lease.spacing_s == 0 and lease.count == UNPACED_LEASE
    learned = limiter.lease(WorkerReport("a", limit_requests=600), 10)
    assert learned.spacing_s == pytest.approx(1 / (10 * 0.99))
    assert learned.count <= MAX_LEASE


def test_a_stop_reaches_every_worker() -> None:
    limiter = ClusterLimiter(600, None, concurrency=4, clock=Clock())
    limiter.lease(WorkerReport("a", stop="authentication: key rejected"), 10)
    lease = limiter.lease(WorkerReport("b"), 10)
    assert lease.stop == "authentication: key rejected" and lease.count == 0


def test_leased_pacer_sends_on_its_grants_and_asks_again_when_they_run_out() -> None:
    limiter = ClusterLimiter(None, None, concurrency=4)
    calls: list[WorkerReport] = []

    async def lease(report: WorkerReport, tokens: float) -> Lease:
        calls.append(report)
        return limiter.lease(report, tokens, wanted=3)

    async def main() -> None:
        pacer = LeasedPacer("w", lease, max_concurrency=4)
        for _ in range(7):
            await pacer.acquire(10)
            pacer.release(succeeded=True)
        assert pacer.leases == len(calls) >= 3

    anyio.run(main)


def test_shards_follow_row_groups_and_cover_every_row_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import polars as pl

    from pipeline.inputs import InputTable

    pl.DataFrame({"x": list(range(1000))}).write_parquet(tmp_path / "a.parquet", row_group_size=100)
    table = InputTable(str(tmp_path / "a.parquet"))
    shards = plan_shards(table, 1000, workers=2)
    assert [s.start for s in shards] == [0, 200, 400, 600, 800]
    assert shards[-1] == Shard(4, 800, 1000)
    assert plan_shards(table, 250, workers=2)[-1].stop == 250


def test_budget_allowances_never_exceed_the_limit_and_a_finished_worker_frees_the_rest() -> None:
    from pipeline.cluster.budget import Allowances

    limiter = ClusterLimiter(None, None, concurrency=8, budget=Allowances(1.0, None, spent_usd=0.2))
    held = {"a": 0.0, "b": 0.0}
    for _ in range(40):
        for worker in held:
            usd, tokens = limiter.allow(WorkerReport(worker), (0.01, 0.0), (0.1, 0.0))
            held[worker] += usd
            assert tokens == 0.0  # no token limit: nothing to hand out
    # Earlier runs spent 0.2: the workers together hold the other 0.8, never more.
    assert sum(held.values()) == pytest.approx(0.8)
    assert limiter.allow(WorkerReport("b"), (0.01, 0.0), (0.1, 0.0))[0] == 0.0
    # Worker a ends having spent 0.1 of what it held: the rest is free for b.
    limiter.report(WorkerReport("a", spent_usd=0.1, done=True))
    usd, _ = limiter.allow(WorkerReport("b"), (0.01, 0.0), (1.0, 0.0))
    assert usd == pytest.approx(held["a"] - 0.1)
