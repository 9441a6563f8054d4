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
) -> Traffic:
    """Send `rows` requests through a Pacer to a simulated limiter; retry every 429."""

    async def main() -> Traffic:
        limiter = RateLimiter(now=anyio.current_time(), **limiter_args)  # type: ignore[arg-type]
        pacer = Pacer(rpm, tpm, max_concurrency=concurrency, initial_concurrency=16)
        traffic = Traffic()
        todo = iter(range(rows))
        start = anyio.current_time()

        async def worker() -> None:
            for _ in todo:
                while True:
                    await pacer.acquire(estimate)
                    now = anyio.current_time()
                    traffic.sent.append(now)
                    rejection = limiter.check(server_cost, now)
                    headers = limiter.openai_headers(now)
                    if rejection is not None:
                        traffic.rejected.append(now)
                        if limiter.style == "litellm":
                            headers["retry-after"] = "60"
                        else:
                            headers.update(retry_headers(rejection.retry_after_s))
                        pacer.release(succeeded=False)
                        pacer.observe(parse_rate_limits(headers))
                        pacer.rate_limited(parse_retry_after(headers), sent_at=now)
                        continue
                    await anyio.sleep(latency_s)
                    pacer.release(succeeded=True)
                    pacer.observe(parse_rate_limits(headers))
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
