"""Live verification of a publisher's CRM connection (architecture §6 ``PUT …/connection``, ``…/connection/test``).

A connection is good when every step a lead will need passes, checked live against the CRM and
Entra ID, in the order a publisher fixes them:

1. ``token`` — Entra ID issues a token for the CRM (password or client secret accepted);
2. ``whoAmI`` — the CRM knows the principal (it is a user of this environment);
3. ``solution`` — the Lead Writer solution is installed, at the minimum version or later;
4. ``createLeads`` — the principal holds every privilege of the Lead Writer role (RetrieveUserPrivileges);
   a missing one is named in the message and in the report's ``missingPrivileges``.

Permanent failures become a failed :class:`~shared.crm.connection.Verification` carrying the architecture §5
reason and a message the publisher can act on; transient ones (authority or CRM unavailable,
throttled) are raised as :class:`~shared.errors.RetryLater`, because they say nothing about the
connection. Nothing here stores anything: the caller decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.crm import DataverseClient
from shared.crm.client import LEAD_WRITER_PRIVILEGES
from shared.crm.connection import Connection, PasswordAuth, Verification
from shared.crm.solution import require_supported
from shared.errors import (
    DeadLetter,
    DeadLetterReason,
    LeadWriterError,
    PermissionDenied,
)
from shared.http import new_session
from shared.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

Step = Literal["token", "whoAmI", "solution", "createLeads"]
StepState = Literal["passed", "failed", "skipped"]
STEPS: tuple[Step, ...] = ("token", "whoAmI", "solution", "createLeads")

@dataclass
class VerificationReport:
    """What a verification found: the stored :class:`Verification` plus the state of each step."""

    verification: Verification
    checks: dict[Step, StepState] = field(default_factory=lambda: dict.fromkeys(STEPS, "skipped"))
    #: The Lead Writer privileges the principal lacks, when a permission check found some.
    missing_privileges: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.verification.ok

    def to_json(self) -> dict[str, Any]:
        """camelCase JSON for API answers (no secrets: a Verification holds none)."""
        data = self.verification.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["checks"] = dict(self.checks)
        if self.missing_privileges:
            data["missingPrivileges"] = list(self.missing_privileges)
        return data


def _principal(connection: Connection) -> str:
    auth = connection.auth
    return "the user" if isinstance(auth, PasswordAuth) else "the application user"


def _failure_message(error: DeadLetter, connection: Connection) -> str:
    if isinstance(error, PermissionDenied):
        return (
            f"{_principal(connection)} lacks the Lead Writer role or is not a user of this environment: {error.message}"
        )
    return error.message


def verify_connection(
    pipeline: Pipeline,
    connection: Connection,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> VerificationReport:
    """Check ``connection`` live: token, WhoAmI, solution and version, permission to create leads.

    The token is always requested afresh (a cached one would not prove the credentials still work).
    Returns a report whose verification is ``ok`` or names the architecture §5 reason of the first failed
    step with an actionable message.

    Raises:
        UnsafeCrmUrl: the URL is not an allowed CRM host.
        RetryLater: (CrmUnavailable, CrmThrottled, AuthorityUnavailable) a transient failure: the
            connection could not be checked now.
    """
    settings = pipeline.settings
    # A client of its own, not the pipeline's cache: a connection that fails verification must not
    # leave a client (and its HTTP session) behind for every attempt.
    session = new_session(connection.url)
    try:
        client = DataverseClient(connection, settings, tokens=pipeline.tokens, pacer=pipeline.pacer, session=session)
        return _verify(pipeline, connection, client, now)
    finally:
        session.close()


def _verify(
    pipeline: Pipeline, connection: Connection, client: DataverseClient, now: Callable[[], datetime]
) -> VerificationReport:
    settings = pipeline.settings
    report = VerificationReport(Verification(ok=False, checked_at=now()))
    step: Step = "token"
    user_id: str | None = None
    version: str | None = None
    try:
        pipeline.tokens.invalidate(connection)
        pipeline.tokens.token(connection)
        report.checks["token"] = "passed"  # noqa: S105 - a step state, not a secret
        step = "whoAmI"
        user_id = client.whoami().user_id
        report.checks["whoAmI"] = "passed"
        step = "solution"
        version = client.solution_version(settings.solution_name)
        require_supported(version, settings)
        report.checks["solution"] = "passed"
        step = "createLeads"
        missing = client.missing_privileges(user_id)
        if missing is None or missing:
            report.missing_privileges = missing
            raise PermissionDenied(_privileges_message(connection, missing))
        report.checks["createLeads"] = "passed"
    except DeadLetter as error:
        report.checks[step] = "failed"
        # The failed credential must not linger in the token provider's cache.
        pipeline.tokens.invalidate(connection)
        reason = error.reason
        message = _failure_message(error, connection)
        if isinstance(error, PermissionDenied) and step == "createLeads":
            message = error.message
        elif isinstance(error, PermissionDenied) and step == "solution" and user_id is not None:
            # A 403 on the solution query: name the privileges that are missing, not only the CRM's text.
            report.missing_privileges = _missing_or_none(client, user_id)
            if report.missing_privileges:
                message = _privileges_message(connection, report.missing_privileges)
        logger.info("connection verification failed at %s: %s", step, reason)
        report.verification = Verification(
            ok=False,
            checked_at=now(),
            reason=str(reason),
            message=message,
            user_id=user_id,
            solution_version=version,
        )
        return report
    except ValueError:
        # can_create_leads refuses a WhoAmI user id that is not a GUID: the CRM is not a real Dataverse.
        # (An UnsafeCrmUrl is an InvalidInput, so a ValueError too: it was raised before this try.)
        report.checks[step] = "failed"
        report.verification = Verification(
            ok=False,
            checked_at=now(),
            reason=str(DeadLetterReason.PERMISSION_DENIED),
            message="the CRM answered WhoAmI with a user id that is not a GUID; check the instance URL",
        )
        return report
    report.verification = Verification(ok=True, checked_at=now(), user_id=user_id, solution_version=version)
    logger.info("connection verified: solution %s", version)
    return report


def _missing_or_none(client: DataverseClient, user_id: str) -> list[str] | None:
    """The missing Lead Writer privileges, or None when they cannot be read now (the caller reports a
    failure already; this question must not replace it with another)."""
    try:
        return client.missing_privileges(user_id)
    except (LeadWriterError, ValueError):
        return None


def _privileges_message(connection: Connection, missing: list[str] | None) -> str:
    """What to tell a publisher whose principal lacks privileges (``None``: they could not be read)."""
    who = _principal(connection)
    assign = "assign the Microsoft Marketplace Lead Writer security role to it in Dynamics (Settings → Security)"
    if missing is None:
        return f"{who}'s privileges could not be read (RetrieveUserPrivileges was refused): {assign}"
    if len(missing) == len(LEAD_WRITER_PRIVILEGES):
        return f"{who} lacks the Lead Writer role: {assign}"
    one = len(missing) == 1
    named = "; ".join(f"{name} ({LEAD_WRITER_PRIVILEGES.get(name, 'see the role')})" for name in missing)
    return (
        f"{who} lacks {'this privilege' if one else 'these privileges'} of the Lead Writer role: {named}. "
        f"Add {'it' if one else 'them'} to the Microsoft Marketplace Lead Writer security role in Dynamics "
        "(Settings → Security → Security Roles), or import the Lead Writer solution again to restore the role"
    )

