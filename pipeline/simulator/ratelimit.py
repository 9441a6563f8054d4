"""RPM / TPM enforcement with wall-clock quantized windows, and the matching headers.

``second`` window: every wall-clock second the budget refills by ``limit / 60`` (capped
at ``limit / 60``, the way OpenAI quantizes per-minute limits). A request is admitted
while the budget is positive and may overdraw it; the debt is paid back by later
refills, so the long-run rate is exactly the per-minute limit even when ``limit / 60``
is fractional or one request costs more than a second's worth of tokens.

``minute`` window: a fixed wall-clock minute with the whole per-minute budget; a request
is admitted only if ``used + requested <= limit`` (a fresh window admits any single
request, so an oversized one is not rejected forever).

``bucket`` window: one minute's capacity, refilled continuously at ``limit / 60`` a
second and full at the start (Anthropic's "continuously replenished up to your
maximum"); a request is admitted while the bucket holds its units.

What ``remaining`` and ``reset`` report can be read two ways under a short window, and
real servers do both: against the per-minute limit (``remaining`` close to the limit),
or from the enforcement window itself (``report_window``: ``remaining`` near 0 and a
``reset`` of milliseconds at steady state). ``reset`` is always the time until the
bucket is full again, as OpenAI and Anthropic document it.

The ``litellm`` style imitates LiteLLM's per-key limiter: a fixed minute, headers named
``x-ratelimit-model_per_key-{limit,remaining}-{requests,tokens}`` with no reset, and a
429 that says ``retry-after: 60`` whatever the time left in the window.

Rejected requests consume nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from .behaviour import go_duration

_EPS = 1e-9
LITELLM_RETRY_AFTER_S = 60.0


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

    def window_remaining(self) -> int:
        """Remaining capacity of the enforcement window itself."""
        return max(0, math.floor(self.budget + _EPS))


class RefillingBucket:
    """One minute's capacity, refilled continuously; starts full."""

    __slots__ = ("level", "limit", "per_s", "updated")

    def __init__(self, limit_per_minute: float, now: float) -> None:
        self.limit = float(limit_per_minute)
        self.per_s = self.limit / 60.0
        self.level = self.limit
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.limit, self.level + (now - self.updated) * self.per_s)
            self.updated = now

    def admits(self, cost: float) -> bool:
        return self.level >= min(cost, self.limit) - _EPS

    def consume(self, cost: float) -> None:
        self.level -= cost

    def retry_after(self, cost: float, now: float) -> float:
        return max(0.0, (min(cost, self.limit) - self.level) / self.per_s)

    def reset_after(self, now: float) -> float:
        return max(0.0, (self.limit - self.level) / self.per_s)

    def remaining(self) -> int:
        return max(0, math.floor(self.level + _EPS))

    def window_remaining(self) -> int:
        return self.remaining()

    def used(self) -> int:
        return max(0, math.ceil(self.limit - self.level - _EPS))


Bucket = QuantizedBucket | RefillingBucket


@dataclass(slots=True)
class Rejection:
    kind: str  # "requests" | "tokens"
    limit: int
    used: int
    requested: int
    retry_after_s: float


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets checked together."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        window: str,
        now: float,
        *,
        report_window: bool = False,
        style: str = "provider",
    ) -> None:
        self.style = style
        self.report_window = report_window
        if style == "litellm":
            window = "minute"

        def bucket(limit: float | None) -> Bucket | None:
            if not limit:
                return None
            if window == "bucket":
                return RefillingBucket(limit, now)
            return QuantizedBucket(limit, 1.0 if window == "second" else 60.0, now)

        self.requests = bucket(rpm)
        self.tokens = bucket(tpm)

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def check(self, cost: int, now: float) -> Rejection | None:
        """Admit (and charge) one request of ``cost`` tokens, or say why not."""
        req, tok = self.requests, self.tokens
        if req is not None:
            req.refill(now)
            if not req.admits(1):
                return self._rejection("requests", req, 1, now)
        if tok is not None:
            tok.refill(now)
            if not tok.admits(cost):
                return self._rejection("tokens", tok, cost, now)
        if req is not None:
            req.consume(1)
        if tok is not None:
            tok.consume(cost)
        return None

    def _rejection(self, kind: str, bucket: Bucket, cost: int, now: float) -> Rejection:
        wait = LITELLM_RETRY_AFTER_S if self.style == "litellm" else bucket.retry_after(cost, now)
        return Rejection(kind, int(bucket.limit), bucket.used(), cost, wait)

    def _report(self, bucket: Bucket, now: float) -> tuple[str, str, float]:
        bucket.refill(now)
        remaining = bucket.window_remaining() if self.report_window else bucket.remaining()
        return str(int(bucket.limit)), str(remaining), bucket.reset_after(now)

    def openai_headers(self, now: float) -> dict[str, str]:
        h: dict[str, str] = {}
        for name, b in (("requests", self.requests), ("tokens", self.tokens)):
            if b is None:
                continue
            limit, remaining, reset = self._report(b, now)
            if self.style == "litellm":
                h[f"x-ratelimit-model_per_key-limit-{name}"] = limit
                h[f"x-ratelimit-model_per_key-remaining-{name}"] = remaining
                continue
            h[f"x-ratelimit-limit-{name}"] = limit
            h[f"x-ratelimit-remaining-{name}"] = remaining
            h[f"x-ratelimit-reset-{name}"] = go_duration(reset)
        return h

    def anthropic_headers(self, now: float) -> dict[str, str]:
        h: dict[str, str] = {}
        for name, b in (("requests", self.requests), ("tokens", self.tokens)):
            if b is None:
                continue
            limit, remaining, reset = self._report(b, now)
            h[f"anthropic-ratelimit-{name}-limit"] = limit
            h[f"anthropic-ratelimit-{name}-remaining"] = remaining
            h[f"anthropic-ratelimit-{name}-reset"] = rfc3339(now + reset)
        return h


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (integer ceil, at least 1) and ``retry-after-ms``."""
    return {
        "retry-after": str(max(1, math.ceil(seconds - _EPS))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
