"""Stopping a run that fails systematically, before it marks a million rows failed.

Two patterns mean no row can succeed until someone fixes something, even when no
single answer says so (a gateway that answers a wrong key or model with HTTP 400, a
template that makes every request invalid, a model that answers everything with 429):

- the same error recorded on `same_error_rows` consecutive rows with no success in
  between (same error class and HTTP status);
- no success for `stall_s` seconds while every answer is a 429, a 5xx or a failed
  connection.

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
STALL_S = 600.0


class Breaker:
    def __init__(
        self,
        *,
        same_error_rows: int = SAME_ERROR_ROWS,
        stall_s: float | None = STALL_S,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.same_error_rows = same_error_rows
        self.stall_s = stall_s
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

    def answered_with(self, error: ProviderError) -> SystematicFailure | None:
        """Every failed attempt; a stop when nothing but overload came back for too long."""
        now = self._clock()
        if self._since is None:
            self._since = now
        if not isinstance(error, RateLimited | ServerError | TransportError):
            self._only_overload = False
            return None
        if self.stall_s is None or not self._only_overload or now - self._since < self.stall_s:
            return None
        return SystematicFailure(
            f"no request has succeeded for {now - self._since:.0f}s and every answer was "
            f"a 429, a 5xx or a failed connection (last: {error.describe()})",
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
