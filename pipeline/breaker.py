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
never trip it: any success starts both counts afresh. The stop says the cause first
(the repeated error), then what to check: the key's variable and the exact
`pipeline models` command that tries the key, the endpoint and the model list at once.
A `RepeatedFailure` carries the error's signature, so the rows that failed with it are
left pending rather than recorded as failed (`decide.stays_failed`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TypeVar

import anyio

from pipeline.config import ProviderSettings
from pipeline.errors import (
    AuthenticationError,
    ContentFiltered,
    JobFatalError,
    JobStopped,
    ModelNotFound,
    ProviderError,
    RateLimited,
    ServerError,
    SystematicFailure,
    TransportError,
)

SAME_ERROR_ROWS = 20
RERUN = "fix and rerun: rows that failed this way are sent again"


class RepeatedFailure(SystematicFailure):
    """The same error on row after row: its (kind, HTTP status) is the job's, not the rows'."""

    def __init__(self, message: str, *, advice: str, signature: tuple[str, int | None]) -> None:
        super().__init__(message, advice=advice)
        self.signature = signature


class Stalled(SystematicFailure):
    """Nothing but 429s, 5xx and failed connections for `limits.stall_timeout_s`."""


def what_to_check(settings: ProviderSettings | None) -> str:
    """The key's variable and the command that tries key, endpoint and model in one go."""
    if settings is None:
        return "check the API key, model.model and model.base_url"
    command = f"pipeline models --provider {settings.name}"
    if settings.base_url:
        command += f" --base-url {shlex.quote(settings.base_url)}"
    if settings.api_key_env:
        command += f" --api-key-env {settings.api_key_env}"
    if settings.api_key:  # a key written into the base URL never prints
        command = command.replace(settings.api_key, "***")
    key = f"the key in {settings.api_key_env}" if settings.api_key_env else "the endpoint"
    return f"check {key} and model.model: `{command}` must list {settings.model}"


Stop = TypeVar("Stop", bound=JobFatalError | JobStopped)


def explained(stop: Stop, settings: ProviderSettings | None) -> Stop:
    """`stop`, its advice naming the key's variable and the command to check where it can."""
    if isinstance(stop, AuthenticationError | ModelNotFound) and settings is not None:
        stop.advice = f"{what_to_check(settings)}; {RERUN}"
    return stop


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
        self.settings: ProviderSettings | None = None  # what the stop's advice names

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
        return Stalled(
            f"{error.describe()}: no request has succeeded for {now - self._since:.0f}s and "
            f"every answer was a 429, a 5xx or a failed connection{asked}",
            advice=f"check the provider's status and the account's limits; "
            f"{what_to_check(self.settings)}; {RERUN} (limits.stall_timeout_s sets how "
            "long to wait)",
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
        return RepeatedFailure(
            f"{error.describe()}: the last {self._streak} rows all failed with this error and "
            "none succeeded, so the key, the model or the job is wrong rather than the rows",
            advice=f"{what_to_check(self.settings)}; {RERUN}",
            signature=kind,
        )
