"""Where a run is: a tqdm bar sized to the terminal, a log line every few seconds elsewhere.

The bar's first line always carries the essentials (rows, ETA, failures, cost so
far and projected) and fits the terminal it is drawn in; the rest (requests sent,
HTTP requests in flight, retries, request rate, tokens) follows on the same line
when there is room, else on a second line cut to the width. Every number comes
from `RunCounters`, so it means what the summary and the run log mean by it.

While nothing finishes, the scheduler's heartbeat still asks for a draw, and the
display says what the run waits for: a pause the server asked for, requests with no
answer yet, a limit learned from the server's headers. In a terminal that goes in
the details (the second line when narrow); elsewhere at the end of the log line, at
least every `PIPELINE_PROGRESS_EVERY_S` seconds.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as notebook_tqdm

from pipeline.counters import RunCounters

LOG_EVERY_S = 10.0
LOG_EVERY_ENV = "PIPELINE_PROGRESS_EVERY_S"  # overrides LOG_EVERY_S (seconds) when set
REFRESH_S = 0.5
MIN_BAR = 10  # narrowest bar worth drawing; below it the details move to a second line
FALLBACK_WIDTH = 80
# The text around the bar; `postfix` is a dict so the fields can be filled per refresh.
BAR_FORMAT = "{n:,}/{total:,} {percentage:3.0f}%|{bar}|{postfix[0]}"
LINE_FORMAT = "{postfix[0]}"


def log_interval() -> float:
    """Seconds between progress lines when not in a terminal: LOG_EVERY_S or the env override."""
    try:
        value = float(os.environ.get(LOG_EVERY_ENV, ""))
    except ValueError:
        return LOG_EVERY_S
    return value if value >= 0 else LOG_EVERY_S


@dataclass(frozen=True)
class Snapshot:
    """One moment of a run, as the display needs it."""

    done: int  # rows with a result: reused plus finished this run
    total: int
    failed: int  # rows finished in error this run
    cost: float | None  # this run's cost so far, None when no price is known
    projected: float | None  # this run's cost when every row left is sent
    eta_s: float | None
    sent: int
    in_flight: int
    retries: int
    rpm: float
    tokens: int
    tokens_per_s: float
    rows_per_s: float = 0.0  # rows finished this run per second
    waits: tuple[str, ...] = ()  # what the run waits for right now, in words

    def essentials(self, *, compact: bool = False) -> list[str]:
        """ETA, failures, cost so far and projected; `compact` for narrow terminals."""
        eta = "?" if self.eta_s is None else clock(self.eta_s)
        money = _short_money if compact else _money
        parts = [f"ETA {eta}", f"{'fail' if compact else 'failed'} {self.failed:,}"]
        if self.cost is None:
            parts.append("cost unknown" if self.done else "cost $0")
        else:
            projected = "?" if self.projected is None else money(self.projected)
            parts.append(f"{money(self.cost)}{'/' if compact else ' of '}~{projected}")
        return parts

    def details(self) -> list[str]:
        return [
            *self.waits,
            f"sent {self.sent:,}",
            f"in flight {self.in_flight:,}",
            f"retries {self.retries:,}",
            f"{self.rpm:,.0f} rpm",
            f"{_compact(self.tokens)} tok",
            f"{_compact(int(self.tokens_per_s))} tok/s",
        ]


def fit(parts: list[str], width: int, sep: str = " · ") -> str:
    """As many of `parts` as fit in `width` columns, in order, whole parts only."""
    line = ""
    for part in parts:
        candidate = f"{line}{sep}{part}" if line else part
        if len(candidate) > width:
            break
        line = candidate
    return line


def bar_frame(done: int, total: int) -> int:
    """Columns the bar line takes besides the bar and the text after it."""
    return len(f"{done:,}/{total:,} {100:3.0f}%||")


def layout(snapshot: Snapshot, width: int, *, two_lines: bool) -> tuple[str, str]:
    """(text after the bar, second line) for a terminal `width` columns wide."""
    room = width - bar_frame(snapshot.done, snapshot.total) - MIN_BAR - 1
    essentials, sep = snapshot.essentials(), " · "
    if len(sep.join(essentials)) > room:  # a narrow terminal or a huge job: the short forms
        essentials, sep = snapshot.essentials(compact=True), " "
    if two_lines:
        return " " + fit(essentials, room, sep), fit(snapshot.details(), width - 1)
    return " " + fit(essentials + snapshot.details(), room), ""


def needs_two_lines(width: int, total: int) -> bool:
    """Whether a typical full status cannot share one line with a bar of MIN_BAR."""
    sample = Snapshot(total, total, 999, 99.0, 999.0, 3600, total * 3, 999, 999, 9999, 10**7, 10**5)
    one_line = " " + " · ".join(sample.essentials() + sample.details())
    return bar_frame(total, total) + MIN_BAR + len(one_line) + 1 > width


class Progress:
    def __init__(
        self,
        total: int,
        *,
        reused: int = 0,
        enabled: bool = True,
        notebook: bool = False,
        stream: TextIO | None = None,
        headline: str | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.reused = min(reused, total)
        self.enabled = enabled
        self.interactive = enabled and (notebook or self.stream.isatty())
        self._notebook = notebook
        self._started = time.monotonic()
        self._last_log = self._started
        self._last_draw = 0.0
        self._log_every = log_interval()
        self._snapshot: Snapshot | None = None
        if enabled and headline:
            print(headline, file=self.stream, flush=True)
        self._bar: Any = None
        self._line: Any = None
        if self.interactive:
            self._open_bars()

    def _open_bars(self) -> None:
        width = self._width()
        self._two_lines = not self._notebook and needs_two_lines(width, self.total)
        bar = notebook_tqdm if self._notebook else tqdm
        self._bar = bar(
            total=self.total,
            initial=self.reused,
            unit="row",
            file=self.stream,
            ncols=None if self._notebook else width,
            bar_format=BAR_FORMAT,
            postfix=[""],
            mininterval=REFRESH_S,
            smoothing=0,  # rate over this run: reused rows never count as speed
        )
        if self._two_lines:
            self._line = tqdm(
                total=1,
                file=self.stream,
                ncols=width,
                bar_format=LINE_FORMAT,
                postfix=[""],
                position=1,
                leave=True,
            )

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or FALLBACK_WIDTH
        except (OSError, ValueError, AttributeError):
            return FALLBACK_WIDTH

    def update(
        self,
        counters: RunCounters,
        *,
        reused: int = 0,
        to_send: int | None = None,
        retries: int = 0,
        requests_per_minute: float = 0.0,
        force: bool = False,
    ) -> None:
        """Show the counters; `reused` is what the plan has found so far, `to_send` rows left.

        `retries` and `requests_per_minute` are for counters that did not see the requests
        go out (a batch's, a cluster's merged ones): counters that did count them, when
        sent, and those figures are shown instead.
        """
        now = time.monotonic()
        self._snapshot = snapshot = self._snap(
            counters, reused, to_send, retries, requests_per_minute, now
        )
        if self._bar is not None:
            if force or now - self._last_draw >= REFRESH_S:
                self._draw(snapshot, now)
            return
        if self.enabled and (force or now - self._last_log >= self._log_every):
            self._last_log = now
            self._log(snapshot)

    def _snap(
        self,
        counters: RunCounters,
        reused: int,
        to_send: int | None,
        retries: int,
        rpm: float,
        now: float,
    ) -> Snapshot:
        elapsed = max(now - self._started, 1e-9)
        if counters.started_at is not None:  # these counters saw every request go out
            retries, rpm = counters.retries_sent, counters.requests_per_minute()
        finished = counters.rows_finished
        done = min(self.total, max(self.reused, reused) + finished)
        left = self.total - done
        rate = finished / elapsed
        eta = 0.0 if left == 0 else left / rate if rate > 0 else None
        projected = None
        if counters.cost is not None and finished:
            rows_this_run = finished + (left if to_send is None else to_send)
            projected = counters.cost / finished * rows_this_run
        return Snapshot(
            done=done,
            total=self.total,
            failed=counters.rows_failed,
            cost=counters.cost,
            projected=projected,
            eta_s=eta,
            sent=counters.requests_sent,
            in_flight=counters.in_flight,
            retries=retries,
            rpm=rpm,
            tokens=counters.tokens,
            tokens_per_s=counters.tokens / elapsed,
            rows_per_s=rate,
            waits=waits(counters),
        )

    def _draw(self, snapshot: Snapshot, now: float) -> None:
        self._last_draw = now
        width = FALLBACK_WIDTH * 2 if self._notebook else self._width()
        tail, line = layout(snapshot, width, two_lines=self._two_lines)
        bar = self._bar
        bar.postfix[0] = tail
        if not self._notebook:
            bar.ncols = width
        bar.n = snapshot.done
        bar.refresh()
        if self._line is not None:
            self._line.postfix[0] = line
            self._line.ncols = width
            self._line.refresh()

    def note(self, message: str) -> None:
        """A line above the bar (or in the log), shown even with the display off."""
        if self._bar is not None:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def _log(self, s: Snapshot) -> None:
        print(
            f"progress: {s.done:,}/{s.total:,} rows ({s.done / max(s.total, 1):.0%}), "
            f"{s.rows_per_s:,.1f} rows/s, "
            + ("time left unknown" if s.eta_s is None else f"{clock(s.eta_s)} left")
            + ", "
            + ", ".join(s.essentials()[1:] + s.details()[len(s.waits) :])
            + "".join(f"; {wait}" for wait in s.waits),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            if self._snapshot is not None:
                self._draw(self._snapshot, time.monotonic())
            self._bar.close()
            if self._line is not None:
                self._line.close()
            self._bar = self._line = None


QUIET_S = 5.0  # requests in flight this long with no answer are worth a word


def waits(counters: RunCounters) -> tuple[str, ...]:
    """What the run waits for right now, in words; nothing while answers come."""
    said: list[str] = []
    if counters.paused_s >= 0.05:
        why = f": {counters.pause_why}" if counters.pause_why else ""
        said.append(f"paused {_seconds(counters.paused_s)} s more{why}")
    if counters.in_flight:
        plural = "s" if counters.in_flight > 1 else ""
        if counters.last_answer_at is None:
            said.append(f"no answer yet from {counters.in_flight:,} request{plural}")
        elif (quiet := counters.clock() - counters.last_answer_at) >= QUIET_S:
            said.append(
                f"no answer for {_seconds(quiet)} s from {counters.in_flight:,} request{plural}"
            )
    said.extend(
        f"limit learned: {per_minute:,.0f} {UNITS[dimension]} from the server's headers"
        for dimension, per_minute in counters.learned_limits.items()
    )
    return tuple(said)


UNITS = {"requests": "rpm", "tokens": "tokens/min"}


def _seconds(seconds: float) -> str:
    return f"{seconds:,.0f}" if seconds >= 10 else f"{seconds:.1f}"


def clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _money(value: float) -> str:
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def _short_money(value: float) -> str:
    return f"${value:,.0f}" if value >= 100 else f"${value:.3f}" if value < 1 else f"${value:.2f}"


def _compact(number: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)
