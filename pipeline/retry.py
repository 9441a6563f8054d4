"""When to try a failed request again, and how long to wait first. Pure policy."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.errors import ProviderError, RetryableError

_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(
        self, attempt: int, error: ProviderError, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up.

        A server's own hint (Retry-After and friends) wins over backoff; otherwise
        exponential backoff with jitter, so rows that failed together don't retry together.
        """
        if not isinstance(error, RetryableError) or attempt >= self.max_attempts:
            return None
        rng = rng or _RNG
        if error.retry_after is not None:
            return error.retry_after + rng.uniform(0, 0.1 * min(error.retry_after, 1.0) + 0.01)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
