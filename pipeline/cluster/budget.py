"""A cluster's spending limits: one budget, handed to workers in allowances.

The limiter actor owns `limits.max_cost_usd` / `limits.max_tokens_total` for the
whole cluster. A worker's `Budget` starts with nothing to spend; before an attempt
its pacer makes sure the allowance covers the attempt's projected cost (the same
projection one process uses), asking the actor for more when it does not: room for
`TOP_UP_REQUESTS` more attempts, or a fair share of what is left when that is less.
The actor never hands out more than the limit minus what earlier runs spent and what
every worker holds (a finished worker holds only what it really spent). When the
actor has no room left for an attempt, the worker's reserve fails as on one machine,
the job stops with exit 3, and through the actor every other worker stops too.
"""

from __future__ import annotations

import math
from contextlib import suppress
from dataclasses import dataclass, field

from pipeline.budget import Budget, Reservation
from pipeline.errors import BudgetExceeded
from pipeline.types import ChatRequest

TOP_UP_REQUESTS = 16  # a top-up covers this many attempts' projected cost


@dataclass
class Allowances:
    """The actor's side: the limits, and what each worker holds of them."""

    max_usd: float | None
    max_tokens: float | None
    spent_usd: float = 0.0  # by earlier runs of the job (their committed rows)
    spent_tokens: float = 0.0
    granted: dict[str, tuple[float, float]] = field(default_factory=dict)
    finished: dict[str, tuple[float, float]] = field(default_factory=dict)  # really spent

    def allow(
        self, worker: str, needed: tuple[float, float], wanted: tuple[float, float], active: int
    ) -> tuple[float, float]:
        """Grant `worker` at least what it `needed` for its next attempt (if there is room),
        up to what it `wanted`, or a fair share of the rest among `active` workers."""
        usd = self._give(self.max_usd, 0, needed[0], wanted[0], active)
        tokens = self._give(self.max_tokens, 1, needed[1], wanted[1], active)
        held = self.granted.get(worker, (0.0, 0.0))
        self.granted[worker] = (held[0] + usd, held[1] + tokens)
        return usd, tokens

    def finish(self, worker: str, spent_usd: float, spent_tokens: float) -> None:
        """A worker is done: it holds only what it spent, the rest is free again."""
        if worker in self.granted:
            self.finished[worker] = (spent_usd, spent_tokens)

    def _give(
        self, limit: float | None, which: int, needed: float, wanted: float, active: int
    ) -> float:
        if limit is None:
            return 0.0
        spent = self.spent_usd if which == 0 else self.spent_tokens
        held = sum(
            self.finished.get(worker, granted)[which] for worker, granted in self.granted.items()
        )
        free = max(0.0, limit - spent - held)
        return min(free, max(needed, min(wanted, free / max(1, active))))


class AllowanceBudget(Budget):
    """A worker's budget: the ordinary projection and reservation, within its allowance
    (a `SpendingLimit`, as one process's `Budget` is)."""

    def __init__(self, budget: Budget) -> None:
        # The job's limits, kept for the message; the worker starts with no allowance.
        self.job_max_usd, self.job_max_tokens = budget.max_cost_usd, budget.max_tokens_total
        super().__init__(
            0.0 if budget.max_cost_usd is not None else None,
            0 if budget.max_tokens_total is not None else None,
            budget.price,
        )
        self._held: dict[int, Reservation] = {}

    def wanted(self, request: ChatRequest) -> tuple[tuple[float, float], tuple[float, float]]:
        """(what the next attempt of `request` needs beyond the allowance, what to ask for)."""
        needed = self.shortfall(request)
        usd, tokens = self.projection(request)
        return needed, (needed[0] + TOP_UP_REQUESTS * usd, needed[1] + TOP_UP_REQUESTS * tokens)

    def grow(self, usd: float, tokens: float) -> None:
        if self.max_cost_usd is not None:
            self.max_cost_usd += usd
        if self.max_tokens_total is not None:
            # Whole tokens: a top-up rounds up by under one.
            self.max_tokens_total = math.ceil(self.max_tokens_total + tokens)

    def hold(self, request: ChatRequest) -> None:
        """Reserve for the attempt about to start, if the allowance has room; its
        `reserve` then takes this reservation (without room, it fails there)."""
        with suppress(BudgetExceeded):
            self._held[id(request)] = super().reserve(request)

    def reserve(self, request: ChatRequest) -> Reservation:
        if id(request) in self._held:
            return self._held.pop(id(request))
        try:
            return super().reserve(request)
        except BudgetExceeded:
            usd, _ = self.shortfall(request)
            limit = (
                f"limits.max_cost_usd = ${self.job_max_usd:g}"
                if usd > 0 and self.job_max_usd is not None
                else f"limits.max_tokens_total = {self.job_max_tokens}"
            )
            raise BudgetExceeded(
                f"budget reached across the cluster: every worker together has spent or holds "
                f"all of {limit}, with no room for the next request's projected cost"
            ) from None
