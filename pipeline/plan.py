"""Which rows still need a request: render each row, skip what the checkpoint has."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from pipeline.checkpoint import Checkpoint
from pipeline.inputs import InputTable, row_keys
from pipeline.render import PromptRenderer, estimate_prompt_tokens, request_hash
from pipeline.types import ChatRequest, RowResult

READ_BATCH_ROWS = 10_000
RENDER_CHUNK_ROWS = 500


@dataclass
class WorkPlan:
    table: InputTable
    renderer: PromptRenderer
    checkpoint: Checkpoint
    model: str
    params: dict[str, Any]
    limit: int | None = None
    retry_failed: bool = False
    reused: int = 0
    planned: int = 0

    def requests(self) -> Iterator[ChatRequest | RowResult]:
        """Every row that needs work, in input order; render failures come as results.

        Lazy: rows are read, looked up and rendered only as workers ask for them.
        """
        max_tokens = _max_tokens(self.params)
        offset = 0
        for batch in self.table.batches(READ_BATCH_ROWS, self.limit):
            for chunk in batch.iter_slices(RENDER_CHUNK_ROWS):
                keys = row_keys(chunk, offset, self.table.id_column)
                finished = self.checkpoint.finished(keys)
                for i, (key, row) in enumerate(zip(keys, chunk.iter_rows(named=True), strict=True)):
                    item = self._plan_row(offset + i, key, row, max_tokens, finished.get(key))
                    if item is not None:
                        self.planned += 1
                        yield item
                offset += chunk.height

    def _plan_row(
        self, index: int, key: str, row: dict[str, Any], max_tokens: int, previous: Any
    ) -> ChatRequest | RowResult | None:
        try:
            messages = self.renderer.render(row)
        except TemplateError as exc:
            return RowResult(index, key, "", 0, None, error=f"render_error: {exc}")
        digest = request_hash(self.model, self.params, messages)
        unchanged = previous is not None and previous.request_hash == digest
        if unchanged and (previous.ok or not self.retry_failed):
            self.reused += 1
            return None
        return ChatRequest(
            index, key, messages, digest, estimate_prompt_tokens(messages), max_tokens
        )


def _max_tokens(params: dict[str, Any]) -> int:
    # Providers charge rate limits for the reply they might have to give, not the one they give.
    for name in ("max_completion_tokens", "max_tokens"):
        value = params.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return 1000
