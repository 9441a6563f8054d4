"""A local HTTP server that speaks LLM provider wire formats (OpenAI Chat Completions,
xAI, ModelsLab, Anthropic Messages) with deterministic answers, rate limits and faults.

Self-contained: imports nothing from the rest of ``pipeline``.

Endpoints (any prefix): ``POST .../chat/completions`` (OpenAI / xAI / ModelsLab, with
``"model"`` or ``"model_id"`` and the key as Bearer, ``x-api-key`` or body ``"key"``),
``POST .../messages`` and ``.../messages/count_tokens`` (Anthropic), ``GET .../models``;
control: ``GET /_sim/stats[?full=1]``, ``POST /_sim/reset``, ``GET /_sim/health``,
``GET|POST /_sim/config`` (POST a JSON object of fields to change them live).

In-band triggers in the last user message: ``[[sim:status=NNN]]``, ``[[sim:quota]]``,
``[[sim:context]]``, ``[[sim:filter]]``, ``[[sim:length]]``, ``[[sim:fail_first=N]]``,
``[[sim:drop_first=N]]``, ``[[sim:slow=MS]]``, ``[[sim:tool]]`` (call the first tool
when tool_choice is auto or absent), ``[[sim:bad_json]]`` (the first answered attempt of
a structured request is invalid), ``[[sim:always_bad_json]]``, ``[[sim:batch_invalid]]``
(the line fails batch validation), ``[[sim:refuse]]`` (OpenAI ``message.refusal``,
Anthropic ``stop_reason: refusal``), ``[[sim:pause]]`` (Anthropic ``pause_turn`` after a
``server_tool_use`` block). ``[[sim:length]]`` on a tool call cuts its JSON halfway.

Batch APIs (``batches.py``): OpenAI-style ``/v1/files`` and ``/v1/batches`` and Anthropic
``/v1/messages/batches``, ending ``batch_turnaround_s`` after creation, with
``batch_fail_rate`` / ``batch_expire_rate`` per request; stats ``batches_created`` and
``batch_requests_paid`` (``duplicate_paid`` counts batch answers too).

Structured answers (values from :func:`expected_structured`): OpenAI
``response_format`` json_schema, or json_object (schema from a system-message line
``JSON Schema: {...}``, else ``{"answer": expected_response}``); forced tool calls
(OpenAI ``tools``/``tool_choice``, Anthropic ``tools``/``tool_choice``) with ids
``call_<digest>`` / ``toolu_<digest>``.
"""

from .behaviour import (
    PAUSE_TEXT,
    REFUSAL_TEXT,
    estimate_prompt_tokens,
    expected_reasoning,
    expected_response,
    request_digest,
    request_key,
)
from .config import SimulatorConfig
from .runner import RunningSimulator, serve, start_in_thread
from .server import Simulator
from .structured import expected_structured

__all__ = [
    "PAUSE_TEXT",
    "REFUSAL_TEXT",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "estimate_prompt_tokens",
    "expected_reasoning",
    "expected_response",
    "expected_structured",
    "request_digest",
    "request_key",
    "serve",
    "start_in_thread",
]
