"""Finished rows as the rest of the program reads them: `ResultStore`.

A local run keeps its results in a `checkpoint.Checkpoint` (SQLite and a journal); a
cluster run keeps them as each shard's segment files (`cluster.segments.ShardResults`).
The planner, the output writer, `pipeline status` and `pipeline export` read either
through this one protocol, so neither has to pass for the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pipeline.checkpoint import Fetched, Finished, Totals


class ResultStore(Protocol):
    """Read access to finished rows, keyed by row key (the id, else the request hash)."""

    def finished(self, keys: list[str]) -> dict[str, Finished]:
        """Which of these rows have a result, for which request, and whether it is ok."""
        ...

    def fetch(
        self, keys: list[str], names: Sequence[str], hashes: list[str] | None = None
    ) -> Fetched:
        """The named stored columns for `keys`, in their order; with `hashes` (each key's
        current request hash), a result recorded for another request counts as missing."""
        ...

    def totals(self) -> Totals:
        """Rows, failures, tokens and cost of every result held."""
        ...

    def recent(self, window_s: float) -> tuple[int, float | None]:
        """Rows finished in the last `window_s` seconds, and when the last one finished."""
        ...

    def get_meta(self, name: str) -> str | None:
        """A run-state value (the plan cursor, the last run's state); None when not kept."""
        ...
