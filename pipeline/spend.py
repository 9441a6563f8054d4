"""What one row cost across all its paid attempts.

Every HTTP 200 is paid for, including the answers that did not match `output.schema`
and were asked again. A row's recorded usage and cost are the sum over those
attempts, so the run's totals (which add up rows) count every paid attempt. A cost
the provider reported for a call is used as is; otherwise it comes from the price
table; when neither is known for some attempt the row's cost is unknown (None).
"""

from __future__ import annotations

import dataclasses

from pipeline.config import Price
from pipeline.types import Completion, RowResult, Usage


def attempt_cost(completion: Completion, price: Price | None) -> float | None:
    """What one answered call cost: as the provider reported it, else from the price."""
    if completion.reported_cost_usd is not None:
        return completion.reported_cost_usd
    if price is not None and completion.usage is not None:
        return price.on_tier(completion.service_tier).cost(completion.usage)
    return None


def add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None or b is None:
        return a if b is None else b
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        reasoning_tokens=a.reasoning_tokens + b.reasoning_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
        cache_write_tokens=a.cache_write_tokens + b.cache_write_tokens,
    )


@dataclasses.dataclass
class RowSpend:
    """The paid attempts of one row so far."""

    usage: Usage | None = None
    cost_usd: float | None = 0.0
    paid: int = 0

    def add(self, completion: Completion, cost: float | None) -> None:
        self.paid += 1
        self.usage = add_usage(self.usage, completion.usage)
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost

    def charge(self, result: RowResult) -> RowResult:
        """`result` carrying the row's total usage and cost over every paid attempt."""
        if self.paid == 0:
            return result
        result.cost_usd = self.cost_usd
        if result.completion is not None and self.paid > 1:
            result.completion = dataclasses.replace(result.completion, usage=self.usage)
        return result
