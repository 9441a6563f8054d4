"""Deterministic answers, token counting and in-band triggers of the simulator.

Everything here is a pure function so that tests can compute, from the prompt alone,
exactly what the simulator will answer.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .structured import Output

_TRIGGER_RE = re.compile(r"\[\[sim:([a-z_]+)(?:=([0-9]+))?\]\]")


def message_text(content: Any) -> str:
    """Text of a message content: a string, or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return str(content)


def normalize_messages(messages: Any, system: Any = None) -> list[dict[str, Any]]:
    """The ``[{role, content}]`` list used for digests and token estimates.

    For Anthropic requests the ``system`` prompt is prepended as a system message so
    that both protocols give the same digest for the same prompt.
    """
    out: list[dict[str, Any]] = []
    if system is not None and system != "" and system != []:
        out.append({"role": "system", "content": _plain(system)})
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                out.append({"role": m.get("role"), "content": _plain(m.get("content"))})
    return out


def _plain(content: Any) -> Any:
    """Content made only of text blocks (as sent to mark a cache breakpoint) as its text,
    so the same prompt gets the same answer however its blocks are written."""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return message_text(content)
    return content


def cache_prefix(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The prompt up to its last ``cache_control`` breakpoint (Anthropic: tools, system,
    messages in that order), normalized; None without a breakpoint."""
    system, messages = body.get("system"), body.get("messages")
    turns = messages if isinstance(messages, list) else []
    for i in range(len(turns) - 1, -1, -1):
        if _marked(turns[i].get("content") if isinstance(turns[i], dict) else None):
            return normalize_messages(turns[: i + 1], system)
    if _marked(system):
        return normalize_messages([], system)
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "cache_control" in t for t in tools):
        return []
    return None


def _marked(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(p, dict) and "cache_control" in p for p in content
    )


def request_digest(model: str, messages: list[dict[str, Any]]) -> str:
    """First 12 hex chars of sha256(orjson([model, messages], sorted keys))."""
    return _digest(model, normalize_messages(messages))


def _digest(model: str, normalized: list[dict[str, Any]]) -> str:
    raw = orjson.dumps([model, normalized], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()[:12]


def request_key(body: dict[str, Any]) -> str:
    """sha256 of the canonical request body without its ``key`` field."""
    if "key" in body:
        body = {k: v for k, v in body.items() if k != "key"}
    raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """Content of the last user message (raw text, may be empty)."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return ""


def _topic(messages: list[dict[str, Any]]) -> str:
    return " ".join(last_user_text(messages).split())


def _answer_text(digest: str, topic: str) -> str:
    return f"Answer {digest}: {topic[:80]}"


def _reasoning_text(digest: str, topic: str) -> str:
    return f"Reasoning {digest}: the user asks about {topic[:40]}."


def expected_response(model: str, messages: list[dict[str, Any]]) -> str:
    """The answer text the simulator gives for this prompt (before any truncation)."""
    return _answer_text(request_digest(model, messages), _topic(messages))


def expected_reasoning(model: str, messages: list[dict[str, Any]]) -> str:
    """The reasoning trace the simulator gives for this prompt."""
    return _reasoning_text(request_digest(model, messages), _topic(messages))


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """sum(3 + ceil(len(content) / 4)) + 3, the simulator's prompt_tokens."""
    total = 3
    for m in messages:
        if isinstance(m, dict):
            total += 3 + math.ceil(len(message_text(m.get("content"))) / 4)
    return total


def text_tokens(text: str) -> int:
    """Tokens of a generated text: ceil(len / 4), at least 1."""
    return max(1, math.ceil(len(text) / 4))


@dataclass(slots=True)
class Triggers:
    """In-band ``[[sim:...]]`` directives found in the last user message."""

    status: int | None = None
    quota: bool = False
    context: bool = False
    filter: bool = False
    length: bool = False
    fail_first: int = 0
    drop_first: int = 0
    slow_ms: int = 0
    tool: bool = False
    bad_json: bool = False
    always_bad_json: bool = False
    refuse: bool = False
    pause: bool = False
    replay: int | None = None

    @property
    def any_first(self) -> bool:
        return self.fail_first > 0 or self.drop_first > 0


def parse_triggers(messages: list[dict[str, Any]]) -> Triggers | None:
    """Triggers of the last user message, or None when it has none (the common case)."""
    text = last_user_text(messages)
    if "[[sim:" not in text:
        return None
    t = Triggers()
    for name, value in _TRIGGER_RE.findall(text):
        n = int(value) if value else 0
        if name == "status" and value:
            t.status = n
        elif name == "quota":
            t.quota = True
        elif name == "context":
            t.context = True
        elif name == "filter":
            t.filter = True
        elif name == "length":
            t.length = True
        elif name == "fail_first":
            t.fail_first = n
        elif name == "drop_first":
            t.drop_first = n
        elif name == "slow":
            t.slow_ms = n
        elif name == "tool":
            t.tool = True
        elif name == "bad_json":
            t.bad_json = True
        elif name == "always_bad_json":
            t.always_bad_json = True
        elif name == "refuse":
            t.refuse = True
        elif name == "pause":
            t.pause = True
        elif name == "replay" and value:
            t.replay = n
    return t


@dataclass(slots=True)
class ToolCall:
    """One generated tool call; ids are ``call_<key>`` (OpenAI) / ``toolu_<key>``."""

    name: str
    arguments: str  # compact JSON text of ``input``
    input: dict[str, Any]
    key: str  # the request digest


@dataclass(slots=True)
class Completion:
    """A generated answer with its token accounting (protocol independent)."""

    content: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    finish: str  # "stop" | "length" | "content_filter" | "tool_calls" | "refusal" | "pause_turn"
    tool_call: ToolCall | None = None
    cache_write_tokens: int = 0  # prompt tokens written to the prompt cache


REFUSAL_TEXT = "I'm sorry, I can't help with that request."
PAUSE_TEXT = "Let me search the web for that."


def make_completion(
    model: str,
    messages: list[dict[str, Any]],
    *,
    with_reasoning: bool,
    max_tokens: int | None,
    cached_fraction: float,
    triggers: Triggers | None,
    prompt_tokens: int | None = None,
    output: Output | None = None,
) -> Completion:
    """Build the deterministic answer for a prompt already passed through
    :func:`normalize_messages`; ``output`` asks for JSON content or a tool call."""
    prompt = estimate_prompt_tokens(messages) if prompt_tokens is None else prompt_tokens
    cached = math.floor(prompt * cached_fraction)
    if triggers is not None and triggers.filter:
        return Completion("", None, prompt, 0, 0, cached, "content_filter")
    if triggers is not None and triggers.refuse:
        tokens = text_tokens(REFUSAL_TEXT)
        return Completion(REFUSAL_TEXT, None, prompt, tokens, 0, cached, "refusal")
    if triggers is not None and triggers.pause:
        # A server-tool loop that hit its iteration limit: text so far, turn unfinished.
        return Completion(
            PAUSE_TEXT, None, prompt, text_tokens(PAUSE_TEXT), 0, cached, "pause_turn"
        )
    digest = _digest(model, messages)
    topic = _topic(messages)
    content = _answer_text(digest, topic)
    reasoning = _reasoning_text(digest, topic) if with_reasoning else None
    reasoning_tokens = math.ceil(len(reasoning) / 4) if reasoning else 0
    if output is not None:
        content, tool = output.render(digest, content)
        if tool is not None:
            finish = "tool_calls"
            if triggers is not None and triggers.length:
                # Cut inside the call: the streamed JSON stops halfway (no parsed input).
                cut = tool.arguments[: max(1, len(tool.arguments) // 2)]
                tool = ToolCall(tool.name, cut, {}, tool.key)
                finish = "length"
            tokens = text_tokens(tool.arguments)
            return Completion("", reasoning, prompt, tokens, reasoning_tokens, cached, finish, tool)
    finish = "stop"
    if max_tokens is not None and max_tokens >= 0 and max_tokens < text_tokens(content):
        content = content[: max_tokens * 4]
        finish = "length"
    elif triggers is not None and triggers.length:
        content = content[: max(1, len(content) // 2)]
        finish = "length"
    completion = math.ceil(len(content) / 4) if finish == "length" else text_tokens(content)
    return Completion(content, reasoning, prompt, completion, reasoning_tokens, cached, finish)


def go_duration(seconds: float) -> str:
    """Format a duration like Go's time.Duration: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = round(seconds * 1000, 3)
        if ms >= 1000:
            return "1s"
        return f"{_trim(ms)}ms"
    total = round(seconds, 3)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{_trim(round(secs, 3))}s"


def _trim(x: float) -> str:
    s = f"{x:.3f}".rstrip("0").rstrip(".")
    return s or "0"


def mask_key(key: str) -> str:
    """``ab***yz``: never echo a full key."""
    if len(key) <= 6:
        return "***"
    return f"{key[:2]}***{key[-2:]}"
