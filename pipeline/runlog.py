"""The run log: one JSON line per request attempt, in the run's directory.

`<output>.run/events.jsonl` says, for every attempt, which row, which attempt,
the HTTP status, the latency, the error class, and how long the run chose to
wait before the next attempt and why; plus a line when a run starts and ends.
Lines are buffered and appended with each checkpoint commit, and at least every half
second as attempts happen, so a run that commits nothing (every attempt failing, or
one row retried for minutes) still shows what it is doing. API keys never
reach it: provider adapters redact them from every message at the boundary, and
`RunLog` redacts the key again before writing, in case any text slipped through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

WRITE_EVERY_S = 0.5


class RunLog:
    def __init__(
        self,
        path: Path | None,
        secrets: tuple[str, ...] = (),
        *,
        write_every_s: float | None = None,
    ) -> None:
        """`write_every_s`: also append buffered lines this often as attempts happen (off
        when the owner ships the lines elsewhere with `take`)."""
        self.path = path
        self.write_every_s = write_every_s
        self._secrets = tuple(s for s in secrets if s)
        self._buffer: list[bytes] = []
        self._written_at = time.monotonic()

    def event(self, kind: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"t": round(time.time(), 4), "event": kind, **fields}
        self._buffer.append(self._redact(orjson.dumps(record, default=str)))

    def _redact(self, line: bytes) -> bytes:
        for secret in self._secrets:
            line = line.replace(secret.encode(), b"***")
        return line

    def attempt(
        self,
        row: str,
        attempt: int,
        *,
        status: int | None,
        latency_s: float,
        outcome: str,
        in_flight: int,
        wait_s: float | None = None,
        why: str | None = None,
        message: str | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """One request attempt and what the run decided after it."""
        if self.path is None:
            return
        # The hot path of the log: one dict, one dumps, no merging.
        line = orjson.dumps(
            {
                "t": time.time(),
                "event": "attempt",
                "row": row,
                "attempt": attempt,
                "status": status,
                "latency_s": latency_s,
                "outcome": outcome,
                "in_flight": in_flight,
                "wait_s": wait_s,
                "why": why,
                "message": message,
                "cost_usd": cost_usd,
            }
        )
        self._buffer.append(self._redact(line) if message else line)
        every = self.write_every_s
        if every is not None and time.monotonic() - self._written_at >= every:
            self._flush_between_commits()

    def _flush_between_commits(self) -> None:
        lines = self.take()
        try:
            self.write(lines)
        except OSError:
            # A full disk: the lines wait for the next commit, whose write fails the same
            # way and stops the run where every failed write does (exit 3), not in the
            # middle of an attempt.
            self._buffer[:0] = lines

    def take(self) -> list[bytes]:
        """The buffered lines, handed over on the event loop's thread."""
        lines, self._buffer = self._buffer, []
        return lines

    def write(self, lines: list[bytes]) -> None:
        """Append lines to the file (safe to call from a worker thread)."""
        self._written_at = time.monotonic()
        if self.path is None or not lines:
            return
        with open(self.path, "ab") as handle:
            handle.write(b"\n".join(lines) + b"\n")

    def flush(self) -> None:
        self.write(self.take())


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of a run log; a torn last line (a killed run) is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_bytes().splitlines():
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return events
