"""The Pacer: a second's share at once, limits learned from headers, 429 pauses, AIMD window.

Every test runs on an asyncio loop with a virtual clock: time only moves when every
task is waiting, and then jumps straight to the next timer. Spacing is therefore
exact, and a test that "waits" a minute finishes in milliseconds. The helper is
duplicated in test_scheduler.py; it could move to conftest.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import TypeVar

import anyio
import pytest
from virtual_clock import run_virtual

from pipeline.pacing import BACKOFF_FACTOR, EDGE_AFTER_S, HEADROOM, ServerWindows
from pipeline.ratelimit import Pacer
from pipeline.types import RateLimitInfo

T = TypeVar("T")
EPS = 1e-6

# -- virtual clock -----------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_virtual_clock_skips_idle_time() -> None:
    async def main() -> float:
        start = anyio.current_time()
        await anyio.sleep(3600)
        return anyio.current_time() - start

    wall = time.monotonic()
    assert run_virtual(main) == pytest.approx(3600)
    assert time.monotonic() - wall < 1.0


# -- pacing by requests and tokens ---------------------------------------------------------


def per_second(times: list[float], start: float) -> list[int]:
    """How many of `times` fall in each whole second after `start`."""
    counts: dict[int, int] = {}
    for t in times:
        second = math.floor(t - start + EPS)
        counts[second] = counts.get(second, 0) + 1
    return [counts.get(i, 0) for i in range(max(counts) + 1)]


def most_in_any_second(times: list[float], amounts: list[float] | None = None) -> float:
    """The most units started within any interval of one second (sliding)."""
    pairs = sorted(zip(times, amounts or [1.0] * len(times), strict=True))
    return max(
        sum(amount for t, amount in pairs if start <= t < start + 1 - EPS) for start, _ in pairs
    )


async def acquire_all(pacer: Pacer, count: int, tokens: float = 0) -> list[float]:
    """`count` concurrent acquires; their start times, sorted."""
    times: list[float] = []

    async def one() -> None:
        await pacer.acquire(tokens)
        times.append(anyio.current_time())
        pacer.release(succeeded=True)

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return sorted(times)


def test_each_second_takes_its_share_at_once_and_no_more() -> None:
    """6,000 a minute: 100 go at once, the next 100 a second later, never more than 100
    within any one second, which no server enforcing over a second or more rejects."""

    async def main() -> tuple[float, list[float]]:
        pacer = Pacer(6000, None, max_concurrency=300)
        start = anyio.current_time()
        return start, await acquire_all(pacer, 250)

    start, times = run_virtual(main)
    assert per_second(times, start) == [100, 100, 50]
    assert times[-1] - start == pytest.approx(2.0, abs=EPS)
    assert most_in_any_second(times) == 100


def test_a_429_under_a_known_limit_turns_to_even_spacing() -> None:
    """A server that rejects a share sent at once enforces over less than a second: from
    then on requests are evenly spaced, 1% under the limit."""

    async def main() -> tuple[float, list[float]]:
        pacer = Pacer(6000, None, max_concurrency=300)
        await acquire_all(pacer, 100)
        pacer.rate_limited(0.5)
        resumed = anyio.current_time() + 0.5
        return resumed, await acquire_all(pacer, 20)

    resumed, times = run_virtual(main)
    spacing = 1 / (100 * HEADROOM)
    assert times[0] >= resumed - EPS
    assert gaps(times) == pytest.approx([spacing] * 19, abs=EPS)


def test_a_limit_under_two_a_second_is_evenly_spaced() -> None:
    async def main() -> list[float]:
        return await acquire_all(Pacer(60, None, max_concurrency=10), 5)

    times = run_virtual(main)
    assert gaps(times) == pytest.approx([1 / HEADROOM] * 4, abs=EPS)


def test_tokens_are_charged_by_amount() -> None:
    """60,000 tokens a minute: 1,000 within any second; an amount larger than a whole
    second's share holds it for as long as the limit takes to pay for it."""
    amounts = [400, 400, 300, 100, 600, 2500, 100]

    async def main() -> tuple[float, list[float]]:
        pacer = Pacer(None, 60_000, max_concurrency=4)
        start = anyio.current_time()
        times = []
        for amount in amounts:
            await pacer.acquire(amount)
            times.append(anyio.current_time())
            pacer.release(succeeded=True)
        return start, times

    start, times = run_virtual(main)
    assert [t - start for t in times] == pytest.approx([0, 0, 1, 1, 1, 2, 4.5], abs=EPS)
    assert most_in_any_second(times[:5], [float(a) for a in amounts[:5]]) <= 1000


@pytest.mark.parametrize(
    ("rpm", "tpm"),
    [
        # 100 req/s allowed, but 1000 tok/s at 100 tokens each is only 10 req/s.
        (6000, 60_000),
        # 10 req/s allowed, tokens would allow 10_000 tok/s / 100 = 100 req/s.
        (600, 600_000),
    ],
    ids=["tokens-bind", "requests-bind"],
)
def test_the_binding_limit_wins(rpm: float, tpm: float) -> None:
    async def main() -> tuple[float, list[float]]:
        start = anyio.current_time()
        return start, await acquire_all(Pacer(rpm, tpm, max_concurrency=50), 25, tokens=100)

    start, times = run_virtual(main)
    assert per_second(times, start) == [10, 10, 5]


# -- limits learned from headers -----------------------------------------------------------


def test_learned_limit_is_adopted_when_none_was_declared() -> None:
    async def main() -> tuple[float | None, float | None, float, list[float]]:
        pacer = Pacer(None, None, max_concurrency=20)
        before = pacer.state().requests_per_s
        pacer.observe(RateLimitInfo(limit_requests=600, remaining_requests=500))
        start = anyio.current_time()
        times = []
        for _ in range(15):
            await pacer.acquire(0)
            times.append(anyio.current_time())
            pacer.release(succeeded=True)
        return before, pacer.state().requests_per_s, start, times

    before, after, start, times = run_virtual(main)
    assert before is None
    assert after == pytest.approx(10 * HEADROOM)
    assert per_second(times, start) == [10, 5]


@pytest.mark.parametrize(
    ("declared", "learned", "per_s"),
    [(6000, 600, 10), (300, 600, 5), (600, 600, 10)],
    ids=["learned-lower", "declared-lower", "equal"],
)
def test_learned_limit_combines_with_declared_as_minimum(
    declared: float, learned: float, per_s: float
) -> None:
    async def main() -> tuple[float | None, float | None]:
        pacer = Pacer(declared, declared * 1000, max_concurrency=20)
        pacer.observe(RateLimitInfo(limit_requests=learned, limit_tokens=learned * 1000))
        state = pacer.state()
        return state.requests_per_s, state.tokens_per_s

    requests, tokens = run_virtual(main)
    assert requests == pytest.approx(per_s * HEADROOM)
    assert tokens == pytest.approx(per_s * 1000 * HEADROOM)


def test_observe_none_changes_nothing() -> None:
    async def main() -> tuple[float | None, float]:
        pacer = Pacer(600, None, max_concurrency=4)
        pacer.observe(None)
        return pacer.state().requests_per_s, pacer.state().paused_s

    rate, paused = run_virtual(main)
    assert rate == pytest.approx(10 * HEADROOM)
    assert paused == 0.0


@pytest.mark.parametrize(
    ("info", "tokens", "expected_wait"),
    [
        # A full-minute bucket: 600/min, empty, full again in 60 s -> one request's
        # units refill in 0.1 s. Waiting for the full bucket (60 s) would be the bug.
        (RateLimitInfo(limit_requests=600, remaining_requests=0, reset_requests_s=60), 10, 0.1),
        # Empty and full again in 30 s: 600 units refill at 20/s.
        (RateLimitInfo(limit_requests=600, remaining_requests=0, reset_requests_s=30), 10, 0.05),
        # Tokens: 1,500 missing of the 2,000 this request needs, 98,500 refill in 0.5 s.
        (
            RateLimitInfo(limit_tokens=100_000, remaining_tokens=500, reset_tokens_s=0.5),
            2000,
            1500 * 0.5 / 99_500,
        ),
    ],
    ids=["requests-empty-bucket", "requests-fast-refill", "tokens"],
)
def test_an_empty_bucket_waits_only_for_this_requests_units(
    info: RateLimitInfo, tokens: int, expected_wait: float
) -> None:
    async def main() -> tuple[float, float]:
        pacer = Pacer(None, None, max_concurrency=4)
        await pacer.acquire(tokens)
        pacer.release(succeeded=True)
        pacer.observe(info)
        seen = anyio.current_time()
        paused = pacer.state().paused_s
        await pacer.acquire(tokens)
        waited = anyio.current_time() - seen
        pacer.release(succeeded=True)
        return paused, waited

    paused, waited = run_virtual(main)
    assert paused == pytest.approx(expected_wait)
    assert waited >= expected_wait - EPS


@pytest.mark.parametrize(
    "info",
    [
        # Reported from a one-second enforcement window at steady state: normal, no pause.
        RateLimitInfo(limit_requests=9000, remaining_requests=0, reset_requests_s=0.35),
        RateLimitInfo(limit_requests=9000, remaining_requests=3, reset_requests_s=0.35),
        # A full-minute bucket with plenty left.
        RateLimitInfo(limit_requests=600, remaining_requests=300, reset_requests_s=30),
        # No reset (LiteLLM's per-key limiter): nothing to compute a wait from.
        RateLimitInfo(limit_requests=600, remaining_requests=0),
    ],
    ids=["window-empty", "window-some-left", "bucket-plenty", "no-reset"],
)
def test_remaining_that_suffices_or_refills_fast_costs_no_pause(info: RateLimitInfo) -> None:
    async def main() -> float:
        pacer = Pacer(None, None, max_concurrency=4)
        pacer.observe(info)
        return pacer.state().paused_s

    assert run_virtual(main) < 0.001


def test_a_window_reporting_server_keeps_the_pool_at_the_limit() -> None:
    """Every answer says "0 left, reset in 0.3 s" (a one-second window at steady state):
    the pool still runs at the declared rate instead of pausing until each reset."""

    async def main() -> float:
        pacer = Pacer(6000, None, max_concurrency=50)
        info = RateLimitInfo(limit_requests=6000, remaining_requests=0, reset_requests_s=0.3)
        start = anyio.current_time()

        async def one() -> None:
            await pacer.acquire(0)
            await anyio.sleep(0.2)
            pacer.release(succeeded=True)
            pacer.observe(info)

        async with anyio.create_task_group() as tg:
            for _ in range(500):
                tg.start_soon(one)
        return anyio.current_time() - start

    elapsed = run_virtual(main)
    ideal = 500 / (6000 / 60)
    assert elapsed < ideal / HEADROOM + 0.2 + 0.05


def test_requests_sent_before_a_limit_was_learned_are_booked() -> None:
    """A fixed-window limiter must not be overrun at the end of its first window by the
    requests that went out before the first answer said what the limit is."""

    async def main() -> float:
        pacer = Pacer(None, None, max_concurrency=64)
        start = anyio.current_time()
        for _ in range(30):
            await pacer.acquire(0)
            pacer.release(succeeded=True)
        pacer.observe(RateLimitInfo(limit_requests=60, remaining_requests=30))
        await pacer.acquire(0)
        pacer.release(succeeded=True)
        return anyio.current_time() - start

    # 30 requests at 1/s (99% of 60/min) book the first 30 s.
    assert run_virtual(main) == pytest.approx(30 / HEADROOM, abs=0.01)


# -- 429s ----------------------------------------------------------------------------------


def test_rate_limited_holds_every_waiting_acquirer() -> None:
    async def main() -> tuple[float, list[float]]:
        pacer = Pacer(6000, None, max_concurrency=200)
        await acquire_all(pacer, 100)  # this second's share
        times: list[float] = []

        async def one() -> None:
            await pacer.acquire(0)
            times.append(anyio.current_time())
            pacer.release(succeeded=False)

        async with anyio.create_task_group() as tg:
            for _ in range(9):
                tg.start_soon(one)
            # Every waiter has booked a start in the next second and is asleep until it.
            await anyio.sleep(0.005)
            hit = anyio.current_time()
            pacer.rate_limited(1.5)
        return hit, sorted(times)

    hit, times = run_virtual(main)
    assert len(times) == 9
    assert times[0] >= hit + 1.5 - EPS
    # After the pause the queue is still paced, not released as a burst.
    assert all(gap >= 1 / 100 - EPS for gap in gaps(times))


def test_rate_limited_pause_never_shortens_an_existing_pause() -> None:
    async def main() -> tuple[float, float]:
        pacer = Pacer(None, None, max_concurrency=2)
        pacer.rate_limited(2.0)
        pacer.rate_limited(0.1)
        paused = pacer.state().paused_s
        start = anyio.current_time()
        await pacer.acquire(0)
        pacer.release(succeeded=True)
        return paused, anyio.current_time() - start

    paused, waited = run_virtual(main)
    assert paused == pytest.approx(2.0)
    assert waited == pytest.approx(2.0)


def test_rate_limited_without_known_limit_backs_off_then_recovers() -> None:
    async def main() -> dict[str, float | None]:
        pacer = Pacer(None, None, max_concurrency=4)
        # Ten requests over one second: the pool is sending ~10/s unpaced.
        for _ in range(10):
            await pacer.acquire(0)
            pacer.release(succeeded=True)
            await anyio.sleep(0.1)
        unpaced = pacer.state().requests_per_s
        pacer.rate_limited(0.3)
        backed_off = pacer.state().requests_per_s
        assert backed_off is not None

        times = []
        for _ in range(4):
            await pacer.acquire(0)
            times.append(anyio.current_time())
            pacer.release(succeeded=True)
        spacing = min(gaps(times))

        # Successes over the next ~20 s raise the rate again, gradually.
        soon_after = None
        end = anyio.current_time() + 20
        while anyio.current_time() < end:
            await pacer.acquire(0)
            await anyio.sleep(0.25)
            pacer.release(succeeded=True)
            if soon_after is None and anyio.current_time() - times[0] >= 1.5:
                soon_after = pacer.state().requests_per_s
        return {
            "unpaced": unpaced,
            "backed_off": backed_off,
            "spacing": spacing,
            "soon_after": soon_after,
            "recovered": pacer.state().requests_per_s,
        }

    r = run_virtual(main)
    backed_off, recovered = r["backed_off"], r["recovered"]
    assert r["unpaced"] is None
    assert backed_off is not None and recovered is not None
    assert 0 < backed_off < 10  # below the ~10/s that drew the 429
    assert r["spacing"] == pytest.approx(1 / backed_off, abs=EPS)
    assert r["soon_after"] is not None
    assert backed_off < r["soon_after"] < backed_off * 1.1  # creeps, does not jump
    assert recovered > backed_off * 1.2


def test_a_long_pause_is_not_counted_as_recovery_time() -> None:
    async def main() -> tuple[float | None, float | None]:
        pacer = Pacer(None, None, max_concurrency=8)
        for _ in range(20):  # ~10/s for two seconds
            await pacer.acquire(0)
            pacer.release(succeeded=True)
            await anyio.sleep(0.1)
        pacer.rate_limited(60.0)  # Retry-After: 60
        backed_off = pacer.state().requests_per_s
        await pacer.acquire(0)  # waits out the pause
        pacer.release(succeeded=True)
        return backed_off, pacer.state().requests_per_s

    backed_off, after = run_virtual(main)
    assert backed_off is not None and after is not None
    # One success right after the pause must not lift the rate above the ~10/s that drew
    # the 429 (today it jumps to 0.7 * 10 * (1 + 0.02 * 60) = 15.4/s).
    assert after < 10


def test_rate_limited_with_known_limit_keeps_the_rate() -> None:
    async def main() -> tuple[float | None, float | None]:
        pacer = Pacer(600, None, max_concurrency=4)
        for _ in range(5):
            await pacer.acquire(0)
            pacer.release(succeeded=True)
        pacer.rate_limited(0.1)
        return pacer.requests.adaptive, pacer.state().requests_per_s

    adaptive, rate = run_virtual(main)
    assert adaptive is None
    assert rate == pytest.approx(10 * HEADROOM)


# -- concurrency window ----------------------------------------------------------------------


def test_window_starts_at_initial_concurrency() -> None:
    async def main() -> tuple[list[int], int]:
        pacer = Pacer(None, None, max_concurrency=8, initial_concurrency=2)
        holding = 0
        seen: list[int] = []
        go = anyio.Event()

        async def hold() -> None:
            nonlocal holding
            await pacer.acquire(0)
            holding += 1
            await go.wait()
            holding -= 1
            pacer.release(succeeded=False)  # failures never widen the window

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(hold)
            await anyio.sleep(1)
            seen.append(holding)
            go.set()
        return seen, pacer.state().window

    seen, window = run_virtual(main)
    assert seen == [2]
    assert window == 2


def test_successes_grow_the_window_up_to_the_cap() -> None:
    async def main() -> tuple[int, list[int]]:
        pacer = Pacer(None, None, max_concurrency=8, initial_concurrency=2)
        in_flight = 0
        peak = 0
        windows: list[int] = []

        async def one() -> None:
            nonlocal in_flight, peak
            await pacer.acquire(0)
            in_flight += 1
            peak = max(peak, in_flight)
            await anyio.sleep(0.01)
            in_flight -= 1
            pacer.release(succeeded=True)
            windows.append(pacer.state().window)

        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(one)
        return peak, windows

    peak, windows = run_virtual(main)
    assert peak == 8
    assert max(windows) == 8
    assert windows == sorted(windows)  # slow start: only ever grows without a 429
    assert windows[:6] == [3, 4, 5, 6, 7, 8]  # one per success while below the cap
    assert windows[-1] == 8


def test_rate_limited_shrinks_the_window_multiplicatively() -> None:
    async def main() -> tuple[list[int], list[int]]:
        pacer = Pacer(None, None, max_concurrency=8)
        shrinking = [pacer.state().window]
        for _ in range(5):
            pacer.rate_limited(0)
            shrinking.append(pacer.state().window)

        # After a 429 the window grows by one per second of success, not per success.
        growing = []
        for wait in (0.5, 0.6, 0.2, 0.9):
            await pacer.acquire(0)
            await anyio.sleep(wait)
            pacer.release(succeeded=True)
            growing.append(pacer.state().window)
        return shrinking, growing

    shrinking, growing = run_virtual(main)
    assert shrinking == [8, int(8 * BACKOFF_FACTOR), 3, 2, 1, 1]
    assert growing == [1, 2, 2, 3]


def test_rate_limited_ends_slow_start() -> None:
    async def main() -> list[int]:
        pacer = Pacer(None, None, max_concurrency=8, initial_concurrency=2)
        windows = []
        for _ in range(4):
            await pacer.acquire(0)
            pacer.release(succeeded=True)
        windows.append(pacer.state().window)
        pacer.rate_limited(0)
        windows.append(pacer.state().window)
        for _ in range(4):
            await pacer.acquire(0)
            pacer.release(succeeded=True)
        windows.append(pacer.state().window)
        return windows

    assert run_virtual(main) == [6, 4, 4]


# -- prompt-size correction ------------------------------------------------------------------


def test_learn_prompt_scale_converges_to_actual_over_estimated() -> None:
    pacer = Pacer(None, None, max_concurrency=1)
    assert pacer.prompt_scale == 1.0
    history = []
    for _ in range(60):
        pacer.learn_prompt_scale(100, 150)
        history.append(pacer.prompt_scale)
    assert history == sorted(history)
    assert history[0] == pytest.approx(1.05)
    assert pacer.prompt_scale == pytest.approx(1.5, abs=0.005)

    for _ in range(80):
        pacer.learn_prompt_scale(200, 100)
    assert pacer.prompt_scale == pytest.approx(0.5, abs=0.005)


def test_learn_prompt_scale_ignores_missing_counts() -> None:
    pacer = Pacer(None, None, max_concurrency=1)
    pacer.learn_prompt_scale(0, 100)
    pacer.learn_prompt_scale(100, 0)
    assert pacer.prompt_scale == 1.0


def test_without_declared_limits_a_probe_goes_first_and_the_first_limit_opens_the_window() -> None:
    """A job with concurrency 200 and no limits must not open with 200 requests at once
    against a server that allows 150 a second; the first answer's limit opens it."""

    async def main() -> tuple[int, int]:
        pacer = Pacer(None, None, max_concurrency=200, initial_concurrency=200)
        probe = pacer.window
        pacer.observe(RateLimitInfo(limit_requests=9000, remaining_requests=8984))
        return probe, pacer.window

    assert run_virtual(main) == (16, 200)


def test_declared_limits_use_the_chosen_concurrency_from_the_start() -> None:
    async def main() -> int:
        return Pacer(9000, None, max_concurrency=200, initial_concurrency=200).window

    assert run_virtual(main) == 200


# -- the server's window edges -------------------------------------------------------------


def window_reports(
    windows: ServerWindows, sent_at: float, edge: float, delays: list[float]
) -> None:
    """Reports from a server counting 9,000 a minute per one-second window ending at
    `edge`, for requests sent at `sent_at` that reached it `delays` later."""
    for used, delay in enumerate(delays, start=1):
        windows.observe(sent_at, edge - (sent_at + delay), 150 - used, 9000)


def test_window_resets_place_the_edges_from_the_least_delayed_report() -> None:
    windows = ServerWindows()
    window_reports(windows, 10.2, 11.0, [0.05, 0.002, 0.03])
    assert windows.confirmed
    assert windows.end == pytest.approx(10.998)
    # A share about to start just before an edge waits until just after it.
    assert windows.clear_of_edges(11.97) == pytest.approx(11.998 + EDGE_AFTER_S)
    assert windows.clear_of_edges(11.5) == 11.5
    # A request sent mid-window counts until that window ends.
    assert windows.window_end(11.5) == pytest.approx(11.998 + EDGE_AFTER_S)


def test_a_later_windows_reports_keep_the_edges_in_phase() -> None:
    windows = ServerWindows()
    window_reports(windows, 10.2, 11.0, [0.04, 0.05, 0.06])
    window_reports(windows, 13.1, 14.0, [0.001])
    assert windows.end == pytest.approx(13.999)


def test_a_buckets_time_until_full_places_no_edge() -> None:
    """6,000 a minute refilled continuously: 10 missing are full again in 0.1 s."""
    windows = ServerWindows()
    for missing in range(1, 20):
        windows.observe(10.0, missing / 100, 6000 - missing, 6000)
    assert not windows.confirmed
    assert windows.clear_of_edges(10.95) == 10.95
    assert windows.window_end(10.95) is None


def test_a_reset_given_as_a_time_of_day_places_no_edge() -> None:
    """Anthropic's resets are times of day to the second: read against the answer's
    arrival, they say nothing of where a window ends."""
    pacer = Pacer(6000, None, max_concurrency=10, clock=lambda: 5.3)
    info = RateLimitInfo(
        limit_requests=6000, remaining_requests=10, reset_requests_s=0.4, reset_to_the_ms=False
    )
    pacer.observe(info, sent_at=5.0)
    assert pacer.server_windows.end is None
    pacer.observe(dataclasses.replace(info, reset_to_the_ms=True), sent_at=5.0)
    assert pacer.server_windows.window_end(5.1) == pytest.approx(5.4 + EDGE_AFTER_S)
