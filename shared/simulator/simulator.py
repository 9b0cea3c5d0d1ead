"""CrmSimulator: the Entra authority listener plus one Dataverse listener per org, over HTTPS."""

from __future__ import annotations

import logging
import re
import ssl
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.simulator.admin import AdminApi
from shared.simulator.authority import TOKEN_LIFETIME, AuthorityApp
from shared.simulator.certs import ensure_certificates
from shared.simulator.config import OrgSpec, load_config
from shared.simulator.dataverse import DataverseApp
from shared.simulator.faults import Faults
from shared.simulator.limits import ExecutionModel, Limits, ServiceProtection
from shared.simulator.server import Listener, server_context
from shared.simulator.state import (
    DEFAULT_LEAD_SOURCE_CODES,
    ROLE_PRIVILEGES,
    SOLUTION_UNIQUE_NAME,
    Directory,
    OrgState,
    Principal,
    PrincipalKind,
    RequestLog,
    principal_key,
)

logger = logging.getLogger(__name__)

_ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SimOrg:
    """A simulated org: its name, Entra tenant and CRM URL (``https://<host>:<port>``, no path)."""

    name: str
    tenant_id: str
    url: str


def _netloc(host: str, port: int, default: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


class CrmSimulator:
    """The local stand-in for Dynamics 365 / Dataverse and Entra ID (architecture §9).

    One HTTPS listener for the authority on ``host:authority_port`` (which also serves the admin API
    under ``/_simulator/``) and one per org on an ephemeral port. Orgs may be added before or after
    :meth:`start`. Thread-safe.
    """

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.2", authority_port: int = 443) -> None:
        # Absolute, so the CA path it prints (REQUESTS_CA_BUNDLE=...) works from any directory.
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._authority_port = authority_port
        self._directory = Directory()
        self._stopping = threading.Event()
        self._org_listeners: dict[str, Listener] = {}
        self._authority: Listener | None = None
        self._context: ssl.SSLContext | None = None
        self._lock = threading.RLock()
        self._stopped = False
        self.ca_path: Path = self.data_dir / "simulator" / "ca.pem"
        #: Lifetime (seconds) of the access tokens issued from now on.
        self.token_lifetime: float = TOKEN_LIFETIME

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        source: Path | str | Mapping[str, Any],
        data_dir: Path,
        *,
        host: str = "127.0.0.2",
        authority_port: int = 443,
    ) -> CrmSimulator:
        """A simulator (not yet started) with the orgs, users and apps of a JSON config.

        Raises SimulatorConfigError for an invalid config, OSError when a listener cannot bind.
        """
        specs = load_config(source)
        simulator = cls(data_dir, host=host, authority_port=authority_port)
        try:
            for spec in specs:
                simulator.add_org_spec(spec)
        except BaseException:
            simulator.stop()
            raise
        return simulator

    def add_org_spec(self, spec: OrgSpec) -> SimOrg:
        """Add an org with its users and apps from a parsed config entry (config file or admin API)."""
        org = self.add_org(
            spec.name,
            tenant_id=spec.tenant_id,
            solution_version=spec.solution_version,
            requests_per_window=spec.limits.requests_per_window,
            window_seconds=spec.limits.window_seconds,
            execution_seconds_per_window=spec.limits.execution_seconds_per_window,
            max_concurrent=spec.limits.max_concurrent,
            latency=spec.latency,
            lead_source_codes=spec.lead_source_codes,
            execution=spec.execution,
            dop_hint=spec.dop_hint,
        )
        for user in spec.users:
            self.add_user(
                spec.name,
                user.username,
                user.password,
                has_role=user.has_role,
                mfa_required=user.mfa_required,
                disabled=user.disabled,
            )
        for app in spec.apps:
            self.add_app(spec.name, app.client_id, app.client_secret, has_role=app.has_role)
        if spec.missing_privileges:
            self.set_missing_privileges(spec.name, spec.missing_privileges)
        return org

    def start(self) -> CrmSimulator:
        """Generate certificates and start serving. Idempotent.

        Raises OSError when the authority address cannot be bound (e.g. port 443 taken or not
        permitted), RuntimeError after :meth:`stop`.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("a stopped simulator cannot be started again")
            if self._authority is not None:
                return self
            paths = ensure_certificates(self.data_dir / "simulator", self.host)
            self.ca_path = paths.ca_cert
            context = server_context(str(paths.server_cert), str(paths.server_key))
            admin = AdminApi(self)
            app = AuthorityApp(
                self._directory,
                lambda: self.authority_host,
                admin,
                token_lifetime=lambda: self.token_lifetime,
            )
            authority = Listener(self.host, self._authority_port, "sim-authority", app, self._stopping)
            authority.start(context)
            self._authority = authority
            self._context = context
            for listener in self._org_listeners.values():
                listener.start(context)
            logger.info("CRM simulator started: authority %s, CA %s", self.authority_host, self.ca_path)
            return self

    def stop(self) -> None:
        """Stop every listener and drop open connections. Safe to call more than once."""
        with self._lock:
            self._stopped = True
            self._stopping.set()
            listeners = list(self._org_listeners.values())
            if self._authority is not None:
                listeners.append(self._authority)
        # In parallel: each listener's accept loop takes up to a poll interval to notice the stop.
        stoppers = [threading.Thread(target=listener.stop, daemon=True) for listener in listeners]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(timeout=10)

    def __enter__(self) -> CrmSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def authority_host(self) -> str:
        """The ``AZURE_AUTHORITY_HOST`` value: ``https://<host>`` (``:port`` only when not 443)."""
        port = self._authority.port if self._authority is not None else self._authority_port
        return f"https://{_netloc(self.host, port, 443)}"

    # --- orgs and principals --------------------------------------------------------------------

    def add_org(
        self,
        name: str,
        *,
        tenant_id: str | None = None,
        solution_version: str | None = "1.0.0.0",
        requests_per_window: int = 6000,
        window_seconds: float = 300.0,
        execution_seconds_per_window: float = 1200.0,
        max_concurrent: int = 52,
        latency: float = 0.0,
        lead_source_codes: Iterable[int] | None = None,
        solution_name: str = SOLUTION_UNIQUE_NAME,
        execution: ExecutionModel | None = None,
        dop_hint: int | None = None,
    ) -> SimOrg:
        """Create an org with its own HTTPS listener. ``execution`` models the server execution time
        per record of each kind of write; ``dop_hint`` is the ``x-ms-dop-hint`` its responses carry.

        Raises ValueError for a bad or duplicate name or bad limits, OSError when it cannot bind.
        """
        if not _ORG_NAME.match(name):
            raise ValueError(f"org names are 1-64 letters, digits, '.', '_' or '-': {name!r}")
        if latency < 0:
            raise ValueError("latency must not be negative")
        limits = Limits(requests_per_window, window_seconds, execution_seconds_per_window, max_concurrent)
        tenant = str(uuid.UUID(tenant_id)) if tenant_id else str(uuid.uuid4())
        with self._lock:
            if self._stopped:
                raise RuntimeError("the simulator is stopped")
            if name in self._directory.orgs:
                raise ValueError(f"an org named {name!r} already exists")
            org = OrgState(
                name=name,
                tenant_id=tenant,
                url="",
                limits=ServiceProtection(limits),
                latency=float(latency),
                solution_version=solution_version,
                solution_name=solution_name,
                lead_source_codes=(
                    frozenset(lead_source_codes)
                    if lead_source_codes is not None
                    else DEFAULT_LEAD_SOURCE_CODES
                ),
                execution=execution or ExecutionModel(),
                dop_hint=dop_hint,
            )
            app = DataverseApp(org, self._directory, self._stopping)
            listener = Listener(self.host, 0, f"sim-org-{name}", app, self._stopping)
            org.url = f"https://{_netloc(self.host, listener.port, None)}"
            with self._directory.lock:
                self._directory.orgs[name] = org
            self._org_listeners[name] = listener
            if self._context is not None:
                listener.start(self._context)
        logger.info("simulated org %s at %s (tenant %s)", name, org.url, tenant)
        return self._public(org)

    @staticmethod
    def _public(org: OrgState) -> SimOrg:
        return SimOrg(name=org.name, tenant_id=org.tenant_id, url=org.url)

    def org(self, name: str) -> SimOrg:
        """The org called ``name``. Raises KeyError when there is none."""
        return self._public(self._directory.org(name))

    def orgs(self) -> list[SimOrg]:
        with self._directory.lock:
            return [self._public(org) for org in self._directory.orgs.values()]

    def _add_principal(
        self, org_name: str, kind: PrincipalKind, name: str, secret: str, **flags: bool
    ) -> None:
        if not name.strip() or not secret:
            raise ValueError("a principal needs a name and a secret")
        org = self._directory.org(org_name)
        key = principal_key(kind, name)
        # The same Entra user or app in several orgs of one tenant keeps one object id.
        object_id = next(
            (
                o.principals[key].object_id
                for o in self._directory.orgs_in_tenant(org.tenant_id)
                if key in o.principals
            ),
            str(uuid.uuid4()),
        )
        principal = Principal(
            kind=kind,
            name=name.strip(),
            secret=secret,
            object_id=object_id,
            system_user_id=str(uuid.uuid4()),
            **flags,
        )
        with org.lock:
            org.principals[key] = principal

    def add_user(
        self,
        org: str,
        username: str,
        password: str,
        *,
        has_role: bool = True,
        mfa_required: bool = False,
        disabled: bool = False,
    ) -> None:
        """Add (or replace) a user of ``org``'s tenant who is a member of ``org``.

        Raises KeyError for an unknown org, ValueError for an empty name or password.
        """
        self._add_principal(
            org, "user", username, password, has_role=has_role, mfa_required=mfa_required, disabled=disabled
        )

    def add_app(self, org: str, client_id: str, client_secret: str, *, has_role: bool = True) -> None:
        """Add (or replace) an app registration of ``org``'s tenant, an application user of ``org``.

        Raises KeyError for an unknown org, ValueError for an empty id or secret.
        """
        self._add_principal(org, "app", client_id, client_secret, has_role=has_role)

    def _principal(self, org: str, principal: str) -> Principal:
        state = self._directory.org(org)
        with state.lock:
            kinds: tuple[PrincipalKind, ...] = ("user", "app")
            for kind in kinds:
                found = state.principals.get(principal_key(kind, principal))
                if found is not None:
                    return found
        raise KeyError(f"no user or app {principal!r} in org {org!r}")

    def set_role(self, org: str, principal: str, has_role: bool) -> None:
        """Assign or remove the Lead Writer role of a user (by user name) or app (by client id).

        Raises KeyError when the org or principal is unknown.
        """
        target = self._principal(org, principal)
        with self._directory.org(org).lock:
            target.has_role = has_role

    def set_user_flags(
        self, org: str, username: str, *, mfa_required: bool | None = None, disabled: bool | None = None
    ) -> None:
        """Change a user's MFA requirement or disabled state. Raises KeyError when unknown."""
        target = self._principal(org, username)
        with self._directory.org(org).lock:
            if mfa_required is not None:
                target.mfa_required = mfa_required
            if disabled is not None:
                target.disabled = disabled

    def set_solution(self, org: str, version: str | None) -> None:
        """Install the Lead Writer solution at ``version``, or uninstall it with None."""
        state = self._directory.org(org)
        with state.lock:
            state.solution_version = version

    def set_execution(self, org: str, model: ExecutionModel, *, dop_hint: int | None = None) -> None:
        """Set the org's server execution time per record (and the ``x-ms-dop-hint`` it sends)."""
        state = self._directory.org(org)
        with state.lock:
            state.execution = model
            state.dop_hint = dop_hint

    def set_missing_privileges(self, org: str, privileges: Iterable[str]) -> None:
        """Take ``privileges`` out of the org's Lead Writer role (and give back every other one), so its
        holders lack exactly those: RetrieveUserPrivileges no longer lists them and the calls that need
        them answer 403 naming them. Raises KeyError for an unknown org, ValueError for a privilege the
        role does not have (see ``ROLE_PRIVILEGES``)."""
        names = set(privileges)
        unknown = sorted(names - set(ROLE_PRIVILEGES))
        if unknown:
            raise ValueError(f"not privileges of the Lead Writer role: {', '.join(unknown)}")
        state = self._directory.org(org)
        with state.lock:
            state.missing_privileges = names

    # -- records a mapping refers to (shared/simulator/metadata.py serves them) ---------------------

    def add_column(self, org: str, name: str, kind: str = "String", max_length: int | None = 100) -> None:
        """Add a custom ``lead`` column (``AttributeType`` ``kind``: String, Memo, Integer, Picklist,
        Boolean, Double). Raises KeyError for an unknown org, ValueError for a bad name or kind."""
        if not re.fullmatch(r"[a-z][a-z0-9]*_[a-z0-9_]+", name):
            raise ValueError(f"a custom column is <prefix>_<name> in lower case: {name!r}")
        if kind not in ("String", "Memo", "Integer", "Picklist", "Boolean", "Double"):
            raise ValueError(f"unsupported column type {kind!r}")
        state = self._directory.org(org)
        with state.lock:
            state.records.columns[name] = (kind, max_length if kind in ("String", "Memo") else None)

    def remove_column(self, org: str, name: str) -> None:
        """Delete a custom column (a later write naming it is refused). Raises KeyError when unknown."""
        state = self._directory.org(org)
        with state.lock:
            del state.records.columns[name]

    def _add_record(self, org: str, table: str, value: str) -> str:
        state = self._directory.org(org)
        record_id = str(uuid.uuid4())
        with state.lock:
            records: dict[str, str] = getattr(state.records, table)
            records[record_id] = value
        return record_id

    def add_campaign(self, org: str, name: str = "Marketplace campaign") -> str:
        """Create a campaign; its id. Raises KeyError for an unknown org."""
        return self._add_record(org, "campaigns", name)

    def add_system_user(self, org: str, name: str = "Sales person") -> str:
        """Create a system user that cannot sign in (an owner for leads); its id."""
        return self._add_record(org, "system_users", name)

    def add_team(self, org: str, name: str = "Sales team") -> str:
        """Create a team; its id."""
        return self._add_record(org, "teams", name)

    def add_contact(self, org: str, email: str) -> str:
        """Create a contact with ``emailaddress1``; its id."""
        return self._add_record(org, "contacts", email)

    def add_account(self, org: str, email: str) -> str:
        """Create an account with ``emailaddress1``; its id."""
        return self._add_record(org, "accounts", email)

    def system_user_id(self, org: str, principal: str) -> str:
        """The system user id of a user (by user name) or app (by client id). Raises KeyError."""
        return self._principal(org, principal).system_user_id

    def faults(self, org: str) -> Faults:
        """The fault settings of ``org``. Raises KeyError when unknown."""
        return self._directory.org(org).faults

    def leads(self, org: str) -> list[dict[str, Any]]:
        """Copies of the lead records of ``org`` (each with ``leadid``), in write order."""
        state = self._directory.org(org)
        with state.lock:
            return [dict(record) for record in state.leads.values()]

    def lead_count(self, org: str) -> int:
        """How many lead records ``org`` holds (without copying them)."""
        state = self._directory.org(org)
        with state.lock:
            return len(state.leads)

    def requests(self, org: str) -> RequestLog:
        """A snapshot of ``org``'s CRM request counters."""
        return self._directory.org(org).counters.snapshot()

    def token_requests(self, org: str | None = None) -> int:
        """Token endpoint POSTs, for ``org``'s tenant (shared by the orgs of that tenant) or in all."""
        tenant = self._directory.org(org).tenant_id if org is not None else None
        return self._directory.token_requests(tenant)

    def expire_tokens(self, org: str | None = None) -> int:
        """Make every issued token (for ``org``, or all) invalid at once. Returns how many."""
        if org is not None:
            self._directory.org(org)
        return self._directory.expire_tokens(org)

    def describe(self, org: str) -> dict[str, Any]:
        """The org as JSON for the admin API: no passwords or secrets."""
        state = self._directory.org(org)
        with state.lock:
            users = [
                {
                    "username": p.name,
                    "hasRole": p.has_role,
                    "mfaRequired": p.mfa_required,
                    "disabled": p.disabled,
                    "systemUserId": p.system_user_id,
                }
                for p in state.principals.values()
                if p.kind == "user"
            ]
            apps = [
                {"clientId": p.name, "hasRole": p.has_role, "systemUserId": p.system_user_id}
                for p in state.principals.values()
                if p.kind == "app"
            ]
            return {
                "name": state.name,
                "tenantId": state.tenant_id,
                "url": state.url,
                "solutionName": state.solution_name,
                "solutionVersion": state.solution_version,
                "latency": state.latency,
                "limits": {
                    "requestsPerWindow": state.limits.limits.requests_per_window,
                    "windowSeconds": state.limits.limits.window_seconds,
                    "executionSecondsPerWindow": state.limits.limits.execution_seconds_per_window,
                    "maxConcurrent": state.limits.limits.max_concurrent,
                },
                "execution": {
                    "createMs": state.execution.create_ms,
                    "batchPartMs": state.execution.batch_part_ms,
                    "createMultipleTargetMs": state.execution.create_multiple_ms,
                    "requestMs": state.execution.request_ms,
                },
                "dopHint": state.dop_hint,
                "leadSourceCodes": sorted(state.lead_source_codes),
                "missingPrivileges": sorted(state.missing_privileges),
                "users": users,
                "apps": apps,
                "leads": len(state.leads),
            }
