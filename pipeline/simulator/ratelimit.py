"""RPM / TPM enforcement with wall-clock quantized windows, and the matching headers.

``second`` window: every wall-clock second the budget refills by ``limit / 60`` (capped
at ``limit / 60``, the way OpenAI quantizes per-minute limits). A request is admitted
while the budget is positive and may overdraw it; the debt is paid back by later
refills, so the long-run rate is exactly the per-minute limit even when ``limit / 60``
is fractional or one request costs more than a second's worth of tokens.

``minute`` window: a fixed wall-clock minute with the whole per-minute budget; a request
is admitted only if ``used + requested <= limit`` (a fresh window admits any single
request, so an oversized one is not rejected forever).

Rejected requests consume nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from .behaviour import go_duration

_EPS = 1e-9


class QuantizedBucket:
    """One limited dimension (requests or tokens)."""

    __slots__ = ("budget", "debt_ok", "epoch", "limit", "quantum", "window")

    def __init__(self, limit_per_minute: float, window_s: float, now: float) -> None:
        self.limit = float(limit_per_minute)
        self.window = window_s
        self.quantum = self.limit * window_s / 60.0
        self.debt_ok = window_s < 60.0
        self.budget = self.quantum
        self.epoch = math.floor(now / window_s)

    def refill(self, now: float) -> None:
        n = math.floor(now / self.window)
        if n > self.epoch:
            self.budget = min(self.quantum, self.budget + (n - self.epoch) * self.quantum)
            self.epoch = n

    def _need(self, cost: float) -> float:
        """Budget that must be available to admit ``cost``."""
        if self.debt_ok:
            return _EPS
        return min(cost, self.quantum)

    def admits(self, cost: float) -> bool:
        need = self._need(cost)
        return self.budget >= need - _EPS and self.budget > _EPS

    def consume(self, cost: float) -> None:
        self.budget -= cost

    def _after_windows(self, k: int, now: float) -> float:
        return max(0.0, (self.epoch + k) * self.window - now)

    def retry_after(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` would be admitted."""
        if self.admits(cost):
            return 0.0
        if self.debt_ok:  # need budget > 0
            k = math.floor((_EPS - self.budget) / self.quantum) + 1
        else:  # need budget >= min(cost, quantum)
            k = math.ceil((self._need(cost) - self.budget) / self.quantum - _EPS)
        return self._after_windows(max(1, k), now)

    def reset_after(self, now: float) -> float:
        """Seconds until the budget is full again."""
        deficit = self.quantum - self.budget
        if deficit <= _EPS:
            return 0.0
        return self._after_windows(max(1, math.ceil(deficit / self.quantum - _EPS)), now)

    def remaining(self) -> int:
        """Remaining capacity expressed against the per-minute limit."""
        return max(0, math.floor(self.limit - (self.quantum - self.budget) + _EPS))

    def used(self) -> int:
        return max(0, math.ceil(self.quantum - self.budget - _EPS))


@dataclass(slots=True)
class Rejection:
    kind: str  # "requests" | "tokens"
    limit: int
    used: int
    requested: int
    retry_after_s: float


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets checked together."""

    def __init__(self, rpm: float | None, tpm: float | None, window: str, now: float) -> None:
        w = 1.0 if window == "second" else 60.0
        self.requests = QuantizedBucket(rpm, w, now) if rpm else None
        self.tokens = QuantizedBucket(tpm, w, now) if tpm else None

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def check(self, cost: int, now: float) -> Rejection | None:
        """Admit (and charge) one request of ``cost`` tokens, or say why not."""
        req, tok = self.requests, self.tokens
        if req is not None:
            req.refill(now)
            if not req.admits(1):
                return Rejection("requests", int(req.limit), req.used(), 1, req.retry_after(1, now))
        if tok is not None:
            tok.refill(now)
            if not tok.admits(cost):
                return Rejection(
                    "tokens", int(tok.limit), tok.used(), cost, tok.retry_after(cost, now)
                )
        if req is not None:
            req.consume(1)
        if tok is not None:
            tok.consume(cost)
        return None

    def openai_headers(self, now: float) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.requests is not None:
            b = self.requests
            b.refill(now)
            h["x-ratelimit-limit-requests"] = str(int(b.limit))
            h["x-ratelimit-remaining-requests"] = str(b.remaining())
            h["x-ratelimit-reset-requests"] = go_duration(b.reset_after(now))
        if self.tokens is not None:
            b = self.tokens
            b.refill(now)
            h["x-ratelimit-limit-tokens"] = str(int(b.limit))
            h["x-ratelimit-remaining-tokens"] = str(b.remaining())
            h["x-ratelimit-reset-tokens"] = go_duration(b.reset_after(now))
        return h

    def anthropic_headers(self, now: float) -> dict[str, str]:
        h: dict[str, str] = {}
        for name, b in (("requests", self.requests), ("tokens", self.tokens)):
            if b is None:
                continue
            b.refill(now)
            h[f"anthropic-ratelimit-{name}-limit"] = str(int(b.limit))
            h[f"anthropic-ratelimit-{name}-remaining"] = str(b.remaining())
            h[f"anthropic-ratelimit-{name}-reset"] = rfc3339(now + b.reset_after(now))
        return h


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (integer ceil, at least 1) and ``retry-after-ms``."""
    return {
        "retry-after": str(max(1, math.ceil(seconds - _EPS))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
