"""Where a run is: a tqdm bar in a terminal, a log line every few seconds elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as notebook_tqdm

LOG_EVERY_S = 10.0


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
        self._done = 0
        bar = notebook_tqdm if notebook else tqdm
        self._bar = (
            bar(total=total, unit="row", file=self.stream, mininterval=0.5, dynamic_ncols=True)
            if self.interactive
            else None
        )

    def update(self, done: int, failed: int, tokens: int, cost: float | None) -> None:
        self._done = done
        status = {"failed": failed, "tokens": _compact(tokens)}
        if cost is not None:
            status["cost"] = f"${cost:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(status, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last_log >= LOG_EVERY_S:
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
