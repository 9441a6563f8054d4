"""The cluster-wide limiter's schedule, on a virtual clock (no Ray needed)."""

from __future__ import annotations

import anyio
import pytest

from pipeline.cluster.limiter import (
    LEAD_S,
    Answer,
    ClusterLimiter,
    Lease,
    LeasedPacer,
    WorkerReport,
)
from pipeline.cluster.shards import Shard, plan_shards
from pipeline.types import RateLimitInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease_until(limiter: ClusterLimiter, clock: Clock, worker: str, tokens: float) -> Lease:
    """A lease with turns in it, the clock moved on as a worker waits to ask again."""
    while True:
        lease = limiter.lease(WorkerReport(worker, cap=16), tokens)
        if lease.starts or lease.ask_again_at is None:
            return lease
        clock.now = lease.ask_again_at


def test_leases_from_many_workers_never_exceed_the_limit_in_any_second() -> None:
    clock = Clock()
    limiter = ClusterLimiter(6000, None, concurrency=64, clock=clock)
    grants: list[float] = []
    while clock.now < 1010:
        for worker in ("a", "b", "c", "d"):
            lease = lease_until(limiter, clock, worker, 100)
            # At most what the worker may have in flight (its share of the window) at
            # a time: a few calls a second, not one a request.
            assert 0 < len(lease.starts) <= 16
            grants += lease.grants()
    grants.sort()
    # Any one-second window holds at most the 100 a second allowed, and each of the
    # limiter's seconds is given all of them, each second's share at its start.
    for i, start in enumerate(grants):
        assert sum(1 for t in grants[i:] if t < start + 1.0) <= 100
    for second in range(1000, 1010):
        assert sum(1 for t in grants if second <= t < second + 1) == 100


def test_a_lease_holds_no_more_turns_than_the_workers_share_of_the_window() -> None:
    clock = Clock()
    limiter = ClusterLimiter(None, 600_000, concurrency=8, clock=clock)  # 100 requests a second
    assert len(limiter.lease(WorkerReport("a"), tokens_each=100).starts) == 8
    limiter.lease(WorkerReport("b"), tokens_each=100)
    assert len(limiter.lease(WorkerReport("a"), tokens_each=100).starts) == 4


def test_a_429_pauses_every_worker_turns_to_even_spacing_and_shrinks_the_window() -> None:
    clock = Clock()
    limiter = ClusterLimiter(6000, None, concurrency=40, clock=clock)
    limiter.lease(WorkerReport("a"), 10)
    limiter.lease(WorkerReport("b"), 10)
    rejected = Answer(clock.now - 0.1, clock.now, False, rate_limited=True, retry_after=2.0)
    lease = limiter.lease(WorkerReport("a", answers=[rejected]), tokens_each=10)
    assert lease.paused_until == pytest.approx(clock.now + 2.0)
    assert lease.starts[0] >= clock.now + 2.0
    other = limiter.lease(WorkerReport("b"), 10)
    assert other.starts[0] >= clock.now + 2.0
    assert limiter.policy.window.size == 28  # 40 * 0.7
    assert other.window == 14  # shared by the two active workers
    # Evenly spaced from now on, 1% under the limit.
    gaps = {round(b - a, 6) for a, b in zip(other.starts, other.starts[1:], strict=False)}
    assert gaps == {round(1 / 99, 6)}


def test_no_known_limit_hands_out_unpaced_leases_and_learns_from_headers() -> None:
    clock = Clock()
    limiter = ClusterLimiter(None, None, concurrency=128, clock=clock)
    lease = limiter.lease(WorkerReport("a"), 10)
    # Probing: 16 requests at once, as one process would.
    assert lease.starts == (clock.now + LEAD_S,) * 16
    headers = RateLimitInfo(limit_requests=600, remaining_requests=590)
    answer = Answer(clock.now, clock.now + 0.1, True, rate_limits=headers)
    clock.now += 0.1
    learned = limiter.lease(WorkerReport("a", answers=[answer]), 10)
    assert limiter.policy.requests.learned == 10
    assert limiter.policy.window.size == 128  # the rate paces now: the window opens
    # The 16 sent unpaced were booked against the second they went out in.
    assert learned.starts == () and learned.ask_again_at is not None


def test_turns_start_a_lead_after_the_call_so_the_worker_has_them_in_time() -> None:
    clock = Clock()
    limiter = ClusterLimiter(6000, None, concurrency=8, clock=clock)
    lease = limiter.lease(WorkerReport("a", waiting=3), 10)
    assert lease.starts == (clock.now + LEAD_S,) * 3


def test_a_stop_reaches_every_worker() -> None:
    limiter = ClusterLimiter(600, None, concurrency=4, clock=Clock())
    limiter.lease(WorkerReport("a", stop="authentication: key rejected"), 10)
    lease = limiter.lease(WorkerReport("b"), 10)
    assert lease.stop == "authentication: key rejected" and lease.starts == ()


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
