"""Which rows still need a request: render each row, skip what the checkpoint has."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.checkpoint import Finished
from pipeline.inputs import InputTable, row_keys
from pipeline.render import (
    PromptRenderer,
    estimate_prompt_tokens,
    is_empty_prompt,
    over_window,
    template_error,
    window_error,
)
from pipeline.store import ResultStore
from pipeline.types import ChatRequest, Completion, Message, RowResult, Usage

READ_BATCH_ROWS = 10_000
# What reading an input that changed under the run can raise.
INPUT_READ_ERRORS = (pl.exceptions.PolarsError, pa.ArrowException, OSError, ValueError)
RENDER_CHUNK_ROWS = 2000
SKIPPED = "skipped"  # finish_reason of a row not sent because its prompt is empty
# A skipped row's recorded hash: reused while prompt.skip_empty is on, sent once it is off.
_SKIPPED_HASH = ":" + SKIPPED


@dataclass
class WorkPlan:
    table: InputTable
    renderer: PromptRenderer
    checkpoint: ResultStore  # a local checkpoint, or a cluster shard's segments
    model: str
    params: dict[str, Any]
    limit: int | None = None
    retry_failed: bool = False
    request_extra: Any = None
    start_at: int = 0
    skip_empty: bool = False
    # The model's context window: a prompt that clearly cannot fit is an error row, unsent.
    context_window: int | None = None
    reused: int = 0
    planned: int = 0
    cursor: int = 0
    # Rows whose identical request another row of this run already sends (no id column).
    deduplicated: int = 0
    # Set when the input could not be read mid-run (deleted, rewritten, a column renamed).
    input_error: str | None = None
    _sending: set[int] = field(default_factory=set)

    def requests(self) -> Iterator[ChatRequest | RowResult]:
        """Every row that needs work; render failures come as results.

        Lazy: rows are read, looked up and rendered only as workers ask for them.
        Rows from `start_at` (where an interrupted run's planning had got to) come
        first, then the rows before it: a resumed run sends its first request at
        once instead of first checking every row the last run finished. `cursor`
        says how far the first pass has got, for the next resume.
        """
        try:
            yield from self._requests_between(self.start_at, None, track=True)
            if self.start_at:
                yield from self._requests_between(0, self.start_at, track=False)
        except INPUT_READ_ERRORS as exc:
            # The workers stop taking rows; the local executor sees this and plans again.
            self.input_error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)

    def requests_between(self, start: int, stop: int) -> Iterator[ChatRequest | RowResult]:
        """The rows at positions `start` to `stop` that need work: one shard of a cluster run."""
        return self._requests_between(start, stop, track=False)

    def _requests_between(
        self, start: int, stop: int | None, *, track: bool
    ) -> Iterator[ChatRequest | RowResult]:
        max_tokens = _max_tokens(self.params)
        digest = self.renderer.request_hasher(self.model, self.params, self.request_extra)
        variables = list(self.renderer.variables)
        offset = start
        for batch in self.table.batches(READ_BATCH_ROWS, self.limit, start, stop):
            for chunk in batch.iter_slices(RENDER_CHUNK_ROWS):
                rows = chunk.select(variables).rows() if variables else [()] * chunk.height
                hashes = [digest(values) for values in rows]
                keys = self.keys_for(chunk, offset, hashes)
                finished = self.checkpoint.finished(keys)
                for i, (key, values) in enumerate(zip(keys, rows, strict=True)):
                    request_hash = hashes[i]
                    if self._reusable(finished.get(key), request_hash):
                        self.reused += 1
                        continue
                    if self._already_sending(request_hash):
                        self.deduplicated += 1
                        continue
                    self.planned += 1
                    if track:
                        self.cursor = offset + i
                    yield self._request(offset + i, key, values, request_hash, max_tokens)
                offset += chunk.height
                if track:
                    self.cursor = offset

    def tally(self) -> tuple[int, int, int]:
        """(finished ok, finished with an error, still to send) for the current requests."""
        ok = failed = 0
        total = 0
        for keys, hashes in self._hashed_chunks():
            finished = self.checkpoint.finished(keys)
            total += len(keys)
            for key, request_hash in zip(keys, hashes, strict=True):
                previous = finished.get(key)
                if previous is not None and self._same_request(previous, request_hash):
                    ok += previous.ok
                    failed += not previous.ok
        return ok, failed, total - ok - failed

    def current_hashes(self) -> Iterator[tuple[list[str], list[str]]]:
        """(keys, request hashes) of the input, chunk by chunk, in order."""
        return self._hashed_chunks()

    def _hashed_chunks(self) -> Iterator[tuple[list[str], list[str]]]:
        offset = 0
        for batch in self.table.batches(READ_BATCH_ROWS, self.limit):
            hashes = self.hashes_for(batch)
            yield self.keys_for(batch, offset, hashes), hashes
            offset += batch.height

    def keys_for(self, batch: pl.DataFrame, offset: int, hashes: list[str]) -> list[str]:
        """The checkpoint key of each row: its id, else the request it makes.

        Without an id column a row is matched by content, so inserting, deleting or
        shuffling rows between runs re-sends nothing, and rows that make the same
        request share one answer.
        """
        if self.table.id_column is None:
            return hashes
        return row_keys(batch, offset, self.table.id_column)

    def _already_sending(self, request_hash: str) -> bool:
        if self.table.id_column is not None:
            return False
        # 64 bits of the hash: 1M rows cost ~60 MB less than keeping the strings.
        short = int(request_hash[:16], 16)
        if short in self._sending:
            return True
        self._sending.add(short)
        return False

    def hashes_for(self, batch: pl.DataFrame) -> list[str]:
        """The request hash of every row of an input batch."""
        digest = self.renderer.request_hasher(self.model, self.params, self.request_extra)
        variables = list(self.renderer.variables)
        rows = batch.select(variables).rows() if variables else [()] * batch.height
        return [digest(values) for values in rows]

    def _reusable(self, previous: Finished | None, request_hash: str) -> bool:
        if previous is None or not self._same_request(previous, request_hash):
            return False
        return previous.ok or not self.retry_failed

    def _same_request(self, previous: Finished, request_hash: str) -> bool:
        recorded = previous.request_hash
        return recorded == request_hash or (
            self.skip_empty and recorded == request_hash + _SKIPPED_HASH
        )

    def _request(
        self, index: int, key: str, values: tuple[Any, ...], request_hash: str, max_tokens: int
    ) -> ChatRequest | RowResult:
        try:
            messages = self.renderer.render(values)
        except Exception as exc:
            return RowResult(index, key, request_hash, 0, None, error=template_error(exc))
        if self.skip_empty and is_empty_prompt(messages):
            skipped = Completion("", None, Usage(), SKIPPED, None)
            return RowResult(index, key, request_hash + _SKIPPED_HASH, 0, None, completion=skipped)
        prompt_estimate = estimate_prompt_tokens(messages)
        if over_window(prompt_estimate, self.context_window):
            assert self.context_window is not None
            error = window_error(prompt_estimate, self.context_window, self.model)
            return RowResult(index, key, request_hash, 0, None, error=error)
        return ChatRequest(index, key, messages, request_hash, prompt_estimate, max_tokens)


def empty_prompt_rows(
    table: InputTable, renderer: PromptRenderer, limit: int | None = None
) -> tuple[int, list[str]]:
    """(how many rows render an empty prompt, the keys of the first few)."""
    count = 0
    examples: list[str] = []
    variables = list(renderer.variables)
    offset = 0
    for batch in table.batches(READ_BATCH_ROWS, limit):
        keys = row_keys(batch, offset, table.id_column)
        rows = batch.select(variables).rows() if variables else [()] * batch.height
        for key, values in zip(keys, rows, strict=True):
            try:
                empty = is_empty_prompt(renderer.render(values))
            except Exception:  # the run records it as the row's template_error
                continue
            if empty:
                count += 1
                if len(examples) < 5:
                    examples.append(key)
        offset += batch.height
    return count, examples


def rendered_rows(
    table: InputTable, renderer: PromptRenderer, limit: int | None = None
) -> Iterator[list[Message]]:
    """Every row's messages, in order (rows whose template fails are skipped)."""
    variables = list(renderer.variables)
    for batch in table.batches(READ_BATCH_ROWS, limit):
        rows = batch.select(variables).rows() if variables else [()] * batch.height
        for values in rows:
            try:
                yield renderer.render(values)
            except Exception:
                continue


@dataclass
class TemplateFailures:
    count: int = 0
    first: list[tuple[int, str, str]] = field(default_factory=list)  # (row, key, error)


def template_failures(
    table: InputTable, renderer: PromptRenderer, limit: int | None = None, *, keep: int = 5
) -> TemplateFailures:
    """Render every row; how many fail, and the first `keep` of them."""
    failures = TemplateFailures()
    variables = list(renderer.variables)
    offset = 0
    for batch in table.batches(READ_BATCH_ROWS, limit):
        rows = batch.select(variables).rows() if variables else [()] * batch.height
        keys: list[str] | None = None
        for i, values in enumerate(rows):
            try:
                renderer.render(values)
            except Exception as exc:
                failures.count += 1
                if len(failures.first) < keep:
                    keys = keys or row_keys(batch, offset, table.id_column)
                    failures.first.append((offset + i, keys[i], template_error(exc)))
        offset += batch.height
    return failures


def max_reply_tokens(params: dict[str, Any]) -> int:
    return _max_tokens(params)


def _max_tokens(params: dict[str, Any]) -> int:
    # Providers charge rate limits for the reply they might have to give, not the one they give.
    return requested_reply_tokens(params) or 1000


def requested_reply_tokens(params: dict[str, Any]) -> int | None:
    """The longest answer the request asks for, when it names one."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = params.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None
