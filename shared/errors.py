"""One error hierarchy for Lead Writer, split by what the caller does next.

    LeadWriterError
    ├── RetryLater                 transient: reschedule the message (honour ``retry_after``)
    │   ├── CrmUnavailable         network error, timeout, connection reset, 5xx
    │   ├── CrmThrottled           429 service protection limit (``retry_after`` from Retry-After)
    │   │   └── CrmPaced           not sent: in a penalty, or our own pacing says "not yet"
    │   ├── AuthorityUnavailable   the Entra token endpoint could not be reached or failed
    │   └── SecretStoreUnavailable Key Vault could not be reached, refused access or failed
    ├── DeadLetter                 permanent for this message: dead-letter it with ``reason``
    │   ├── InvalidLead
    │   ├── CredentialsMissing
    │   ├── CredentialsRejected    carries the Entra error code (AADSTS…)
    │   ├── SolutionMissing
    │   ├── SolutionVersionUnsupported
    │   ├── PermissionDenied
    │   └── LeadRejected           carries the CRM's message
    ├── UnsafeCrmUrl               a CRM URL outside the allowed Dynamics hosts (input error)
    └── ConfigurationError         a setting is missing or invalid (fails at start)

Every error carries service context (HTTP status, OData error code, request id) where there is one,
and never a password, client secret or token: messages are composed by us from safe parts only.
"""

from __future__ import annotations

from enum import StrEnum


class DeadLetterReason(StrEnum):
    """Dead-letter reasons (DESIGN §5, stable)."""

    INVALID_LEAD = "InvalidLead"
    CREDENTIALS_MISSING = "CredentialsMissing"
    CREDENTIALS_REJECTED = "CredentialsRejected"
    SOLUTION_MISSING = "SolutionMissing"
    SOLUTION_VERSION_UNSUPPORTED = "SolutionVersionUnsupported"
    PERMISSION_DENIED = "PermissionDenied"
    LEAD_REJECTED = "LeadRejected"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
    TTL_EXPIRED = "TTLExpiredException"


#: Reasons a publisher fixes by changing its CRM or its connection; replayed after a verified update.
CONFIGURATION_REASONS: frozenset[DeadLetterReason] = frozenset(
    {
        DeadLetterReason.CREDENTIALS_MISSING,
        DeadLetterReason.CREDENTIALS_REJECTED,
        DeadLetterReason.SOLUTION_MISSING,
        DeadLetterReason.SOLUTION_VERSION_UNSUPPORTED,
        DeadLetterReason.PERMISSION_DENIED,
    }
)


class LeadWriterError(Exception):
    """Base of every error Lead Writer raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        details = [
            f"{name}={value}"
            for name, value in (("status", self.status), ("code", self.code), ("request_id", self.request_id))
            if value
        ]
        return f"{self.message} ({', '.join(details)})" if details else self.message


class RetryLater(LeadWriterError):
    """Transient failure: the message should be rescheduled, not dead-lettered."""

    def __init__(self, message: str, *, retry_after: float | None = None, **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.retry_after = retry_after


class CrmUnavailable(RetryLater):
    """The CRM could not be reached, timed out, reset the connection or answered 5xx."""


class CrmThrottled(RetryLater):
    """The CRM answered 429: no request may go to this CRM user before ``retry_after`` elapses."""


class CrmPaced(CrmThrottled):
    """Nothing was sent: the CRM user is in a penalty, or client-side pacing (rate or concurrency)
    says "not yet" for ``retry_after`` seconds. The message may simply wait that long; it has not
    failed, so a runtime with a backlog keeps it there rather than spend a retry attempt on it.
    ``wait`` says why (``penalty``, ``rate`` or ``concurrency``)."""

    def __init__(self, message: str, *, retry_after: float | None = None, wait: str = "penalty") -> None:
        super().__init__(message, retry_after=retry_after)
        self.wait = wait


class AuthorityUnavailable(RetryLater):
    """The Entra token endpoint could not be reached or answered with a server error."""


class SecretStoreUnavailable(RetryLater):
    """The secret store (Key Vault) could not be reached, refused our identity or failed."""


class DeadLetter(LeadWriterError):
    """Permanent failure for this message: dead-letter it with :attr:`reason`."""

    reason: DeadLetterReason = DeadLetterReason.LEAD_REJECTED


class InvalidLead(DeadLetter):
    """The body is not a lead; ``field`` names the offending field when there is one."""

    reason = DeadLetterReason.INVALID_LEAD

    def __init__(self, message: str, *, field: str | None = None, **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.field = field


class CredentialsMissing(DeadLetter):
    reason = DeadLetterReason.CREDENTIALS_MISSING


class CredentialsRejected(DeadLetter):
    """Entra refused the credentials; ``entra_code`` is the AADSTS number when known."""

    reason = DeadLetterReason.CREDENTIALS_REJECTED

    def __init__(self, message: str, *, entra_code: int | None = None, **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.entra_code = entra_code


class SolutionMissing(DeadLetter):
    reason = DeadLetterReason.SOLUTION_MISSING


class SolutionVersionUnsupported(DeadLetter):
    reason = DeadLetterReason.SOLUTION_VERSION_UNSUPPORTED


class PermissionDenied(DeadLetter):
    reason = DeadLetterReason.PERMISSION_DENIED


class LeadRejected(DeadLetter):
    reason = DeadLetterReason.LEAD_REJECTED


class UnsafeCrmUrl(LeadWriterError):
    """A CRM URL that is not an allowed Dynamics host (DESIGN §4 SSRF guard)."""


class ConfigurationError(LeadWriterError):
    """A setting is missing or invalid; the message names the variable."""
