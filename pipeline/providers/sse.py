"""Server-sent events: the framing both OpenAI and Anthropic stream in."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def events(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) for every event; data lines of one event are joined by newlines."""
    name: str | None = None
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
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
