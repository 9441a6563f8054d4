"""Small value types shared by every stage of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]

# Finish reasons of answers that are not the answer asked for: the row is finished
# (never asked again, never checked against a schema) with this error, and whatever
# the provider sent (a refusal's words, a paused turn's partial text) kept in `response`.
REFUSAL = "refusal"
PAUSED_TURN = "pause_turn"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One rendered row, ready to send."""

    index: int
    key: str
    messages: list[Message]
    request_hash: str
    prompt_estimate: int
    reply_budget: int


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts exactly as the provider reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's cache
    total_tokens: int = 0
    cache_write_tokens: int = 0  # prompt tokens written to the cache (Anthropic bills them)

    @property
    def reasoning_billed_separately(self) -> bool:
        """True when reasoning is not part of completion_tokens (xAI style).

        xAI reports total = prompt + completion + reasoning; OpenAI counts reasoning
        inside completion. The arithmetic of the usage block tells them apart.
        """
        if self.reasoning_tokens <= 0:
            return False
        return (
            self.total_tokens == self.prompt_tokens + self.completion_tokens + self.reasoning_tokens
        )

    @property
    def output_tokens(self) -> int:
        """Every token billed at the output price."""
        if self.reasoning_billed_separately:
            return self.completion_tokens + self.reasoning_tokens
        return self.completion_tokens


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What a response's headers said about the remaining budget."""

    limit_requests: float | None = None
    limit_tokens: float | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    # False where the reset is a time of day to the second (Anthropic's): a window's
    # edge cannot be read from it.
    reset_to_the_ms: bool = True


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful answer, normalised across wire protocols."""

    response: str
    reasoning: str | None
    usage: Usage | None  # None: the provider did not say (never guessed as 0)
    finish_reason: str | None
    model: str | None
    rate_limits: RateLimitInfo | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reported_cost_usd: float | None = None  # what the provider says this call cost
    system_fingerprint: str | None = None  # the backend configuration that answered
    service_tier: str | None = None  # the tier that served it, as the provider reports


@dataclass(slots=True)
class RowResult:
    """The final state of one row: a completion or an error, never both."""

    index: int
    key: str
    request_hash: str
    attempts: int
    latency_s: float | None
    completion: Completion | None = None
    error: str | None = None
    cost_usd: float | None = None
    parsed: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
