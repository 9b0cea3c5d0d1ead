"""The simulator's directory: orgs, their principals and leads, issued tokens and request counters.

Everything here is guarded by locks: the listeners' handler threads read and write it concurrently
with the test (or admin API) that drives the simulator.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.simulator.faults import Faults
from shared.simulator.limits import ExecutionModel, ServiceProtection

SOLUTION_UNIQUE_NAME = "MicrosoftMarketplacesLeadIntegrationSolution"
#: The default option-set values of ``lead.leadsourcecode`` (Advertisement … Other).
DEFAULT_LEAD_SOURCE_CODES: frozenset[int] = frozenset(range(1, 11))
#: Public client ids the token endpoint accepts for the password grant without registration:
#: Microsoft's Dynamics sample app id (architecture §4) and the Azure CLI's (azure-identity's default).
PUBLIC_CLIENT_IDS: frozenset[str] = frozenset(
    {"51f81489-12ee-4a9e-aaae-a2591f45987d", "04b07795-8ddb-461a-bbee-02f9e1bf7b46"}
)

PrincipalKind = Literal["user", "app"]


@dataclass(frozen=True)
class RequestLog:
    """Snapshot of the CRM request counters of one org.

    ``lead_writes`` counts lead-write HTTP requests (a $batch counts under ``batches``, its parts
    under ``batch_operations``).
    """

    total: int
    whoami: int
    solutions: int
    lead_writes: int
    batches: int
    batch_operations: int
    throttled: int
    during_penalty: int
    max_in_flight: int
    #: CreateMultiple requests (not counted under ``lead_writes``) and the targets they carried.
    create_multiple: int = 0
    create_multiple_targets: int = 0
    #: Server execution time charged to the execution-time limit, seconds (all principals).
    execution_seconds: float = 0.0


class Counters:
    """Mutable counters behind :class:`RequestLog`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._execution = 0.0

    def charge(self, seconds: float) -> None:
        with self._lock:
            self._execution += seconds

    def arrive(self, kind: str) -> None:
        with self._lock:
            self._counts["total"] += 1
            if kind:
                self._counts[kind] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> RequestLog:
        with self._lock:
            c = self._counts
            return RequestLog(
                total=c["total"],
                whoami=c["whoami"],
                solutions=c["solutions"],
                lead_writes=c["lead_writes"],
                batches=c["batches"],
                batch_operations=c["batch_operations"],
                throttled=c["throttled"],
                during_penalty=c["during_penalty"],
                max_in_flight=self._max_in_flight,
                create_multiple=c["create_multiple"],
                create_multiple_targets=c["create_multiple_targets"],
                execution_seconds=self._execution,
            )


@dataclass(eq=False)
class Principal:
    """A user (ROPC) or an application user (client credentials) of one org."""

    kind: PrincipalKind
    name: str
    secret: str = field(repr=False)
    object_id: str
    system_user_id: str
    has_role: bool = True
    mfa_required: bool = False
    disabled: bool = False

    @property
    def key(self) -> str:
        return principal_key(self.kind, self.name)


def principal_key(kind: PrincipalKind, name: str) -> str:
    return f"{kind}:{name.strip().lower()}"


#: Privileges of the Lead Writer security role (architecture §1): create/read/write lead, read solution, and on
#: Dynamics 365 8.2 and later (every org the v9.2 Web API serves) create/read/write User Entity UI Settings.
ROLE_PRIVILEGES: tuple[str, ...] = (
    "prvCreateLead",
    "prvReadLead",
    "prvWriteLead",
    "prvReadSolution",
    "prvCreateUserEntityUISettings",
    "prvReadUserEntityUISettings",
    "prvWriteUserEntityUISettings",
)


@dataclass
class CrmRecords:
    """The records of one org beyond leads that mappings refer to (shared/simulator/metadata.py serves
    them): custom ``lead`` columns, campaigns, extra system users, teams, contacts and accounts."""

    #: Custom lead columns: logical name → (AttributeType, MaxLength or None), e.g. ("String", 100).
    columns: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    campaigns: dict[str, str] = field(default_factory=dict)  # id → name
    system_users: dict[str, str] = field(default_factory=dict)  # id → full name (besides the principals)
    teams: dict[str, str] = field(default_factory=dict)  # id → name
    contacts: dict[str, str] = field(default_factory=dict)  # id → emailaddress1
    accounts: dict[str, str] = field(default_factory=dict)  # id → emailaddress1


@dataclass(eq=False)
class OrgState:
    """One simulated Dataverse org."""

    name: str
    tenant_id: str
    url: str
    limits: ServiceProtection
    latency: float = 0.0
    solution_version: str | None = "1.0.0.0"
    solution_name: str = SOLUTION_UNIQUE_NAME
    lead_source_codes: frozenset[int] = DEFAULT_LEAD_SOURCE_CODES
    organization_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    business_unit_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    solution_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    faults: Faults = field(default_factory=Faults)
    counters: Counters = field(default_factory=Counters)
    principals: dict[str, Principal] = field(default_factory=dict)
    # Leads in write order (an update keeps the record's place). A change set replaces the whole
    # dict on rollback, so readers must always go through the attribute, never keep a reference.
    leads: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: Privileges taken out of this org's Lead Writer role (a customised or damaged role).
    missing_privileges: set[str] = field(default_factory=set)
    records: CrmRecords = field(default_factory=CrmRecords)
    #: Server execution time per record and per request (charged to the execution-time limit).
    execution: ExecutionModel = field(default_factory=ExecutionModel)
    #: The ``x-ms-dop-hint`` every response carries (the recommended parallelism); None: not sent.
    dop_hint: int | None = None

    def grants(self, principal: Principal, privilege: str) -> bool:
        """Whether ``principal`` holds ``privilege`` through the Lead Writer role of this org."""
        with self.lock:
            return principal.has_role and privilege in ROLE_PRIVILEGES and privilege not in self.missing_privileges


@dataclass(frozen=True)
class TokenInfo:
    org: str
    principal: str
    expires_at: float


class Directory:
    """All orgs of one simulator, and the tokens its authority issued."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.orgs: dict[str, OrgState] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._token_requests: Counter[str] = Counter()
        self._token_requests_total = 0

    def org(self, name: str) -> OrgState:
        """The org called ``name``. Raises KeyError when there is none."""
        with self.lock:
            try:
                return self.orgs[name]
            except KeyError:
                raise KeyError(f"no simulated org named {name!r}") from None

    def orgs_in_tenant(self, tenant_id: str) -> list[OrgState]:
        with self.lock:
            return [org for org in self.orgs.values() if org.tenant_id.lower() == tenant_id.lower()]

    def org_by_url(self, url: str) -> OrgState | None:
        wanted = url.rstrip("/").lower()
        with self.lock:
            return next((org for org in self.orgs.values() if org.url.lower() == wanted), None)

    def count_token_request(self, tenant_id: str | None) -> None:
        with self.lock:
            self._token_requests_total += 1
            if tenant_id:
                self._token_requests[tenant_id.lower()] += 1

    def token_requests(self, tenant_id: str | None) -> int:
        with self.lock:
            if tenant_id is None:
                return self._token_requests_total
            return self._token_requests[tenant_id.lower()]

    def remember_token(self, token: str, org: str, principal: str, expires_at: float) -> None:
        """Remember an access token's audience (org), principal and expiry (epoch seconds)."""
        with self.lock:
            self._tokens[token] = TokenInfo(org, principal, expires_at)

    def resolve_token(self, token_id: str) -> TokenInfo | None:
        """The live token with this id, or None when unknown or expired."""
        with self.lock:
            info = self._tokens.get(token_id)
            if info is None:
                return None
            if info.expires_at <= time.time():
                del self._tokens[token_id]
                return None
            return info

    def expire_tokens(self, org: str | None = None) -> int:
        """Expire every token (of one org's audience, or all). Returns how many were expired."""
        with self.lock:
            doomed = [t for t, info in self._tokens.items() if org is None or info.org == org]
            for token_id in doomed:
                del self._tokens[token_id]
            return len(doomed)
