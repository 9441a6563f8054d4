"""The pure pacing policy on a controlled clock, and one schedule from both its owners.

`PacingPolicy` is given the time with every call, so these tests set it; the last
tests drive the local `Pacer` and a worker's `LeasedPacer` (leasing from a
`ClusterLimiter`) with the same requests and answers on one virtual clock and
compare the start times they give.
"""

from __future__ import annotations

import anyio
import pytest
from virtual_clock import run_virtual

from pipeline.cluster.limiter import ClusterLimiter, Lease, LeasedPacer, WorkerReport
from pipeline.errors import RateLimited
from pipeline.pacing import (
    BACKOFF_FACTOR,
    BOOKING_HORIZON_S,
    EDGE_AFTER_S,
    HEADROOM,
    ConcurrencyWindow,
    PacingPolicy,
)
from pipeline.ratelimit import Pacer, PacerBase
from pipeline.types import ChatRequest, Completion, RateLimitInfo

T0 = 1000.0  # the virtual clock's start


def turns(policy: PacingPolicy, now: float, count: int, tokens: float = 10) -> list[float]:
    """The starts of `count` requests asked for at `now`, each asking again when told to."""
    starts: list[float] = []
    while len(starts) < count:
        turn = policy.take_turn(now, tokens)
        if turn.booked:
            starts.append(turn.at)
        else:
            now = turn.at
    return starts


def test_a_known_limits_share_of_each_second_starts_at_once_and_is_booked_half_a_second_ahead() -> (
    None
):
    policy = PacingPolicy(9000, None, max_concurrency=500)  # 150 a second
    assert turns(policy, T0, 150) == [T0] * 150
    later = policy.take_turn(T0, 10)
    assert not later.booked and later.at == T0 + 1 - BOOKING_HORIZON_S
    assert turns(policy, later.at, 150) == [T0 + 1] * 150


@pytest.mark.parametrize(
    ("rpm", "tpm", "rejected"),
    [(9000, None, False), (9000, 300_000, False), (6000, None, True)],
    ids=["requests", "requests and tokens", "evenly spaced after a 429"],
)
def test_turns_booked_together_are_the_turns_booked_one_by_one(
    rpm: float, tpm: float | None, rejected: bool
) -> None:
    one_by_one, together = (PacingPolicy(rpm, tpm, max_concurrency=64) for _ in range(2))
    if rejected:
        for policy in (one_by_one, together):
            policy.rate_limited(0.5, now=T0)
    expected = turns(one_by_one, T0, 700, tokens=30)
    starts: list[float] = []
    now = T0
    while len(starts) < 700:
        turn = together.take_turns(now, 30, min(64, 700 - len(starts)))
        if turn.booked:
            starts += [turn.at] * turn.count
        else:
            now = turn.at
    assert starts == pytest.approx(expected, abs=1e-9)


def test_window_edges_from_resets_move_each_share_to_the_servers_second() -> None:
    policy = PacingPolicy(6000, None, max_concurrency=500)
    # The server's window ends 0.3 s after this request was sent, to the millisecond.
    report = RateLimitInfo(
        limit_requests=6000, remaining_requests=40, reset_requests_s=0.3, reset_to_the_ms=True
    )
    policy.observe(report, now=T0 + 0.1, sent_at=T0)
    starts = turns(policy, T0 + 0.1, 100)
    # Until the edge at T0 + 0.3 nothing is booked yet, so the whole share may go now;
    # bookings count only until the window they land in ends.
    assert starts == [T0 + 0.1] * 100
    assert turns(policy, T0 + 0.1, 1) == [T0 + 0.3 + EDGE_AFTER_S]


def test_a_429_pauses_as_asked_and_turns_to_even_spacing_under_the_limit() -> None:
    policy = PacingPolicy(6000, None, max_concurrency=40)
    turns(policy, T0, 100)
    policy.rate_limited(2.0, now=T0 + 0.2, sent_at=T0)
    starts = turns(policy, T0 + 0.2, 3)
    spacing = 1 / (100 * HEADROOM)
    assert starts == pytest.approx([T0 + 2.2, T0 + 2.2 + spacing, T0 + 2.2 + 2 * spacing])
    assert policy.window.size == 28
    # A request of the same overload extends the pause but does not shrink again.
    policy.rate_limited(3.0, now=T0 + 0.3, sent_at=T0 + 0.1)
    assert policy.window.size == 28 and policy.paused_until == T0 + 3.3


def test_without_a_limit_a_429_backs_the_rate_off_and_successes_bring_it_back() -> None:
    policy = PacingPolicy(None, None, max_concurrency=64)
    for i in range(21):
        policy.take_turn(T0 + i * 0.05, 10)
        policy.started(T0 + i * 0.05)  # 20 a second
    policy.rate_limited(None, now=T0 + 1.0)
    assert policy.requests.adaptive == pytest.approx(20 * BACKOFF_FACTOR)
    assert policy.paused_until == T0 + 2.0
    policy.succeeded(T0 + 2.5)  # within a second of the pause: no evidence yet
    assert policy.requests.adaptive == pytest.approx(20 * BACKOFF_FACTOR)
    policy.succeeded(T0 + 3.0)
    assert policy.requests.adaptive == pytest.approx(20 * BACKOFF_FACTOR * 1.02)


def test_the_window_slow_starts_then_grows_a_step_a_second_and_not_while_paused() -> None:
    window = ConcurrencyWindow(cap=20, initial=16)
    window.grow(T0, paused_until=0.0)
    window.grow(T0, paused_until=0.0)
    assert window.size == 18  # slow start: one more a success
    window.back_off(T0)
    assert window.size == 12 and not window.slow_start
    window.grow(T0 + 0.5, paused_until=0.0)
    assert window.size == 12
    window.grow(T0 + 1.5, paused_until=T0 + 1.0)  # only 0.5 s since the pause ended
    assert window.size == 12
    window.grow(T0 + 2.0, paused_until=T0 + 1.0)
    assert window.size == 13


def test_an_unknown_limit_probes_with_a_few_requests_and_a_learned_one_opens_the_window() -> None:
    policy = PacingPolicy(None, None, max_concurrency=128)
    assert policy.window.size == 16 and not policy.paces
    assert turns(policy, T0, 16) == [T0] * 16
    policy.observe(RateLimitInfo(limit_requests=600, remaining_requests=584), now=T0 + 0.1)
    assert policy.window.size == 128
    # The 16 sent unpaced are booked as if paced: at 10 a second, the next at T0 + 1.6.
    assert turns(policy, T0 + 0.6, 1) == [T0 + 1.6]


# -- one schedule from the local pacer and the cluster's limiter -------------------------

REQUEST = ChatRequest(0, "k", [], "h", prompt_estimate=90, reply_budget=10)


def local_pacer(rpm: float) -> PacerBase:
    return Pacer(rpm, None, max_concurrency=1000)


def leased_pacer(rpm: float) -> PacerBase:
    # Without the lead a worker needs to have its turns before they start (on one clock,
    # the calls take no time).
    limiter = ClusterLimiter(rpm, None, concurrency=1000, clock=anyio.current_time, lead_s=0)

    async def lease(report: WorkerReport, tokens: float) -> Lease:
        return limiter.lease(report, tokens)

    return LeasedPacer("w", lease, max_concurrency=1000, wall_clock=anyio.current_time)


EDGE_PHASE = 0.3  # the server's one-second windows end this long after each whole second
# of a schedule (counted from its start)


def window_report(sent_at: float, origin: float) -> Completion:
    """An answer reporting, to the millisecond, how long its window had left."""
    left = (origin + EDGE_PHASE - sent_at) % 1.0 or 1.0
    limits = RateLimitInfo(
        limit_requests=9000, remaining_requests=0, reset_requests_s=left, reset_to_the_ms=True
    )
    return Completion("ok", None, None, "stop", "m", rate_limits=limits)


async def schedule(
    pacer: PacerBase, requests: int, rejected: int | None, windows: bool = False
) -> list[float]:
    """The start times of `requests` asked for at once; request `rejected` gets a 429
    (retry after 1 s) 0.2 s after it starts; with `windows`, every other answer comes
    0.1 s after it starts and says where the server's window ends, else at once."""
    starts: list[float | None] = [None] * requests
    origin = anyio.current_time()

    async def one(index: int) -> None:
        sent_at = await pacer.take_turn(REQUEST)
        starts[index] = sent_at
        if index == rejected:
            await anyio.sleep(0.2)
            pacer.end_turn(REQUEST, sent_at, RateLimited("slow down", retry_after=1.0))
        elif windows:
            await anyio.sleep(0.1)
            pacer.end_turn(REQUEST, sent_at, window_report(sent_at, origin))
        else:
            pacer.end_turn(REQUEST, sent_at, None)

    async with anyio.create_task_group() as group:
        for index in range(requests):
            group.start_soon(one, index)
    return sorted(t for t in starts if t is not None)


@pytest.mark.parametrize("rejected", [None, 149], ids=["shares", "429 in the first second"])
def test_the_local_pacer_and_the_clusters_limiter_give_the_same_schedule(
    rejected: int | None,
) -> None:
    async def both() -> tuple[list[float], list[float]]:
        local = await schedule(local_pacer(9000), 600, rejected)
        offset = anyio.current_time() - T0  # the second run starts where the first ended
        leased = await schedule(leased_pacer(9000), 600, rejected)
        return local, [t - offset for t in leased]

    local, leased = run_virtual(both)
    assert leased == pytest.approx(local, abs=1e-9)
    if rejected is None:
        assert local == [T0 + second for second in range(4) for _ in range(150)]
    else:
        # The share of the first second, then the pause, then even spacing 1% under.
        assert local[:150] == [T0] * 150
        assert local[150] == pytest.approx(T0 + 1.2)
        assert local[-1] - local[150] == pytest.approx(449 / (150 * HEADROOM))


def test_the_local_pacer_and_the_clusters_limiter_place_shares_by_the_same_window_edges() -> None:
    async def both() -> tuple[list[float], list[float]]:
        local = await schedule(local_pacer(9000), 600, None, windows=True)
        offset = anyio.current_time() - T0
        leased = await schedule(leased_pacer(9000), 600, None, windows=True)
        return local, [t - offset for t in leased]

    local, leased = run_virtual(both)
    assert leased == pytest.approx(local, abs=1e-9)
    # After the first share (sent before any answer), each starts just after an edge.
    later = sorted(set(local))[2:]
    assert later and all((t - T0 - EDGE_PHASE) % 1.0 == pytest.approx(EDGE_AFTER_S) for t in later)
