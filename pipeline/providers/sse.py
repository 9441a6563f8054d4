"""Server-sent events: the framing both OpenAI and Anthropic stream in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping


async def events(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) for every event; data lines of one event are joined by newlines."""
    name: str | None = None
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    if data:
        yield name, "\n".join(data)


def is_event_stream(headers: Mapping[str, str]) -> bool:
    return "text/event-stream" in (headers.get("content-type") or "").lower()


def looks_like_events(content: bytes) -> bool:
    """A body framed as server-sent events although not labelled as such."""
    start = content.lstrip()[:6]
    return start.startswith((b"data:", b"event:"))


async def lines_of(content: bytes) -> AsyncIterator[bytes]:
    for line in content.splitlines(keepends=True):
        yield line
