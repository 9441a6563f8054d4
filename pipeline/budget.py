"""Spending limits: stop sending before the projected spend would cross them.

Every attempt reserves its projected cost before it is sent and settles with the
real usage when it comes back, so requests in flight count against the limit
too. Until a few answers have come back the projection is the worst case (the
whole `max_tokens` reply); after that it is the mean of the real ones.

An attempt needs only `SpendingLimit` (`reserve` before the call, `settle` after it):
`Budget` is one process's, `cluster.budget.AllowanceBudget` a Ray worker's share of
the cluster's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.config import Price
from pipeline.errors import BudgetExceeded, ProviderError
from pipeline.spend import attempt_cost
from pipeline.types import ChatRequest, Completion, Usage

WARMUP_ANSWERS = 5
Reservation = tuple[float, float] | None  # (USD, tokens) held for one attempt; None: no limits


class SpendingLimit(Protocol):
    """What an attempt asks of the job's spending limits."""

    def reserve(self, request: ChatRequest) -> Reservation:
        """Claim room for one attempt of `request`, or raise `BudgetExceeded`."""
        ...

    def settle(self, reserved: Reservation, answer: Completion | ProviderError | None) -> None:
        """Replace what `reserve` returned with what the attempt really cost."""
        ...


def refuse_past_limits(
    max_cost_usd: float | None,
    max_tokens_total: int | None,
    *,
    spent: tuple[float, int],
    reserved: tuple[float, float],
    wanted: tuple[float, float],
    spender: str = "",
) -> None:
    """BudgetExceeded when what is spent, what attempts in flight hold and what one more
    attempt wants (USD, tokens) would cross a limit."""
    if max_cost_usd is not None:
        projected = spent[0] + reserved[0] + wanted[0]
        if projected > max_cost_usd:
            raise BudgetExceeded(
                f"budget reached: ${spent[0]:.4f} spent{spender}, and the next request would "
                f"take the projected spend to ${projected:.4f}, over "
                f"limits.max_cost_usd = ${max_cost_usd:g}"
            )
    if max_tokens_total is not None:
        projected_tokens = spent[1] + reserved[1] + wanted[1]
        if projected_tokens > max_tokens_total:
            raise BudgetExceeded(
                f"token budget reached: {spent[1]} tokens used{spender}, and the next request "
                f"would take the projection to {projected_tokens:.0f}, over "
                f"limits.max_tokens_total = {max_tokens_total}"
            )


@dataclass
class Budget:
    max_cost_usd: float | None
    max_tokens_total: int | None
    price: Price | None
    spent_usd: float = 0.0
    spent_tokens: int = 0
    _reserved_usd: float = 0.0
    _reserved_tokens: float = 0.0
    _answers: int = 0
    _answer_usd: float = 0.0
    _answer_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.max_cost_usd is not None or self.max_tokens_total is not None

    def projection(self, request: ChatRequest) -> tuple[float, float]:
        """(USD, tokens) one attempt of `request` is expected to cost."""
        if self._answers >= WARMUP_ANSWERS:
            return self._answer_usd / self._answers, self._answer_tokens / self._answers
        worst = Usage(prompt_tokens=request.prompt_estimate, completion_tokens=request.reply_budget)
        usd = self.price.cost(worst) if self.price else 0.0
        return usd, float(request.prompt_estimate + request.reply_budget)

    def shortfall(self, request: ChatRequest) -> tuple[float, float]:
        """(USD, tokens) one attempt of `request` needs beyond what the limits leave."""
        usd, tokens = self.projection(request)
        short_usd = short_tokens = 0.0
        if self.max_cost_usd is not None:
            short_usd = self.spent_usd + self._reserved_usd + usd - self.max_cost_usd
        if self.max_tokens_total is not None:
            reserved = self.spent_tokens + self._reserved_tokens
            short_tokens = reserved + tokens - self.max_tokens_total
        return max(0.0, short_usd), max(0.0, short_tokens)

    def reserve(self, request: ChatRequest) -> Reservation:
        """Claim room for one attempt, or raise BudgetExceeded if there is none.

        Returns what was reserved, for `settle`; None when there are no limits.
        """
        if not self.active:
            return None
        usd, tokens = self.projection(request)
        refuse_past_limits(
            self.max_cost_usd,
            self.max_tokens_total,
            spent=(self.spent_usd, self.spent_tokens),
            reserved=(self._reserved_usd, self._reserved_tokens),
            wanted=(usd, tokens),
        )
        self._reserved_usd += usd
        self._reserved_tokens += tokens
        return usd, tokens

    def settle(self, reserved: Reservation, answer: Completion | ProviderError | None) -> None:
        """Replace a reservation with what the attempt really cost (nothing if it failed)."""
        if reserved is None:
            return
        self.release(reserved)
        self.count(answer)

    def release(self, reserved: tuple[float, float]) -> None:
        self._reserved_usd -= reserved[0]
        self._reserved_tokens -= reserved[1]

    def count(self, answer: Completion | ProviderError | None) -> tuple[float, int]:
        """Add what an attempt cost to what is spent; returns that (USD, tokens)."""
        if not isinstance(answer, Completion):
            return 0.0, 0
        usage = answer.usage
        cost = attempt_cost(answer, self.price) or 0.0
        tokens = usage.prompt_tokens + usage.output_tokens if usage is not None else 0
        self.spent_usd += cost
        self.spent_tokens += tokens
        if usage is not None:  # only answers with usage say what the next one will cost
            self._answers += 1
            self._answer_usd += cost
            self._answer_tokens += tokens
        return cost, tokens


@dataclass
class SharedBudget:
    """The job's spending limits over several runs sending at once (the steps of a job
    streaming rows to each other): what each run reserves and spends is counted here
    too, so requests in flight in any of them count against the one limit."""

    max_cost_usd: float | None
    max_tokens_total: int | None
    spent_usd: float = 0.0
    spent_tokens: int = 0
    _reserved_usd: float = 0.0
    _reserved_tokens: float = 0.0
    _runs: dict[str, Budget] = field(default_factory=dict)

    def own_budget(self, run: str, make: Callable[[], Budget]) -> Budget:
        """The budget of one of the runs (a step), kept from one of its runs to the next:
        what it learned of the cost of an answer still holds for the next wave."""
        if run not in self._runs:
            self._runs[run] = make()
        return self._runs[run]

    def reserve(self, usd: float, tokens: float) -> None:
        refuse_past_limits(
            self.max_cost_usd,
            self.max_tokens_total,
            spent=(self.spent_usd, self.spent_tokens),
            reserved=(self._reserved_usd, self._reserved_tokens),
            wanted=(usd, tokens),
            spender=" by the job's steps",
        )
        self._reserved_usd += usd
        self._reserved_tokens += tokens

    def settle(self, reserved: tuple[float, float], spent: tuple[float, int]) -> None:
        self._reserved_usd -= reserved[0]
        self._reserved_tokens -= reserved[1]
        self.spent_usd += spent[0]
        self.spent_tokens += spent[1]


@dataclass
class JointLimit:
    """A run's own limits and the limits it shares with other runs: an attempt needs
    room in both. The run's own `Budget` prices the attempt; the shared one counts it."""

    own: Budget
    shared: SharedBudget

    def reserve(self, request: ChatRequest) -> Reservation:
        reserved = self.own.reserve(request)
        usd, tokens = reserved if reserved is not None else self.own.projection(request)
        try:
            self.shared.reserve(usd, tokens)
        except BudgetExceeded:
            self.own.settle(reserved, None)
            raise
        return usd, tokens

    def settle(self, reserved: Reservation, answer: Completion | ProviderError | None) -> None:
        assert reserved is not None  # `reserve` always reserves
        if self.own.active:  # the own budget reserved only when it has limits of its own
            self.own.release(reserved)
        self.shared.settle(reserved, self.own.count(answer))
