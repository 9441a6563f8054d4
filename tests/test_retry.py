"""Retry policy: what is retried, and how long to wait."""

from __future__ import annotations

import random

from pipeline import errors
from pipeline.retry import RetryPolicy


def test_server_hint_wins_over_backoff() -> None:
    policy = RetryPolicy(max_attempts=5)
    delay = policy.delay(1, errors.RateLimited("slow", status=429, retry_after=3.0))
    assert delay is not None and 3.0 <= delay <= 3.2


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=20, base_delay_s=0.5, max_delay_s=8)
    rng = random.Random(1)
    delays = [policy.delay(n, errors.ServerError("x"), rng) for n in range(1, 10)]
    assert all(d is not None for d in delays)
    assert delays[0] <= 0.5 and delays[3] >= 2.0
    assert max(d for d in delays if d is not None) <= 8


def test_row_and_job_errors_are_never_retried() -> None:
    policy = RetryPolicy(max_attempts=5)
    assert policy.delay(1, errors.BadRequest("x")) is None
    assert policy.delay(1, errors.AuthenticationError("x")) is None


def test_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.delay(2, errors.TransportError("x")) is not None
    assert policy.delay(3, errors.TransportError("x")) is None
