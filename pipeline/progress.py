"""Where a run is: a tqdm bar in a terminal, a log line every few seconds elsewhere."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as notebook_tqdm

LOG_EVERY_S = 10.0
LOG_EVERY_ENV = "PIPELINE_PROGRESS_EVERY_S"  # overrides LOG_EVERY_S (seconds) when set


def log_interval() -> float:
    """Seconds between progress lines when not in a terminal: LOG_EVERY_S or the env override."""
    try:
        value = float(os.environ.get(LOG_EVERY_ENV, ""))
    except ValueError:
        return LOG_EVERY_S
    return value if value >= 0 else LOG_EVERY_S


class Progress:
    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        notebook: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = enabled
        self.interactive = enabled and (notebook or self.stream.isatty())
        self._started = time.monotonic()
        self._last_log = self._started
        self._log_every = log_interval()
        self._done = 0
        bar = notebook_tqdm if notebook else tqdm
        self._bar = (
            bar(total=total, unit="row", file=self.stream, mininterval=0.5, dynamic_ncols=True)
            if self.interactive
            else None
        )

    def update(
        self,
        done: int,
        failed: int,
        tokens: int,
        cost: float | None,
        *,
        projected_cost: float | None = None,
        retries: int = 0,
        in_flight: int = 0,
        requests_per_minute: float = 0.0,
    ) -> None:
        self._done = done
        elapsed = max(time.monotonic() - self._started, 1e-9)
        status: dict[str, object] = {
            "failed": failed,
            "retries": retries,
            "tokens": _compact(tokens),
            "tok/s": _compact(int(tokens / elapsed)),
        }
        if cost is not None:
            status["cost"] = f"${cost:.4f}"
        if projected_cost is not None:
            status["~total"] = f"${projected_cost:.4f}"
        status["in flight"] = in_flight
        status["rpm"] = f"{requests_per_minute:.0f}"
        if self._bar is not None:
            self._bar.set_postfix(status, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last_log >= self._log_every:
            self._last_log = now
            self._log(now, status)

    def _log(self, now: float, status: dict[str, object]) -> None:
        elapsed = now - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self._done) / rate if rate > 0 else float("nan")
        details = ", ".join(f"{k} {v}" for k, v in status.items())
        print(
            f"progress: {self._done}/{self.total} rows ({self._done / max(self.total, 1):.0%}), "
            f"{rate:.1f} rows/s, {details}, ~{left:.0f}s left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _compact(number: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)
