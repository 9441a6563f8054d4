"""decide: what one answer means for its row, the same in every mode; pure, so no I/O here."""

from __future__ import annotations

import random

import pytest

from pipeline import errors
from pipeline.breaker import Breaker
from pipeline.config import Price
from pipeline.decide import Finished, Retry, RowTries, Rules, Stop, decide, stays_failed
from pipeline.retry import RetryPolicy
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, Completion, Usage

PRICE = Price(input=1.0, output=2.0, cached_input=0.5)  # USD per million tokens
USAGE = Usage(prompt_tokens=100_000, completion_tokens=50_000, total_tokens=150_000)
ATTEMPT_USD = 0.2  # USAGE at PRICE
ROW = ChatRequest(3, "R003", [], "hash-3", 10, 100)
SCHEMA = OutputSchema({"label": {"enum": ["positive", "negative"]}})
RULES = Rules(RetryPolicy(max_attempts=3), PRICE, SCHEMA, schema_retries=1)
NOW = 1000.0


def answer(text: str = '{"label": "positive"}', finish: str = "stop") -> Completion:
    return Completion(text, None, USAGE, finish, "m")


def tried(attempts: int, schema_failures: int = 0) -> RowTries:
    return RowTries(attempts=attempts, schema_failures=schema_failures)


def run(
    got: Completion | errors.ProviderError, tries: RowTries, rules: Rules = RULES
) -> Finished | Retry | Stop:
    return decide(got, tries, rules, row=ROW, now=NOW, latency_s=0.5, rng=random.Random(1))


def test_a_matching_answer_finishes_the_row_with_its_columns_and_cost() -> None:
    decision = run(answer(), tried(1))

    assert isinstance(decision, Finished) and decision.error is None
    result = decision.result
    assert (result.index, result.key, result.request_hash) == (3, "R003", "hash-3")
    assert result.ok and result.parsed == {"label": "positive"}
    assert result.attempts == 1 and result.latency_s == 0.5
    assert result.cost_usd == pytest.approx(ATTEMPT_USD)


def test_a_schema_mismatch_is_asked_again_then_final_with_every_paid_attempt_charged() -> None:
    tries = tried(1)
    first = run(answer('{"label": "maybe"}'), tries)
    assert isinstance(first, Retry) and first.when == NOW  # at once
    assert isinstance(first.error, errors.SchemaViolation)
    assert first.tries.schema_failures == 1 and first.tries.spend.paid == 1
    assert tries.schema_failures == 0 and tries.spend.paid == 0  # what it was given is unchanged

    second_tries = RowTries(2, first.tries.schema_failures, first.tries.spend)
    final = run(answer('{"label": "maybe"}'), second_tries)
    assert isinstance(final, Finished) and isinstance(final.error, errors.SchemaViolation)
    assert final.result.error is not None and final.result.error.startswith("schema_violation")
    assert final.result.completion is not None
    assert final.result.completion.response == '{"label": "maybe"}'  # the raw answer kept
    assert final.result.cost_usd == pytest.approx(2 * ATTEMPT_USD)


def test_schema_retries_count_mismatches_only_not_other_failed_attempts() -> None:
    # Two 5xx before the first answer: the mismatch still gets its retry.
    decision = run(answer('{"label": "maybe"}'), tried(3, schema_failures=0))
    assert isinstance(decision, Retry)
    no_retries = Rules(RULES.policy, PRICE, SCHEMA, schema_retries=0)
    assert isinstance(run(answer('{"label": "maybe"}'), tried(1), no_retries), Finished)


def test_a_retryable_error_with_attempts_left_waits_with_backoff() -> None:
    decision = run(errors.ServerError("down", status=503), tried(1))
    assert isinstance(decision, Retry)
    assert decision.reason == "exponential backoff with jitter"
    assert 0.25 <= decision.wait_s <= 0.5 and decision.when == NOW + decision.wait_s


def test_a_retryable_error_with_attempts_exhausted_is_the_rows_error() -> None:
    decision = run(errors.ServerError("down", status=503), tried(3))
    assert isinstance(decision, Finished)
    assert decision.why == "gave up after 3 attempts"
    assert decision.result.error == "server_error (HTTP 503): down after 3 attempts"


def test_a_row_fatal_error_is_recorded_at_once() -> None:
    decision = run(errors.BadRequest("bad input", status=400), tried(1))
    assert isinstance(decision, Finished) and isinstance(decision.error, errors.BadRequest)
    assert decision.result.error == "bad_request (HTTP 400): bad input"
    assert decision.result.cost_usd is None  # nothing was paid


def test_a_job_fatal_error_stops_and_leaves_the_row_without_a_result() -> None:
    decision = run(errors.AuthenticationError("bad key", status=401), tried(1))
    assert isinstance(decision, Stop) and isinstance(decision.error, errors.AuthenticationError)


@pytest.mark.parametrize(
    ("finish", "kind"), [("content_filter", "content_filtered"), ("refusal", "refused")]
)
def test_a_content_filter_or_refusal_is_final_never_a_schema_retry(finish: str, kind: str) -> None:
    decision = run(answer("I can't help with that.", finish=finish), tried(1))
    assert isinstance(decision, Finished) and isinstance(decision.error, errors.ContentFiltered)
    assert decision.result.error is not None
    assert decision.result.error.startswith(kind)
    assert decision.result.completion is not None
    assert decision.result.completion.response == "I can't help with that."
    assert decision.result.cost_usd == pytest.approx(ATTEMPT_USD)  # it was paid for


def test_a_paused_turn_is_its_own_final_error_never_a_success() -> None:
    decision = run(answer("Searching the web", finish="pause_turn"), tried(1))
    assert isinstance(decision, Finished) and isinstance(decision.error, errors.PausedTurn)
    assert decision.result.error is not None and decision.result.error.startswith("paused_turn")


def test_a_schema_mismatch_cut_by_max_tokens_is_not_asked_again() -> None:
    decision = run(answer('{"label": "posi', finish="length"), tried(1))
    assert isinstance(decision, Finished) and isinstance(decision.error, errors.SchemaViolation)


def test_rate_limited_waits_as_long_as_the_server_asked() -> None:
    decision = run(errors.RateLimited("slow down", status=429, retry_after=7.0), tried(1))
    assert isinstance(decision, Retry)
    assert 7.0 <= decision.wait_s <= 7.2 and decision.when == NOW + decision.wait_s
    assert decision.reason == "rate limited: whole pool paused 7s as the server asked"


def test_when_the_job_stops_only_the_rows_own_failures_stay_failed() -> None:
    breaker = Breaker(same_error_rows=2)
    bad_key = errors.BadRequest("No connected db.", status=400)
    repeated = breaker.row_failed(bad_key) or breaker.row_failed(bad_key)
    assert repeated is not None
    budget = errors.BudgetExceeded("budget reached")

    assert not stays_failed(bad_key, repeated)
    assert stays_failed(errors.BadRequest("other", status=422), repeated)
    assert stays_failed(errors.ContentFiltered("no"), repeated)
    assert stays_failed(errors.SchemaViolation("x"), budget)
    assert not stays_failed(errors.ServerError("down", status=503), budget)
    assert not stays_failed(errors.RateLimited("slow", status=429), repeated)
