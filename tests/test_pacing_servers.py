"""The Pacer against every reading of rate-limit headers the simulator can give.

The simulator's limiter (a plain object) stands in for the server, on the same virtual
clock as the Pacer, so a minute of traffic runs in milliseconds and the counts are
exact: the headers are produced, parsed and observed exactly as in a real run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import anyio
import pytest
from virtual_clock import run_virtual

from pipeline.providers.headers import parse_rate_limits, parse_retry_after
from pipeline.ratelimit import Pacer
from pipeline.simulator.ratelimit import RateLimiter, retry_headers


@dataclass
class Traffic:
    sent: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    elapsed: float = 0.0


def drive(
    limiter_args: dict[str, object],
    *,
    rows: int,
    rpm: float | None = None,
    tpm: float | None = None,
    server_cost: int = 1,
    estimate: float = 1.0,
    latency_s: float = 0.3,
    concurrency: int = 64,
    neighbour_per_s: float = 0.0,
    start_phase: float | None = None,
    cold: tuple[int, float] = (0, 0.0),
) -> Traffic:
    """Send `rows` requests through a Pacer to a simulated limiter; retry every 429.

    `start_phase`: start this far into one of the server's one-second windows.
    `cold`: the first (count) requests reach the server (delay) seconds after they are
    sent, as new connections do; the others arrive at once."""

    async def main() -> Traffic:
        if start_phase is not None:
            now = anyio.current_time()
            await anyio.sleep((start_phase - now % 1.0) % 1.0)
        limiter = RateLimiter(now=anyio.current_time(), **limiter_args)  # type: ignore[arg-type]
        pacer = Pacer(rpm, tpm, max_concurrency=concurrency, initial_concurrency=16)
        traffic = Traffic()
        todo = iter(range(rows))
        start = anyio.current_time()

        async def worker() -> None:
            for _ in todo:
                while True:
                    await pacer.acquire(estimate)
                    sent_at = anyio.current_time()
                    traffic.sent.append(sent_at)
                    if len(traffic.sent) <= cold[0]:
                        await anyio.sleep(cold[1])
                    now = anyio.current_time()
                    rejection = limiter.check(server_cost, now)
                    headers = limiter.openai_headers(now)
                    if rejection is not None:
                        traffic.rejected.append(now)
                        if limiter.style == "litellm":
                            headers["retry-after"] = "60"
                        else:
                            headers.update(retry_headers(rejection.retry_after_s))
                        pacer.release(succeeded=False)
                        pacer.observe(parse_rate_limits(headers), sent_at)
                        pacer.rate_limited(parse_retry_after(headers), sent_at=sent_at)
                        continue
                    await anyio.sleep(latency_s)
                    pacer.release(succeeded=True)
                    pacer.observe(parse_rate_limits(headers), sent_at)
                    break

        async def neighbour() -> None:
            # Another client on the same key: spends capacity the headers then report.
            while True:
                await anyio.sleep(1 / neighbour_per_s)
                limiter.check(server_cost, anyio.current_time())

        async with anyio.create_task_group() as outer:
            if neighbour_per_s:
                outer.start_soon(neighbour)
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker)
            outer.cancel_scope.cancel()
        traffic.elapsed = anyio.current_time() - start
        return traffic

    return run_virtual(main)


WINDOW_READING = {"rpm": 6000, "tpm": None, "window": "second", "report_window": True}
LIMIT_READING = {"rpm": 6000, "tpm": None, "window": "second", "report_window": False}


@pytest.mark.parametrize("reading", [WINDOW_READING, LIMIT_READING], ids=["window", "limit"])
@pytest.mark.parametrize("declared", [6000, None], ids=["declared", "learned"])
def test_a_per_second_quantized_server_runs_at_its_limit(
    reading: dict[str, object], declared: float | None
) -> None:
    """6,000 RPM enforced as 100 a second, whether remaining is reported from that one
    second (near 0, reset in ms) or against the minute: no pauses until reset."""
    traffic = drive(reading, rows=2000, rpm=declared, latency_s=0.3)
    ideal = 2000 / 100
    assert ideal / (traffic.elapsed - 0.3) >= 0.97
    assert len(traffic.rejected) <= 0.005 * len(traffic.sent)


def test_a_bucket_drained_by_another_client_costs_short_waits_not_full_refills() -> None:
    """A continuously refilled minute bucket of 600 requests (10/s) shared with another
    client using 4/s. Once it runs dry, each answer says "0 left, full again in a
    minute": the pool waits for one request's refill (a tenth of a second), not for a
    full bucket."""
    limiter = {"rpm": 600, "tpm": None, "window": "bucket"}
    traffic = drive(limiter, rows=3000, latency_s=0.2, neighbour_per_s=4)
    sent = sorted(traffic.sent)
    longest_gap = max(b - a for a, b in itertools.pairwise(sent))
    assert longest_gap < 2.0
    # The bucket's 600 at the start, then the 6/s the neighbour leaves.
    ideal = (3000 - 600) / 6
    assert ideal / traffic.elapsed >= 0.95
    assert len(traffic.rejected) <= 0.005 * len(traffic.sent)


def test_a_litellm_style_limiter_sees_no_burst_at_window_starts() -> None:
    """LiteLLM's per-key limiter: a fixed minute, `x-ratelimit-model_per_key-*` headers
    without a reset, `retry-after: 60`. The limit is learned from the scoped header and
    the requests sent before it are booked, so no window is overrun."""
    limiter = {"rpm": 120, "tpm": None, "window": "minute", "style": "litellm"}
    traffic = drive(limiter, rows=400, latency_s=0.5)
    assert traffic.rejected == []
    per_window: dict[int, int] = {}
    for t in traffic.sent:
        per_window[int(t // 60)] = per_window.get(int(t // 60), 0) + 1
    assert max(per_window.values()) <= 120
    assert traffic.elapsed <= 400 / 2 * 1.03 + 1


@pytest.mark.parametrize("reading", [WINDOW_READING, LIMIT_READING], ids=["window", "limit"])
def test_a_first_share_that_reaches_the_server_late_does_not_overrun_its_window(
    reading: dict[str, object],
) -> None:
    """The first share is sent 50 ms before a window edge, but new connections take 70
    ms to reach the server, so all of it counts in the next window. Sent a second after
    the first, the second share would land in that same window; the resets the first
    share's answers report place the edge, and the second share waits until after it."""
    traffic = drive(
        reading,
        rows=1000,
        rpm=6000,
        latency_s=0.3,
        concurrency=200,
        start_phase=0.95,
        cold=(100, 0.07),
    )
    assert traffic.rejected == []
    assert 1000 / 100 / (traffic.elapsed - 0.3) >= 0.97


def test_a_bucket_servers_resets_place_no_edges() -> None:
    """A minute bucket's reset is its time until full: no window edge can be read from
    it, and shares go a second apart as they would against any server."""
    traffic = drive({"rpm": 6000, "tpm": None, "window": "bucket"}, rows=1000, rpm=6000)
    assert traffic.rejected == []
    sent = sorted(traffic.sent)
    assert [round(t - sent[0], 6) for t in sent[::100]] == [float(i) for i in range(10)]


@pytest.mark.parametrize("report_window", [True, False], ids=["window", "limit"])
def test_a_token_bound_per_second_server_runs_at_its_limit(report_window: bool) -> None:
    """60,000 tokens a minute enforced as 1,000 a second, 100 tokens a request: ten
    requests a second, each second's ten sent at once."""
    limiter = {"rpm": None, "tpm": 60_000, "window": "second", "report_window": report_window}
    traffic = drive(limiter, rows=300, tpm=60_000, server_cost=100, estimate=100, latency_s=0.3)
    assert traffic.rejected == []
    assert 300 / 10 / (traffic.elapsed - 0.3) >= 0.97
