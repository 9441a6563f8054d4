"""What a run has done, counted once: the bar, the summary, the run log and status read this.

Definitions (each counter means exactly this, everywhere it is shown):

- `requests_sent`: HTTP requests handed to the provider this run, retries included.
- `retries_sent`: those of `requests_sent` that asked again for a row already tried
  (counted when sent, not when a retry is decided: a stop can cancel a decided one).
- `requests_per_minute()`: requests sent in the last 60 s (since the start, when the
  run is younger): a count of what went out, never a rate extrapolated from a moment.
- `in_flight`: HTTP requests sent and not yet answered, right now. Not worker slots:
  a worker waiting for its turn under a rate limit has sent nothing.
- `peak_in_flight`: the most HTTP requests awaiting an answer at once this run.
- `rows_finished`: rows whose final result (ok or error) was committed this run.
- `rows_failed`: those of `rows_finished` that ended in error.
- `rows_reused`: rows whose result an earlier run recorded and this run keeps.
- `tokens`, `cost_usd`: usage and price of the rows finished this run, and of the paid
  attempts of rows a stopped run leaves pending (every paid attempt counts once).
- `learned_limits`: limits per minute the server's headers taught the pacer
  (`requests`, `tokens`), as its heartbeat last read them.
- `paused_s`, `pause_why`: how much longer the pacer holds the whole pool, and why
  ("the server asked (retry-after 60)"), as the heartbeat last read them.
- `last_answer_at`: when the last HTTP request was answered (or failed), on `clock`.

The scheduler increments the request counters around each HTTP call (its `Outcome`
keeps retries and 429s); the sink counts rows as they are committed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson

from pipeline.types import RowResult, Usage


@dataclass
class RunCounters:
    rows_reused: int = 0
    rows_finished: int = 0
    rows_failed: int = 0
    requests_sent: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = False
    retries_sent: int = 0
    learned_limits: dict[str, float] = field(default_factory=dict)
    paused_s: float = 0.0
    pause_why: str = ""
    last_answer_at: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _sends: deque[list[float]] = field(default_factory=deque, init=False, repr=False)
    _started: float | None = field(default=None, init=False, repr=False)

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Around one HTTP request: counts it sent, and in flight until it is answered."""
        self.requests_sent += 1
        self._count_send(self.clock())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_answer_at = self.clock()

    def retry_sent(self) -> None:
        """One of the requests sent was a row's second or later attempt."""
        self.retries_sent += 1

    def _count_send(self, now: float) -> None:
        # Counted per whole second: 60 small buckets hold a minute at any request rate.
        if self._started is None:
            self._started = now
        second = float(int(now))
        if self._sends and self._sends[-1][0] == second:
            self._sends[-1][1] += 1
        else:
            self._sends.append([second, 1.0])
        while self._sends and self._sends[0][0] <= second - RPM_WINDOW_S:
            self._sends.popleft()

    @property
    def started_at(self) -> float | None:
        """When the first request was sent, on `clock`."""
        return self._started

    def requests_per_minute(self, now: float | None = None) -> int:
        """Requests sent in the last 60 s (all of them, while the run is younger)."""
        now = self.clock() if now is None else now
        oldest = float(int(now)) - RPM_WINDOW_S
        return int(sum(count for second, count in self._sends if second > oldest))

    def row_finished(self, result: RowResult) -> None:
        self.rows_finished += 1
        self.rows_failed += result.error is not None
        if result.completion is not None and result.completion.usage is not None:
            usage = result.completion.usage
            self.tokens += usage.prompt_tokens + usage.output_tokens
        if result.cost_usd is not None:
            self.cost_usd += result.cost_usd
            self.priced = True

    def paid_unfinished(self, usage: Usage | None, cost_usd: float | None) -> None:
        """The paid attempts of a row the run leaves pending: in tokens and cost, not rows."""
        if usage is not None:
            self.tokens += usage.prompt_tokens + usage.output_tokens
        if cost_usd is not None:
            self.cost_usd += cost_usd
            self.priced = True

    @property
    def cost(self) -> float | None:
        """This run's cost, or None when no finished row had a price."""
        return self.cost_usd if self.priced else None

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain values, for the run log and the checkpoint."""
        values = {
            each.name: getattr(self, each.name)
            for each in fields(self)
            if each.name not in NOT_IN_SNAPSHOT and not each.name.startswith("_")
        }
        values["learned_limits"] = dict(self.learned_limits)
        values["cost_usd"] = round(self.cost_usd, 8) if self.priced else None
        return values


RPM_WINDOW_S = 60
# Kept for the display only: a moment's wait, the clock and the send buckets.
NOT_IN_SNAPSHOT = frozenset({"priced", "paused_s", "pause_why", "last_answer_at", "clock"})


RUN_STATE_META = "run_state"  # the checkpoint meta entry a run keeps up to date


@dataclass
class RunState:
    """What `pipeline status` needs to know about the latest run, kept in the checkpoint."""

    pid: int
    limit: int | None
    rows: int  # rows this run covers (its --limit applied)
    started_at: float
    active: bool = True
    updated_at: float = 0.0
    counters: dict[str, Any] | None = None

    def dumps(self, counters: RunCounters) -> str:
        self.updated_at = time.time()
        self.counters = counters.snapshot()
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def loads(cls, text: str | None) -> RunState | None:
        if not text:
            return None
        try:
            return cls(**orjson.loads(text))
        except (orjson.JSONDecodeError, TypeError):
            return None

    @property
    def running(self) -> bool:
        """Active and its process still alive (a killed run never said it ended)."""
        if not self.active:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
