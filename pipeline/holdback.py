"""Failed rows held back until a success shows the failures were the rows' own.

A gateway that answers a wrong key with HTTP 400, a model that cannot fit the schema,
a provider that answers nothing but 429: each fails row after row until the breaker
stops the job, and none of those failures says anything about its row. So a failed
row is not recorded at once while nothing has succeeded since it failed: the next
success releases it (the job works, so the failure was the row's), and a job-level
stop settles it with `decide.stays_failed` (a content refusal stays failed; the error
the job stopped for, and attempts that ran out on overload, leave the row pending for
the rerun after the fix). A content refusal is the row's own from the start and is
never held.

Held rows are in memory only: a run killed while it holds some sends them again on
the next run. At most `limit` rows are held; beyond that the oldest is recorded.
"""

from __future__ import annotations

from collections import deque

from pipeline.decide import Finished, stays_failed
from pipeline.errors import ContentFiltered, JobFatalError, JobStopped

HOLD_MAX = 1000  # far above a breaker's streak plus the requests in flight


class HeldFailures:
    def __init__(self, limit: int = HOLD_MAX) -> None:
        self.limit = limit
        self._held: deque[Finished] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, failed: Finished) -> list[Finished]:
        """Hold a failed row; returns what is to be recorded now (a refusal, the overflow)."""
        if isinstance(failed.error, ContentFiltered):
            return [failed]
        self._held.append(failed)
        if len(self._held) <= self.limit:
            return []
        return [self._held.popleft()]

    def release(self) -> list[Finished]:
        """A row succeeded: every held failure was its row's own, to be recorded."""
        released = list(self._held)
        self._held.clear()
        return released

    def settle(
        self, stop: JobStopped | JobFatalError | None
    ) -> tuple[list[Finished], list[Finished]]:
        """The run ended: (rows to record as failed, rows left pending) for `stop`."""
        held = self.release()
        if stop is None:
            return held, []
        kept = [failed for failed in held if stays_failed(failed.error, stop)]
        pending = [failed for failed in held if not stays_failed(failed.error, stop)]
        return kept, pending
