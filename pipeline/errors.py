"""Every error the pipeline raises, by what the caller should do about it.

    PipelineError
    ├── SpecError                 invalid job, input or arguments: exit 2, nothing sent
    ├── JobStopped                the run stopped before finishing: exit 3
    │   ├── WriteFailed           a write failed (disk full): stop sending, keep the rest
    │   ├── BudgetExceeded        the next request would cross a spending limit
    │   └── SystematicFailure     the same failure on row after row: no row can succeed
    ├── RunCrashed                an unexpected error stopped the run: exit 4
    └── ProviderError             one request failed; carries the HTTP status if any
        ├── RetryableError        try the same request again later
        │   ├── RateLimited           429 (not quota), retry hint honoured
        │   ├── ServerError           5xx, 529, 408, 409
        │   ├── TransportError        timeout, refused or dropped connection
        │   └── MalformedResponse     truncated or unparseable body, missing choices
        ├── RowError              this row can never succeed as sent: recorded, not retried
        │   ├── BadRequest            400 / 422
        │   ├── ContextLengthExceeded prompt too long for the model
        │   ├── SchemaViolation       the answer does not match output.schema
        │   └── ContentFiltered       the provider refused the content
        └── JobFatalError         no row can succeed: stop sending, exit 3
            ├── AuthenticationError   401, 403, a rejected key
            ├── ModelNotFound         404
            └── QuotaExceeded         402, insufficient quota, spend limit

Provider adapters translate HTTP statuses and body error codes into these classes once,
at the boundary; everything downstream decides by type only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.types import RateLimitInfo


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class SpecError(PipelineError):
    """The job spec, its input or the command-line arguments are invalid."""


class JobStopped(PipelineError):
    """The run stopped early for a job-level reason; a rerun resumes it."""

    advice = "fix the cause and rerun; finished rows are kept"

    def describe(self) -> str:
        return str(self)


class WriteFailed(JobStopped):
    """A write to the checkpoint, run log or output failed (a full disk, a quota)."""

    advice = "free space and rerun; every row committed before the failure is kept"

    @classmethod
    def while_(cls, doing: str, exc: BaseException) -> WriteFailed:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return cls(f"could not write while {doing} ({reason}); no more requests were sent")


class BudgetExceeded(JobStopped):
    """Sending more would cross `limits.max_cost_usd` or `limits.max_tokens_total`."""

    advice = "raise limits.max_cost_usd or limits.max_tokens_total in the job"


class SystematicFailure(JobStopped):
    """Row after row fails the same way with no success: the job, not the rows, is wrong."""

    def __init__(self, message: str, *, advice: str) -> None:
        super().__init__(message)
        self.advice = advice


class RunCrashed(PipelineError):
    """An unexpected error stopped the run; finished rows were kept. The cause is chained."""

    def __init__(self, message: str, *, log_path: object = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class ProviderError(PipelineError):
    """One request to the model provider failed."""

    kind = "provider_error"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.rate_limits: RateLimitInfo | None = None

    def describe(self) -> str:
        """A one-line description for the output's `error` column."""
        status = f" (HTTP {self.status})" if self.status else ""
        return f"{self.kind}{status}: {self.message}"


class RetryableError(ProviderError):
    """A transient failure: the same request may succeed later."""

    kind = "retryable_error"


class RateLimited(RetryableError):
    """The provider asked us to slow down."""

    kind = "rate_limited"


class ServerError(RetryableError):
    """The provider failed or was overloaded."""

    kind = "server_error"


class TransportError(RetryableError):
    """The request timed out or the connection failed."""

    kind = "transport_error"


class MalformedResponse(RetryableError):
    """The provider answered with a body we cannot use."""

    kind = "malformed_response"


class RowError(ProviderError):
    """This request can never succeed as sent; other rows may."""

    kind = "row_error"


class BadRequest(RowError):
    """The provider rejected the request as invalid."""

    kind = "bad_request"


class ContextLengthExceeded(RowError):
    """The prompt does not fit the model's context window."""

    kind = "context_length_exceeded"


class SchemaViolation(RowError):
    """The answer does not match `output.schema` (retried `output.schema_retries` times)."""

    kind = "schema_violation"


class ContentFiltered(RowError):
    """The provider refused to answer this content."""

    kind = "content_filtered"


class Refused(ContentFiltered):
    """The model declined to answer this row (OpenAI `refusal`, Anthropic `refusal`)."""

    kind = "refused"


class PausedTurn(RowError):
    """The provider paused a long turn (Anthropic `pause_turn`): not an answer."""

    kind = "paused_turn"


class JobFatalError(ProviderError):
    """No request of this job can succeed until the user fixes something."""

    kind = "job_fatal"
    advice = "fix the job and rerun; finished rows are kept"


class AuthenticationError(JobFatalError):
    """The API key was missing, wrong or lacks permission."""

    kind = "authentication_error"
    advice = "check the API key in the environment variable named by the job"


class ModelNotFound(JobFatalError):
    """The provider does not serve the requested model."""

    kind = "model_not_found"
    advice = "check `model.model` against `pipeline models` or the provider's model list"


class QuotaExceeded(JobFatalError):
    """The account is out of credit or over its spending limit."""

    kind = "quota_exceeded"
    advice = "add credit or raise the spending limit at the provider, then rerun"
