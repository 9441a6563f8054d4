"""Configuration of the provider simulator (every field has a default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]

FAULT_KINDS: tuple[str, ...] = (
    "fail_500",
    "fail_503",
    "fail_529",
    "drop_connection",
    "hang",
    "malformed",
    "status_error_200",
    "truncate_stream",
    "fail_502_html",
    "html_200",
    "wrong_shape_200",
)


class SimulatorConfig(BaseModel):
    """How the simulated provider behaves.

    Load from YAML with :meth:`from_yaml`; unknown keys are rejected.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- authentication -------------------------------------------------------------
    api_key: str | None = None
    """None accepts any key (or none). Otherwise the key must arrive as
    ``Authorization: Bearer <k>``, ``x-api-key: <k>`` or ``"key"`` in the JSON body."""
    auth_error_style: Literal["openai", "xai", "modelslab", "litellm"] = "openai"
    """litellm: a LiteLLM gateway without its key database, which answers every key it
    cannot check with HTTP 400 "No connected db." (nothing in the body says it is the key)."""

    # --- models ---------------------------------------------------------------------
    models: list[str] = Field(
        default_factory=lambda: ["x-ai-grok-3-mini", "grok-3-mini", "gpt-4o-mini", "sim-model"]
    )
    accept_any_model: bool = False
    context_window: int | None = Field(default=None, ge=1)
    """Prompt tokens a request may hold: a longer prompt gets the provider's 400
    (OpenAI-compatible: code ``context_length_exceeded``; Anthropic: "prompt is too
    long") before any limit or fault is drawn. None: any length is answered."""

    # --- answers --------------------------------------------------------------------
    latency_ms: tuple[float, float] = (0.0, 0.0)
    """Uniform (min, max) latency per request; (0, 0) means no sleep at all."""
    reasoning_style: Literal["reasoning_content", "reasoning", "think", "none"] = (
        "reasoning_content"
    )
    usage_style: Literal["xai", "openai"] = "xai"
    """xai: reasoning tokens are NOT in completion_tokens; openai: they are."""
    cached_fraction: Probability = 0.0
    stream_chunk_chars: int = Field(default=24, ge=1)
    """Characters of text per streamed delta."""
    anthropic_delta_usage: Literal["output", "cumulative", "nulls"] = "output"
    """What a streamed Anthropic ``message_delta`` lists in ``usage`` (the SDK type makes
    every count but ``output_tokens`` optional and calls them cumulative): output: only
    ``output_tokens``; cumulative: every count again; nulls: the other counts as null."""
    prompt_cache_min_tokens: int = Field(default=1024, ge=0)
    """Anthropic prompt caching: a prefix up to a ``cache_control`` breakpoint this long
    or longer is written to the cache on first sight and read from it afterwards
    (``cache_creation_input_tokens`` / ``cache_read_input_tokens``)."""
    thinking_details: bool = False
    """Anthropic usage carries ``output_tokens_details.thinking_tokens`` (a part of
    ``output_tokens``), as newer models report it."""

    replay: list[dict[str, Any]] = Field(default_factory=list)
    """Canned answers: a request whose last user message says ``[[sim:replay=N]]`` gets
    entry N as it is: its ``body`` (plain requests and batch results), or its ``events``
    (streams: one JSON object per event, the Anthropic event name from its ``type``;
    OpenAI's ``[DONE]`` is added)."""

    # --- rate limits ----------------------------------------------------------------
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    limit_window: Literal["second", "minute", "bucket"] = "second"
    """second: the per-minute limit enforced in one-second quanta; minute: a fixed
    wall-clock minute; bucket: one minute's capacity refilled continuously."""
    report_window: bool = False
    """Report ``remaining`` from the enforcement window (near 0 at steady state, reset in
    milliseconds) instead of against the per-minute limit."""
    limiter_style: Literal["provider", "litellm"] = "provider"
    """litellm: LiteLLM's per-key limiter (fixed minute, ``x-ratelimit-model_per_key-*``
    headers without a reset, ``retry-after: 60`` on every 429)."""
    send_ratelimit_headers: bool = True
    max_concurrent: int | None = Field(default=None, ge=1)
    """ModelsLab-style queue slots: more requests in flight than this get a 429."""
    default_max_tokens: int = Field(default=1000, ge=1)
    """Output tokens charged against TPM when the request names no max_tokens."""

    # --- faults (probabilities, drawn with random.Random(seed)) ----------------------
    seed: int = 0
    fail_500: Probability = 0.0
    fail_503: Probability = 0.0
    fail_529: Probability = 0.0
    drop_connection: Probability = 0.0
    hang: Probability = 0.0
    hang_s: float = Field(default=3600.0, ge=0)
    malformed: Probability = 0.0
    status_error_200: Probability = 0.0
    truncate_stream: Probability = 0.0
    fail_502_html: Probability = 0.0
    """A proxy's 502 page: HTML, not JSON."""
    html_200: Probability = 0.0
    """An HTML page sent with HTTP 200 (a captive portal, a misrouted proxy)."""
    wrong_shape_200: Probability = 0.0
    """Well-formed JSON of an unexpected shape with HTTP 200 (empty choices, a null
    message, null content without usage, usage counts as text)."""

    throttle_s: float = Field(default=0.0, ge=0)
    """Answer every completion request with a 429 for this many seconds, counted from the
    first request after a reset (or a change of these settings): an upstream holding a
    gateway back, or a quota that refills later. A huge value: for ever."""
    throttle_retry_after_s: float = Field(default=60.0, gt=0)
    """The ``retry-after`` each of those 429s carries, the same every time (LiteLLM passes
    an upstream's ``retry-after: 60`` on)."""

    # --- batch APIs (files, batches, message batches) ---------------------------------
    batch_turnaround_s: float = Field(default=2.0, ge=0)
    """Seconds from creating a batch until it ends with every answer."""
    batch_fail_rate: Probability = 0.0
    """Share of batched requests answered with a 500 (error file / errored result)."""
    batch_expire_rate: Probability = 0.0
    """Share of batched requests that expire unanswered."""
    batch_drop_create_response: bool = False
    """The next batch create succeeds but its response is lost (connection dropped)."""

    @model_validator(mode="after")
    def _check(self) -> SimulatorConfig:
        lo, hi = self.latency_ms
        if lo < 0 or hi < lo:
            raise ValueError("latency_ms must be (min, max) with 0 <= min <= max")
        if self.fault_total() > 1.0 + 1e-9:
            raise ValueError("fault probabilities must sum to at most 1")
        return self

    def fault_total(self) -> float:
        return sum(float(getattr(self, k)) for k in FAULT_KINDS)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulatorConfig:
        """Read a YAML mapping (an empty file gives the defaults)."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data)

    def updated(self, **fields: Any) -> SimulatorConfig:
        """A validated copy with some fields changed."""
        return type(self).model_validate({**self.model_dump(), **fields})
