"""The worker pool, driven directly with a scripted fake provider.

Every test but one runs on an asyncio loop with a virtual clock: time only moves when
every task is waiting, and then jumps straight to the next timer. Latencies, Retry-After
pauses and grace periods are exact and cost no real time. The exception is the
end-to-end timeout test, which needs real sockets and takes about a second.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from conftest import SIM_KEY
from virtual_clock import run_virtual

from pipeline import errors
from pipeline.config import resolve_provider
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers import Provider, create_provider
from pipeline.ratelimit import Pacer
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog, read_events
from pipeline.scheduler import Outcome, Planned, Scheduler
from pipeline.simulator import RunningSimulator
from pipeline.spec import ModelSpec
from pipeline.types import ChatRequest, Completion, RateLimitInfo, RowResult, Usage

T = TypeVar("T")
EPS = 1e-6
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)

# -- virtual clock -----------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# -- a scripted provider -----------------------------------------------------------------


@dataclass
class Call:
    index: int
    attempt: int
    at: float


Script = Callable[[ChatRequest, int], Awaitable[Completion]]


def completion(text: str = "ok", **overrides: object) -> Completion:
    fields: dict[str, object] = {
        "response": text,
        "reasoning": None,
        "usage": Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        "finish_reason": "stop",
        "model": "fake-model",
    }
    fields.update(overrides)
    return Completion(**fields)  # type: ignore[arg-type]


class FakeProvider(Provider):
    """Answers through `script(request, attempt)`; logs every call with its start time."""

    def __init__(self, script: Script) -> None:
        super().__init__(settings=None, client=None)  # type: ignore[arg-type]
        self.script = script
        self.calls: list[Call] = []
        self.answered: list[int] = []  # rows whose call returned a completion
        self._attempts: Counter[int] = Counter()

    async def complete(self, request: ChatRequest) -> Completion:
        self._attempts[request.index] += 1
        attempt = self._attempts[request.index]
        self.calls.append(Call(request.index, attempt, anyio.current_time()))
        answer = await self.script(request, attempt)
        self.answered.append(request.index)
        return answer

    def calls_for(self, index: int) -> list[Call]:
        return [call for call in self.calls if call.index == index]

    def parse(self, response: HttpResponse) -> Completion:
        raise AssertionError("a scripted provider parses no HTTP answer")

    async def _assemble(
        self, lines: AsyncIterator[bytes], headers: Mapping[str, str]
    ) -> Completion:
        raise AssertionError("a scripted provider assembles no stream")


def request(index: int, prompt_estimate: int = 10, reply_budget: int = 10) -> ChatRequest:
    return ChatRequest(
        index=index,
        key=f"K{index:04d}",
        messages=[{"role": "user", "content": f"row {index}"}],
        request_hash=f"hash-{index}",
        prompt_estimate=prompt_estimate,
        reply_budget=reply_budget,
    )


def planned(n: int, extra: list[RowResult] | None = None) -> Iterator[Planned]:
    for index in range(n):
        yield request(index)
    yield from extra or []


class Recorder:
    """A result sink that keeps each committed batch."""

    def __init__(self) -> None:
        self.batches: list[list[RowResult]] = []
        self.landed: list[RowResult] = []

    def land(self, result: RowResult) -> int:
        self.landed.append(result)
        return len(self.landed)

    async def commit(self) -> int:
        batch, self.landed = self.landed, []
        if batch:
            self.batches.append(batch)
        return len(batch)

    @property
    def results(self) -> list[RowResult]:
        return [result for batch in self.batches for result in batch]

    def by_index(self) -> dict[int, RowResult]:
        results = self.results
        indexed = {result.index: result for result in results}
        assert len(indexed) == len(results), "a row was recorded twice"
        return indexed


def scheduler(
    provider: Provider,
    *,
    concurrency: int = 4,
    pacer: Pacer | None = None,
    policy: RetryPolicy = FAST,
    grace_s: float = 10.0,
) -> Scheduler:
    return Scheduler(
        provider,
        pacer or Pacer(None, None, max_concurrency=concurrency),
        policy,
        None,
        concurrency=concurrency,
        grace_s=grace_s,
    )


# -- every row, exactly once -------------------------------------------------------------


def test_every_request_yields_exactly_one_result_with_attempts_and_errors() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.01 * (1 + req.index % 3))
        kind = req.index % 10
        if kind == 3 and attempt <= 2:
            raise errors.ServerError("overloaded", status=503)
        if kind == 7:
            raise errors.BadRequest("bad field", status=400)
        if kind == 9:
            raise errors.MalformedResponse("no choices")
        if kind == 5:
            return completion(finish_reason="content_filter")
        return completion(f"answer {req.index}")

    skipped = RowResult(500, "K0500", "hash-500", 0, None, error="skipped upstream")
    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider, concurrency=5).run(planned(60, [skipped]), record)

    outcome = run_virtual(main)
    results = record.by_index()
    assert sorted(results) == [*range(60), 500]
    assert outcome.recorded == 61
    assert outcome.fatal is None and not outcome.interrupted
    assert results[500] is skipped  # pre-made results pass straight through

    for index in range(60):
        result = results[index]
        assert (result.key, result.request_hash) == (f"K{index:04d}", f"hash-{index}")
        assert result.latency_s is not None and result.latency_s > 0
        assert result.attempts == len(provider.calls_for(index))
        kind = index % 10
        if kind == 3:
            assert result.ok and result.attempts == 3
            assert result.completion is not None
            assert result.completion.response == f"answer {index}"
        elif kind == 7:
            assert result.attempts == 1
            assert result.error == "bad_request (HTTP 400): bad field"
            assert result.completion is None
        elif kind == 9:
            assert result.attempts == 3
            assert result.error == "malformed_response: no choices after 3 attempts"
        elif kind == 5:
            assert result.attempts == 1 and result.completion is not None
            assert result.error is not None and result.error.startswith("content_filtered")
        else:
            assert result.ok and result.attempts == 1
    # 6 rows x 2 server errors + 6 rows x 2 malformed retries
    assert outcome.retries == 24


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_retryable_errors_are_retried_up_to_max_attempts(max_attempts: int) -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        raise errors.TransportError("connection reset")

    provider = FakeProvider(script)
    record = Recorder()
    policy = RetryPolicy(max_attempts=max_attempts, base_delay_s=0.01, max_delay_s=0.05)

    async def main() -> Outcome:
        return await scheduler(provider, policy=policy).run(planned(3), record)

    outcome = run_virtual(main)
    results = record.by_index()
    assert sorted(results) == [0, 1, 2]
    tried = f" after {max_attempts} attempts" if max_attempts > 1 else ""
    for index, result in results.items():
        assert result.attempts == max_attempts == len(provider.calls_for(index))
        assert result.error == f"transport_error: connection reset{tried}"
    assert outcome.retries == 3 * (max_attempts - 1)


def test_retries_back_off_between_attempts() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if attempt < 4:
            raise errors.ServerError("busy", status=502)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)

    async def main() -> Outcome:
        return await scheduler(provider, policy=policy).run(planned(1), record)

    run_virtual(main)
    starts = [call.at for call in provider.calls]
    waits = gaps(starts)
    # Exponential backoff with jitter: ceiling/2 <= wait <= ceiling, ceilings 0.01, 0.02, 0.04.
    for wait, ceiling in zip(waits, (0.01, 0.02, 0.04), strict=True):
        assert ceiling / 2 - EPS <= wait <= ceiling + EPS
    assert record.by_index()[0].attempts == 4


def test_row_errors_are_recorded_after_one_attempt() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 1:
            raise errors.ContextLengthExceeded("prompt too long", status=400)
        raise errors.BadRequest("invalid", status=422)

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider).run(planned(3), record)

    outcome = run_virtual(main)
    results = record.by_index()
    assert len(provider.calls) == 3
    assert all(result.attempts == 1 for result in results.values())
    assert results[0].error == "bad_request (HTTP 422): invalid"
    assert results[1].error == "context_length_exceeded (HTTP 400): prompt too long"
    assert outcome.retries == 0


# -- job-fatal errors --------------------------------------------------------------------


@pytest.mark.parametrize("failing_from", [0, 30])
def test_job_fatal_error_stops_the_run(failing_from: int) -> None:
    concurrency = 8

    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.05)
        if req.index >= failing_from:
            raise errors.AuthenticationError("invalid api key", status=401)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider, concurrency=concurrency).run(planned(1000), record)

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, errors.AuthenticationError)
    assert outcome.fatal.status == 401
    assert not outcome.interrupted
    # Nothing new is sent once the key is known to be bad.
    assert len(provider.calls) <= failing_from + concurrency + 2
    called = {call.index for call in provider.calls}
    results = record.by_index()
    # Unsent rows (and the rejected ones) produce no results; the finished ones are kept.
    assert set(results) <= called
    assert set(results) <= set(range(failing_from))
    assert len(results) >= failing_from - concurrency
    assert all(result.ok for result in results.values())
    assert outcome.recorded == len(results)


def test_job_fatal_error_lets_requests_in_flight_land() -> None:
    """They are paid for: recording them saves sending them again on the rerun."""

    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 1:
            await anyio.sleep(0.05)
            raise errors.ModelNotFound("no such model", status=404)
        await anyio.sleep(10)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> tuple[Outcome, float]:
        start = anyio.current_time()
        outcome = await scheduler(provider, concurrency=4).run(planned(100), record)
        return outcome, anyio.current_time() - start

    outcome, elapsed = run_virtual(main)
    assert isinstance(outcome.fatal, errors.ModelNotFound)
    assert elapsed == pytest.approx(10.0)  # the answers in flight, within the grace period
    assert len(provider.calls) == 4, "nothing new is sent after a job-fatal error"
    assert sorted(r.index for r in record.results) == [0, 2, 3]


@pytest.mark.parametrize("how", ["fatal", "stop_now"])
def test_answered_rows_are_recorded_even_when_the_run_is_cut_short(how: str) -> None:
    """The run ends while the recorder is busy writing a batch: nothing answered is lost."""

    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.1)
        if how == "fatal" and req.index == 20:
            raise errors.QuotaExceeded("insufficient_quota", status=429)
        return completion()

    provider = FakeProvider(script)
    batches_started = 0

    class SlowRecorder(Recorder):
        async def commit(self) -> int:
            nonlocal batches_started
            batch, self.landed = self.landed, []
            if not batch:
                return 0
            batches_started += 1
            await anyio.sleep(1.0)  # a slow checkpoint write, 0.5 s .. 1.5 s into the run
            self.batches.append(batch)
            return len(batch)

    record = SlowRecorder()

    async def main() -> Outcome:
        sched = scheduler(provider, concurrency=4)
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await sched.run(planned(100), record)

            tg.start_soon(run)
            if how == "stop_now":
                await anyio.sleep(0.65)
                sched.stop_now()
        return sched.outcome

    outcome = run_virtual(main)
    assert (outcome.fatal is not None) == (how == "fatal")
    assert outcome.interrupted == (how == "stop_now")
    assert len(provider.calls) < 40
    assert batches_started == len(record.batches) >= 2  # every batch started was written
    assert sorted(record.by_index()) == sorted(provider.answered)
    assert outcome.recorded == len(provider.answered)


# -- 429s and timeouts ---------------------------------------------------------------------


def test_rate_limited_pauses_every_worker_for_retry_after() -> None:
    retry_after = 0.3
    hit: list[int] = []

    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.05)
        if req.index == 10 and attempt == 1:
            hit.append(len(provider.calls))
            raise errors.RateLimited("slow down", status=429, retry_after=retry_after)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider, concurrency=4).run(planned(40), record)

    outcome = run_virtual(main)
    assert len(hit) == 1
    # The 429 is raised 0.05 s after its call started; calls made before it in the same
    # instant are unaffected, every call made after it waits out the pause.
    at = provider.calls_for(10)[0].at + 0.05
    before, after = provider.calls[: hit[0]], provider.calls[hit[0] :]
    assert all(call.at <= at + EPS for call in before)
    assert len(after) > 10  # other rows kept going afterwards...
    assert min(call.at for call in after) >= at + retry_after - EPS  # ...but only after the pause

    results = record.by_index()
    assert sorted(results) == list(range(40))
    assert all(result.ok for result in results.values())
    assert results[10].attempts == 2
    assert outcome.rate_limited == 1 and outcome.retries == 1


def test_rate_limit_headers_in_completions_pace_the_pool() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.01)
        return completion(rate_limits=RateLimitInfo(limit_requests=600, remaining_requests=500))

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider, concurrency=4).run(planned(20), record)

    run_virtual(main)
    starts = sorted(call.at for call in provider.calls)
    # After the first answers arrive the learned 600/min (10/s) paces every call, the
    # first probes included: never more than 10 start within one second.
    assert max(sum(1 for t in starts if s <= t < s + 1 - EPS) for s in starts) == 10
    # Ten go in the first second (answers take 10 ms), the other ten a second later.
    assert 1.0 - EPS <= starts[-1] - starts[0] <= 1.0 + 0.03
    assert len(record.results) == 20


def test_token_estimates_drive_pacing() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        return completion(usage=Usage(prompt_tokens=req.prompt_estimate))

    provider = FakeProvider(script)
    record = Recorder()

    def rows() -> Iterator[Planned]:
        for index in range(25):
            yield request(index, prompt_estimate=50, reply_budget=50)

    async def main() -> Outcome:
        pacer = Pacer(None, 60_000, max_concurrency=50)
        return await scheduler(provider, pacer=pacer).run(rows(), record)

    run_virtual(main)
    starts = sorted(call.at for call in provider.calls)
    # 50 prompt + 50 reply tokens against 1,000 tokens a second: ten a second.
    seconds = [round(t - starts[0], 6) for t in starts]
    assert seconds == [0.0] * 10 + [1.0] * 10 + [2.0] * 5


def test_a_timed_out_call_is_retried_as_a_transport_error() -> None:
    """What the HTTP client raises at its deadline is retried like any transport failure."""

    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 2 and attempt == 1:
            await anyio.sleep(0.5)
            raise errors.TransportError("no answer within 0.5s")
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> Outcome:
        return await scheduler(provider).run(planned(5), record)

    outcome = run_virtual(main)
    results = record.by_index()
    assert sorted(results) == list(range(5))
    assert results[2].ok and results[2].attempts == 2
    first, second = provider.calls_for(2)
    assert second.at >= first.at + 0.5 - EPS
    assert outcome.retries == 1


def test_a_call_over_timeout_becomes_a_transport_error_and_is_retried(
    simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end over loopback with the real adapter, in real time: one row's answer takes
    2.5 s, the deadline is 0.8 s, so that row fails twice with a transport error. The margins
    are wide because a loaded two-core machine can hold a fast answer for a few hundred ms."""
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    settings = resolve_provider(
        ModelSpec(
            provider="openai",
            model="x-ai-grok-3-mini",
            base_url=simulator.base_url,
            api_key_env="SIM_API_KEY",
            params={"max_tokens": 20},
        )
    )
    record = Recorder()
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05)

    def rows() -> Iterator[Planned]:
        for index in range(4):
            slow = " [[sim:slow=2500]]" if index == 1 else ""
            yield ChatRequest(
                index,
                f"K{index}",
                [{"role": "user", "content": f"row {index}{slow}"}],
                f"hash-{index}",
                10,
                20,
            )

    async def main() -> Outcome:
        async with HttpClient(4, 0.8) as client:
            sched = scheduler(create_provider(settings, client), policy=policy)
            return await sched.run(rows(), record)

    started = time.monotonic()
    try:
        outcome = anyio.run(main)
        elapsed = time.monotonic() - started
    finally:
        _drain(simulator)
    results = record.by_index()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(results[i].ok for i in (0, 2, 3))
    slow = results[1]
    assert slow.attempts == 2 and slow.completion is None
    assert slow.error is not None
    assert slow.error.startswith("transport_error") and slow.error.endswith("after 2 attempts")
    assert outcome.retries == sum(result.attempts - 1 for result in results.values())
    assert elapsed < 4.0  # did not wait for the two slow answers (5 s)


def _drain(simulator: RunningSimulator, limit_s: float = 5.0) -> None:
    """Let the abandoned slow answers finish, so they never count in another test's stats."""
    deadline = time.monotonic() + limit_s
    while simulator.stats(full=False)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)


# -- stopping ------------------------------------------------------------------------------


def test_stop_lets_in_flight_rows_finish_and_takes_no_new_ones() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(1.0)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> tuple[Outcome, float, float]:
        sched = scheduler(provider, concurrency=4)
        outcome: list[Outcome] = []

        async def run() -> None:
            outcome.append(await sched.run(planned(1000), record))

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(2.5)
            stopped = anyio.current_time()
            sched.stop()
            sched.stop()  # a second stop() is a no-op
        return outcome[0], stopped, anyio.current_time() - start

    outcome, stopped, finished = run_virtual(main)
    assert outcome.interrupted and outcome.fatal is None
    # Rows in flight at t=2.5 finish at t=3.0; nothing starts after stop().
    assert finished == pytest.approx(3.0)
    assert all(call.at < stopped for call in provider.calls)
    assert len(provider.calls) == 12  # three rounds of four workers
    results = record.by_index()
    assert set(results) == {call.index for call in provider.calls}
    assert all(result.ok for result in results.values())
    assert outcome.recorded == 12


@pytest.mark.parametrize(
    "pacer",
    [
        lambda: Pacer(600, None, max_concurrency=4),  # waiting for its paced turn
        lambda: Pacer(None, None, max_concurrency=4, initial_concurrency=1),  # for a slot
    ],
    ids=["paced", "window"],
)
def test_stop_sends_nothing_new_from_workers_waiting_on_the_pacer(
    pacer: Callable[[], Pacer],
) -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(1.0)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> float:
        sched = scheduler(provider, concurrency=4, pacer=pacer())
        async with anyio.create_task_group() as tg:
            tg.start_soon(sched.run, planned(100), record)
            await anyio.sleep(0.05)
            stopped = anyio.current_time()
            sched.stop()
        return stopped

    stopped = run_virtual(main)
    assert [call.index for call in provider.calls if call.at > stopped] == []


def test_stop_abandons_rows_still_in_flight_after_the_grace_period() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(5.0 if req.index >= 4 else 0.5)
        return completion()

    provider = FakeProvider(script)
    record = Recorder()

    async def main() -> tuple[Outcome, float]:
        sched = scheduler(provider, concurrency=4, grace_s=1.0)
        outcome: list[Outcome] = []

        async def run() -> None:
            outcome.append(await sched.run(planned(100), record))

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(2.0)
            sched.stop()
        return outcome[0], anyio.current_time() - start

    outcome, finished = run_virtual(main)
    assert outcome.interrupted
    assert finished == pytest.approx(3.0)  # stop at 2.0 + 1.0 grace, not the 5.5 s rows
    assert sorted(record.by_index()) == [0, 1, 2, 3]  # the slow in-flight rows are not recorded
    assert {call.index for call in provider.calls} == set(range(8))


def test_each_attempt_logs_the_decision_taken_and_why(tmp_path: Path) -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 0 and attempt == 1:
            raise errors.RateLimited("slow down", status=429, retry_after=0.2)
        if req.index == 1 and attempt == 1:
            raise errors.ServerError("overloaded", status=503)
        if req.index == 2:
            raise errors.BadRequest("bad field", status=400)
        if req.index == 3:
            raise errors.MalformedResponse("no choices")
        return completion()

    log = RunLog(tmp_path / "events.jsonl")

    async def main() -> Outcome:
        run = Scheduler(
            FakeProvider(script),
            Pacer(None, None, max_concurrency=4),
            FAST,
            None,
            concurrency=4,
            log=log,
        )
        return await run.run(planned(4), Recorder())

    run_virtual(main)
    log.flush()
    events = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "attempt"]
    why = {(e["row"], e["attempt"]): (e["outcome"], e["why"], e["wait_s"]) for e in events}
    assert why[("K0000", 1)][:2] == (
        "rate_limited",
        "rate limited: whole pool paused 0.2s as the server asked",
    )
    assert why[("K0000", 1)][2] >= 0.2
    assert why[("K0001", 1)][:2] == ("server_error", "exponential backoff with jitter")
    assert why[("K0002", 1)] == ("bad_request", "not retryable: recorded as the row's error", None)
    assert why[("K0003", 3)] == ("malformed_response", "gave up after 3 attempts", None)
    assert why[("K0000", 2)] == ("ok", None, None)
    assert len(events) == 2 + 2 + 1 + 3
