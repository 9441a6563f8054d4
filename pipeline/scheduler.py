"""The worker pool: planned rows -> bounded stream -> workers -> results -> recorder.

Everything lives in task groups; fan-out and fan-in go through bounded memory
streams, so a slow provider holds the reader back instead of filling memory. A fixed
number of workers is the concurrency cap. Results are recorded in batches by one
recorder task, inside shielded scopes, so cancellation never loses a finished row
that reached it.
"""

from __future__ import annotations

import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.config import Price
from pipeline.errors import JobFatalError, ProviderError, RateLimited, TransportError
from pipeline.providers import Provider
from pipeline.ratelimit import Pacer
from pipeline.retry import RetryPolicy
from pipeline.types import ChatRequest, Completion, RowResult

FLUSH_INTERVAL_S = 0.5
FLUSH_MAX_ROWS = 2000

RecordBatch = Callable[[list[RowResult]], Awaitable[None]]
Planned = ChatRequest | RowResult


@dataclass
class Outcome:
    """How the pool ended."""

    fatal: JobFatalError | None = None
    interrupted: bool = False
    recorded: int = 0
    retries: int = 0
    rate_limited: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        provider: Provider,
        pacer: Pacer,
        policy: RetryPolicy,
        price: Price | None,
        *,
        concurrency: int,
        timeout_s: float,
        grace_s: float = 10.0,
    ) -> None:
        self.provider = provider
        self.pacer = pacer
        self.policy = policy
        self.price = price
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.outcome = Outcome()
        self._stopping = False
        self._work: TaskGroup | None = None
        self._producer_scope = anyio.CancelScope()
        self._signal_scope = anyio.CancelScope()

    async def run(
        self, planned: AsyncIterator[Planned], record: RecordBatch, *, handle_signals: bool = False
    ) -> Outcome:
        send_work, receive_work = anyio.create_memory_object_stream[ChatRequest](
            self.concurrency * 2
        )
        send_done, receive_done = anyio.create_memory_object_stream[RowResult](self.concurrency * 4)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._record, receive_done, record)
            if handle_signals:
                outer.start_soon(self._watch_signals)
            async with send_done, anyio.create_task_group() as work:
                self._work = work
                work.start_soon(self._produce, planned, send_work, send_done.clone())
                for _ in range(self.concurrency):
                    work.start_soon(self._worker, receive_work.clone(), send_done.clone())
                receive_work.close()
            self._signal_scope.cancel()
        return self.outcome

    def stop(self) -> None:
        """Stop taking new rows; requests in flight may finish within the grace period."""
        if self._stopping or self._work is None:
            return
        self._stopping = True
        self.outcome.interrupted = True
        self._producer_scope.cancel()
        self._work.cancel_scope.deadline = anyio.current_time() + self.grace_s

    def stop_now(self) -> None:
        self.outcome.interrupted = True
        if self._work is not None:
            self._work.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with (
            self._signal_scope,
            anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        ):
            async for _ in signals:
                if self._stopping:
                    self.stop_now()
                else:
                    self.stop()

    async def _produce(
        self,
        planned: AsyncIterator[Planned],
        send_work: MemoryObjectSendStream[ChatRequest],
        send_done: MemoryObjectSendStream[RowResult],
    ) -> None:
        with self._producer_scope:
            async with send_work, send_done:
                async for item in planned:
                    if isinstance(item, RowResult):
                        await send_done.send(item)
                    else:
                        await send_work.send(item)

    async def _worker(
        self,
        receive_work: MemoryObjectReceiveStream[ChatRequest],
        send_done: MemoryObjectSendStream[RowResult],
    ) -> None:
        async with receive_work, send_done:
            async for request in receive_work:
                if self._stopping:
                    return
                try:
                    result = await self._process(request)
                except JobFatalError as exc:
                    if self.outcome.fatal is None:
                        self.outcome.fatal = exc
                    self._stopping = True
                    if self._work is not None:
                        self._work.cancel_scope.cancel()
                    return
                with anyio.CancelScope(shield=True):
                    await send_done.send(result)

    async def _process(self, request: ChatRequest) -> RowResult:
        attempt = 0
        pacer = self.pacer
        while True:
            attempt += 1
            await pacer.acquire(request.prompt_estimate * pacer.prompt_scale + request.reply_budget)
            started = anyio.current_time()
            try:
                with anyio.fail_after(self.timeout_s):
                    completion = await self.provider.complete(request)
            except TimeoutError:
                error: ProviderError = TransportError(f"no answer within {self.timeout_s:g}s")
            except ProviderError as exc:
                error = exc
            except BaseException:
                pacer.release(succeeded=False)
                raise
            else:
                pacer.release(succeeded=True)
                pacer.observe(completion.rate_limits)
                usage = completion.usage
                pacer.learn_prompt_scale(request.prompt_estimate, usage.prompt_tokens)
                return self._success(request, completion, attempt, anyio.current_time() - started)
            pacer.release(succeeded=False)
            pacer.observe(error.rate_limits)
            latency = anyio.current_time() - started
            if isinstance(error, RateLimited):
                self.outcome.rate_limited += 1
                pacer.rate_limited(error.retry_after)
            if isinstance(error, JobFatalError):
                raise error
            delay = self.policy.delay(attempt, error)
            if delay is None:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                return RowResult(
                    request.index,
                    request.key,
                    request.request_hash,
                    attempt,
                    latency,
                    error=error.describe() + tried,
                )
            self.outcome.retries += 1
            await anyio.sleep(delay)

    def _success(
        self, request: ChatRequest, completion: Completion, attempts: int, latency: float
    ) -> RowResult:
        cost = self.price.cost(completion.usage) if self.price else None
        error = None
        if completion.finish_reason == "content_filter":
            error = "content_filtered: the provider's content filter stopped the answer"
        return RowResult(
            request.index,
            request.key,
            request.request_hash,
            attempts,
            latency,
            completion=completion,
            error=error,
            cost_usd=cost,
        )

    async def _record(
        self, receive_done: MemoryObjectReceiveStream[RowResult], record: RecordBatch
    ) -> None:
        pending: list[RowResult] = []
        due = math.inf
        async with receive_done:
            while True:
                wait = None if due == math.inf else max(0.0, due - anyio.current_time())
                with anyio.move_on_after(wait):
                    try:
                        pending.append(await receive_done.receive())
                    except anyio.EndOfStream:
                        break
                    if len(pending) == 1:
                        due = anyio.current_time() + FLUSH_INTERVAL_S
                    if len(pending) < FLUSH_MAX_ROWS and anyio.current_time() < due:
                        continue
                if pending:
                    await self._flush(pending, record)
                    pending = []
                    due = math.inf
        if pending:
            await self._flush(pending, record)

    async def _flush(self, pending: list[RowResult], record: RecordBatch) -> None:
        with anyio.CancelScope(shield=True):
            await record(pending)
        self.outcome.recorded += len(pending)
