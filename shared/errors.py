"""One error hierarchy for Lead Writer, split by what the caller does next.

    LeadWriterError
    ├── RetryLater                 transient: reschedule the message (honour ``retry_after``)
    │   ├── CrmUnavailable         network error, timeout, connection reset, 5xx
    │   ├── CrmThrottled           429 service protection limit (``retry_after`` from Retry-After)
    │   │   └── CrmPaced           not sent: in a penalty, or our own pacing says "not yet"
    │   ├── AuthorityUnavailable   the Entra token endpoint could not be reached or failed
    │   └── SecretStoreUnavailable Key Vault could not be reached, refused access or failed
    ├── DeadLetter                 permanent for this message: dead-letter it with ``reason``
    │   ├── InvalidLead            also an InvalidInput: the ingest endpoint answers it 422
    │   ├── CredentialsMissing
    │   ├── CredentialsRejected    carries the Entra error code (AADSTS…)
    │   ├── SolutionMissing
    │   ├── SolutionVersionUnsupported
    │   ├── PermissionDenied
    │   └── LeadRejected           carries the CRM's message
    ├── InvalidInput               a caller's input is wrong: answer 422 / exit 2 naming ``field``
    │   ├── UnsafeCrmUrl           a CRM URL outside the allowed Dynamics hosts
    │   ├── InvalidPublisherId     a publisher id outside the pattern
    │   ├── InvalidSecretName      a secret name outside Key Vault's rule
    │   └── InvalidFilter          a dead-letter selection that names no queue or reason we know
    ├── LockLost                   settling failed: the lock expired or the message is settled already;
    │                              the caller forgets the message (the broker redelivers it)
    ├── BrokerClosed               the embedded broker was closed under a caller
    └── ConfigurationError         a setting is missing or invalid (fails at start)

``InvalidInput`` is also a ``ValueError``, so code that validates arguments reads as Python does. The
CRM simulator (``shared.simulator``) is a stand-in for Dynamics, not part of the product, and keeps
errors of its own.

Every error carries service context (HTTP status, OData error code, request id) where there is one,
and never a password, client secret or token: messages are composed by us from safe parts only.
"""

from __future__ import annotations

from enum import StrEnum


class DeadLetterReason(StrEnum):
    """Dead-letter reasons (architecture §5, stable)."""

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
    """Permanent failure for this message: dead-letter it with :attr:`reason`.

    Abstract: every subclass names its own reason, so no error is dead-lettered under a reason that
    was merely the default.
    """

    reason: DeadLetterReason

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "reason" not in cls.__dict__ and not any("reason" in vars(base) for base in cls.__mro__[1:-1]):
            raise TypeError(f"{cls.__name__} must name its dead-letter reason")

    def __init__(self, message: str, **context: object) -> None:
        if type(self) is DeadLetter:
            raise TypeError("DeadLetter is abstract: raise the subclass that names the reason")
        super().__init__(message, **context)  # type: ignore[arg-type]


class InvalidInput(LeadWriterError, ValueError):
    """A caller's input is wrong; ``field`` names it (``body`` when it is the whole input)."""

    def __init__(self, message: str, *, field: str | None = None, **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.field = field


class InvalidLead(DeadLetter, InvalidInput):
    """The body is not a lead; ``field`` names the offending field when there is one."""

    reason = DeadLetterReason.INVALID_LEAD


class CredentialsMissing(DeadLetter):
    reason = DeadLetterReason.CREDENTIALS_MISSING


class CredentialsRejected(DeadLetter):
    """Entra refused the credentials; ``entra_code`` is the AADSTS number when known."""

    reason = DeadLetterReason.CREDENTIALS_REJECTED

    def __init__(self, message: str, *, entra_code: int | None = None, **context: object) -> None:
        super().__init__(message, **context)
        self.entra_code = entra_code


class SolutionMissing(DeadLetter):
    reason = DeadLetterReason.SOLUTION_MISSING


class SolutionVersionUnsupported(DeadLetter):
    reason = DeadLetterReason.SOLUTION_VERSION_UNSUPPORTED


class PermissionDenied(DeadLetter):
    reason = DeadLetterReason.PERMISSION_DENIED


class LeadRejected(DeadLetter):
    reason = DeadLetterReason.LEAD_REJECTED


class UnsafeCrmUrl(InvalidInput):
    """A URL that is not an allowed host: a CRM outside the Dynamics hosts (the SSRF guard)."""

    def __init__(self, message: str, *, field: str | None = "url", **context: object) -> None:
        super().__init__(message, field=field, **context)


class InvalidPublisherId(InvalidInput):
    """A publisher id (or a secret name derived from one) outside the allowed pattern."""

    def __init__(self, message: str, *, field: str | None = "publisherId", **context: object) -> None:
        super().__init__(message, field=field, **context)


class InvalidSecretName(InvalidInput):
    """A secret name outside the rule every secret store shares (Key Vault's)."""


class InvalidFilter(InvalidInput):
    """A dead-letter selection (queue, reason, limit …) that cannot be used; ``field`` names it."""


class LockLost(LeadWriterError):
    """Settlement failed because the lock expired or the message was settled already."""


class BrokerClosed(LeadWriterError):
    """The embedded broker was closed while a caller still used it."""


class ConfigurationError(LeadWriterError):
    """A setting is missing or invalid; the message names the variable."""
