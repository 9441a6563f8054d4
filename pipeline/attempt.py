"""One attempt of one row, from its slot in the window to the decision on what next.

An `Attempt` takes a slot and a paced turn from the pacer, reserves its projected
cost in the budget, sends the request, settles the budget with what it really cost
and hands the pacer what the server said. What the answer means for the row is
`decide.decide`'s (a pure function, shared with batch runs); this module does the
I/O around it: the run-log line with the decision and its reason, the counts, and
what the breaker is told. The deadline of the call is the HTTP client's per-request
timer, set from `limits.timeout_s`: a second timer per attempt here would cost more
CPU than everything else an attempt does.

Job-level failures (a rejected key, an exhausted budget) leave as exceptions; the
scheduler stops the run on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio

from pipeline.breaker import Breaker
from pipeline.budget import SpendingLimit
from pipeline.counters import RunCounters
from pipeline.decide import Finished, Retry, RowTries, Rules, Stop, decide
from pipeline.errors import (
    ContentFiltered,
    JobStopped,
    ProviderError,
    RateLimited,
)
from pipeline.providers.base import Provider
from pipeline.ratelimit import Turns
from pipeline.runlog import RunLog
from pipeline.types import ChatRequest, Completion

__all__ = ["Attempt", "AttemptCounts", "Attempts", "RowTries"]


@dataclass
class AttemptCounts:
    """What the attempts of a run did, for the summary."""

    retries: int = 0
    rate_limited: int = 0
    first_sent_at: float | None = None  # loop clock: the first attempt's start
    last_answer_at: float | None = None  # loop clock: the last attempt's end

    @property
    def active_s(self) -> float:
        """From the first request sent to the last answer received."""
        if self.first_sent_at is None or self.last_answer_at is None:
            return 0.0
        return self.last_answer_at - self.first_sent_at


@dataclass
class Attempts:
    """What every attempt of a run shares."""

    provider: Provider
    pacer: Turns
    rules: Rules
    budget: SpendingLimit
    log: RunLog
    counts: AttemptCounts
    counters: RunCounters
    breaker: Breaker
    stop_job: Callable[[JobStopped], None]  # the breaker's verdict stops the run


class Attempt:
    __slots__ = ("latency", "request", "run", "sent_at", "tries")

    def __init__(self, run: Attempts, request: ChatRequest, tries: RowTries) -> None:
        self.run = run
        self.request = request
        self.tries = tries
        self.sent_at = 0.0
        self.latency = 0.0

    async def make(self, wanted: Callable[[], bool]) -> Finished | Retry | None:
        """Send once and decide; None when the run stopped while this waited its turn.

        The row's `tries` are brought up to date with this attempt (its count, its
        spend, a schema mismatch); a job-fatal answer is raised.
        """
        run, request = self.run, self.request
        self.sent_at = await run.pacer.take_turn(request)
        answer: Completion | ProviderError | None = None
        try:
            if not wanted():
                return None
            self.tries.attempts += 1
            if run.counts.first_sent_at is None:
                run.counts.first_sent_at = self.sent_at
            reservation = run.budget.reserve(request)
            try:
                answer = await self._send()
            finally:
                run.budget.settle(reservation, answer)
        finally:
            run.pacer.end_turn(request, self.sent_at, answer)
        run.counts.last_answer_at = ended = anyio.current_time()
        self.latency = ended - self.sent_at
        assert answer is not None  # _send returns or raises
        decision = decide(
            answer, self.tries, run.rules, row=request, now=ended, latency_s=self.latency
        )
        self.tries.schema_failures = decision.tries.schema_failures
        self.tries.spend = decision.tries.spend
        self._count(answer, decision)
        self._log(answer, decision)
        if isinstance(decision, Stop):
            raise decision.error
        self._tell_breaker(answer, decision)
        return decision

    async def _send(self) -> Completion | ProviderError:
        try:
            with self.run.counters.sending():
                return await self.run.provider.complete(self.request)
        except ProviderError as error:
            return error

    def _count(self, answer: Completion | ProviderError, decision: Finished | Retry | Stop) -> None:
        counts = self.run.counts
        if isinstance(answer, RateLimited):
            counts.rate_limited += 1
        if isinstance(decision, Retry):
            counts.retries += 1

    def _tell_breaker(self, answer: Completion | ProviderError, decision: Finished | Retry) -> None:
        """A success starts the breaker's counts afresh; a failure adds to them."""
        breaker = self.run.breaker
        error = decision.error
        if error is None:
            breaker.succeeded()
            return
        if isinstance(answer, Completion) and isinstance(error, ContentFiltered):
            return  # an answer about this row's content, not about the job
        self._stop_if(breaker.answered_with(error))
        if isinstance(decision, Finished):
            self._stop_if(breaker.row_failed(error))

    def _stop_if(self, stop: JobStopped | None) -> None:
        if stop is not None:
            self.run.stop_job(stop)

    def _log(self, answer: Completion | ProviderError, decision: Finished | Retry | Stop) -> None:
        error = decision.error
        if isinstance(decision, Retry):
            wait_s: float | None = decision.wait_s
            why: str | None = decision.reason
        else:
            wait_s, why = None, decision.why
        status = 200 if isinstance(answer, Completion) else answer.status
        run = self.run
        run.log.attempt(
            self.request.key,
            self.tries.attempts,
            status=status,
            latency_s=self.latency,
            outcome="ok" if error is None else error.kind,
            in_flight=run.counters.in_flight,
            wait_s=wait_s,
            why=why,
            message=error.message[:300] if error is not None else None,
            cost_usd=None if isinstance(decision, Stop) else decision.cost_usd,
        )
