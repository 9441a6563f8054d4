"""Stopping a run that fails systematically, before it marks a million rows failed.

Two patterns mean no row can succeed until someone fixes something, even when no
single answer says so (a gateway that answers a wrong key or model with HTTP 400, a
template that makes every request invalid, a model that answers everything with 429):

- the same error recorded on `same_error_rows` consecutive rows with no success in
  between (same error class and HTTP status);
- no success for `stall_s` seconds while every answer is a 429, a 5xx or a failed
  connection. Unless the job sets it, that is what the server says: three of the waits
  its last 429 asked for (a permanent 429 repeats the same `retry-after`), 2 to 10
  minutes; 5 minutes when it names no wait (`default_stall_s`).

Either stops the job (`SystematicFailure`, exit 3) the way a rejected key does: rows
not sent stay unsent, and a rerun after the fix resumes. Rows that fail now and then
never trip it: any success starts both counts afresh.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from pipeline.errors import (
    ContentFiltered,
    ProviderError,
    RateLimited,
    ServerError,
    SystematicFailure,
    TransportError,
)

SAME_ERROR_ROWS = 20
STALL_S = 600.0  # the longest a stall lasts unless the job says otherwise
STALL_MIN_S = 120.0  # never sooner: a burst of 429s clears within seconds
STALL_WAITS = 3  # the server's own wait, this many times over with nothing let through
STALL_UNSAID_S = 300.0  # when the server names no wait


def default_stall_s(retry_after: float | None) -> float:
    """How long nothing but overload may last when the job does not say: three of the
    waits the server asked for, within 2 to 10 minutes; 5 minutes when it named none."""
    if retry_after is None:
        return STALL_UNSAID_S
    return min(STALL_S, max(STALL_MIN_S, STALL_WAITS * retry_after))


class Breaker:
    def __init__(
        self,
        *,
        same_error_rows: int = SAME_ERROR_ROWS,
        stall_s: float | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.same_error_rows = same_error_rows
        self.stall_s = stall_s  # None: `default_stall_s` of what the server says
        self._retry_after: float | None = None  # the last 429's, in this run of failures
        self._clock = clock
        self._streak_of: tuple[str, int | None] | None = None
        self._streak = 0
        self._last_error = ""
        self._since: float | None = None  # start of the current run of failures
        self._only_overload = True

    def succeeded(self) -> None:
        """An answer that was used: both patterns start afresh."""
        self._streak_of = None
        self._streak = 0
        self._since = None
        self._only_overload = True
        self._retry_after = None

    def answered_with(self, error: ProviderError) -> SystematicFailure | None:
        """Every failed attempt; a stop when nothing but overload came back for too long."""
        now = self._clock()
        if self._since is None:
            self._since = now
        if not isinstance(error, RateLimited | ServerError | TransportError):
            self._only_overload = False
            return None
        if isinstance(error, RateLimited) and error.retry_after is not None:
            self._retry_after = error.retry_after
        stall_s = self.stall_s if self.stall_s is not None else default_stall_s(self._retry_after)
        if not self._only_overload or now - self._since < stall_s:
            return None
        asked = "" if self._retry_after is None else f", the last asking {self._retry_after:g}s"
        return SystematicFailure(
            f"no request has succeeded for {now - self._since:.0f}s and every answer was "
            f"a 429, a 5xx or a failed connection{asked} (last: {error.describe()})",
            advice="check the provider's status, the model name and the account's limits; "
            "fix and rerun (limits.stall_timeout_s sets how long to wait)",
        )

    def row_failed(self, error: ProviderError) -> SystematicFailure | None:
        """A row recorded with `error`; a stop when the same error keeps repeating."""
        if isinstance(error, ContentFiltered):
            return None  # the content of some rows, not the job
        kind = (error.kind, error.status)
        if kind != self._streak_of:
            self._streak_of, self._streak = kind, 0
        self._streak += 1
        if self._streak < self.same_error_rows:
            return None
        return SystematicFailure(
            f"the last {self._streak} rows all failed with the same error and none "
            f"succeeded: {error.describe()}",
            advice="this looks like a problem with the job, the key or the model rather "
            "than with some rows; fix and rerun",
        )
