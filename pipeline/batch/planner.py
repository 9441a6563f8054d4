"""Pending rows into request files, each within the provider's batch limits.

Rows come from the online engine's lazy plan (same rendering, same request hashes,
same reuse of finished rows) and their bodies from the adapter, so a batch request
is byte for byte the request the online engine would send. Lines are written to a
file as they are planned; only the current chunk's row mapping is held in memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from pipeline.batch.apis import BatchApi
from pipeline.batch.store import BatchStore, Chunk, Item
from pipeline.providers import Provider
from pipeline.types import ChatRequest, RowResult

LOOKUP_ROWS = 2000


def custom_id(row_index: int) -> str:
    """Short, stable and valid for every provider (Anthropic: ^[a-zA-Z0-9_-]{1,64}$).

    The row's own id never leaves the machine; `batch_items` maps this back to it.
    """
    return f"r{row_index}"


class _ChunkFile:
    def __init__(self, api: BatchApi, path: Path) -> None:
        self.api = api
        self.path = path
        self.handle = path.open("wb")
        self.handle.write(api.file_head)
        self.size = len(api.file_head) + len(api.file_tail)
        self.items: list[Item] = []

    def fits(self, line: bytes) -> bool:
        extra = len(line) + len(self.api.separator)
        return len(self.items) < self.api.max_requests and self.size + extra <= self.api.max_bytes

    def add(self, line: bytes, item: Item) -> None:
        if self.items and self.api.separator != b"\n":
            self.handle.write(self.api.separator)
        self.handle.write(line)
        if self.api.separator == b"\n":
            self.handle.write(b"\n")
        self.size += len(line) + len(self.api.separator)
        self.items.append(item)

    def close(self) -> None:
        self.handle.write(self.api.file_tail)
        self.handle.flush()
        self.handle.close()


def plan_chunks(
    requests: Iterator[ChatRequest | RowResult],
    provider: Provider,
    api: BatchApi,
    store: BatchStore,
    folder: Path,
    model: str,
    *,
    max_attempts: int,
) -> Iterator[Chunk | list[RowResult]]:
    """Chunks whose intent is committed (file written, rows recorded), one at a time;
    rows that cannot be sent (a template that fails for them, or `max_attempts`
    batches that all came back without an answer for them) come as results."""
    folder.mkdir(parents=True, exist_ok=True)
    current: _ChunkFile | None = None
    serial = itertools.count(1)

    def new_file() -> _ChunkFile:
        while (path := folder / f"requests-{next(serial)}.jsonl").exists():
            continue
        return _ChunkFile(api, path)

    def commit(chunk_file: _ChunkFile) -> Chunk:
        chunk_file.close()
        return store.add_chunk(
            api=type(api).__name__,
            model=model,
            path=chunk_file.path,
            size=chunk_file.size,
            items=chunk_file.items,
        )

    while group := list(itertools.islice(requests, LOOKUP_ROWS)):
        unsendable = [r for r in group if isinstance(r, RowResult)]
        sendable = [r for r in group if isinstance(r, ChatRequest)]
        tried = store.attempts([r.key for r in sendable])
        attempts = [tried.get((r.key, r.request_hash), 0) + 1 for r in sendable]
        unsendable += [
            _no_answer(request, attempt - 1)
            for request, attempt in zip(sendable, attempts, strict=True)
            if attempt > max_attempts
        ]
        if unsendable:
            yield unsendable
        for request, attempt in zip(sendable, attempts, strict=True):
            if attempt > max_attempts:
                continue
            cid = custom_id(request.index)
            line = api.line(cid, provider.request_body(request))
            if current is not None and not current.fits(line):
                yield commit(current)
                current = None
            if current is None:
                current = new_file()
            current.add(line, Item(cid, request.key, request.request_hash, request.index, attempt))
    if current is not None and current.items:
        yield commit(current)
    elif current is not None:
        current.close()
        current.path.unlink(missing_ok=True)


def _no_answer(request: ChatRequest, batches: int) -> RowResult:
    # A provider that keeps leaving a request out of its results must not loop forever.
    return RowResult(
        request.index,
        request.key,
        request.request_hash,
        batches,
        None,
        error=f"batch_no_result: no answer for this request in {batches} batches",
    )
