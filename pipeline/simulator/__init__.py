"""A local HTTP server that speaks LLM provider wire formats (OpenAI Chat Completions,
xAI, ModelsLab, Anthropic Messages) with deterministic answers, rate limits and faults.

Self-contained: imports nothing from the rest of ``pipeline``.
"""

from .behaviour import (
    estimate_prompt_tokens,
    expected_reasoning,
    expected_response,
    request_digest,
    request_key,
)
from .config import SimulatorConfig
from .runner import RunningSimulator, serve, start_in_thread
from .server import Simulator

__all__ = [
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "estimate_prompt_tokens",
    "expected_reasoning",
    "expected_response",
    "request_digest",
    "request_key",
    "serve",
    "start_in_thread",
]
