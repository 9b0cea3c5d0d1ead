"""The simulator's JSON configuration: orgs with their limits, users and apps.

``{"orgs": [{"name": "contoso", "tenantId": "…", "solutionVersion": "1.2.0.0", "latency": 0.05,
"limits": {"requestsPerWindow": 6000, "windowSeconds": 300, "executionSecondsPerWindow": 1200,
"maxConcurrent": 52}, "execution": {"createMs": 10, "batchPartMs": 4, "createMultipleTargetMs": 1,
"requestMs": 0}, "dopHint": 8, "leadSourceCodes": [1, 2, 8, 10], "users": [{"username": "…", "password": "…",
"hasRole": true, "mfaRequired": false, "disabled": false}], "apps": [{"clientId": "…",
"clientSecret": "…", "hasRole": true}], "missingPrivileges": ["prvReadUserEntityUISettings"]}]}``

``missingPrivileges`` takes single privileges out of the org's Lead Writer role.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.simulator.limits import ExecutionModel, Limits


class SimulatorConfigError(ValueError):
    """The configuration is not valid; the message names the offending field."""


@dataclass(frozen=True)
class UserSpec:
    username: str
    password: str = field(repr=False)
    has_role: bool = True
    mfa_required: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class AppSpec:
    client_id: str
    client_secret: str = field(repr=False)
    has_role: bool = True


@dataclass(frozen=True)
class OrgSpec:
    name: str
    tenant_id: str | None = None
    solution_version: str | None = "1.0.0.0"
    latency: float = 0.0
    limits: Limits = field(default_factory=Limits)
    lead_source_codes: tuple[int, ...] | None = None
    users: tuple[UserSpec, ...] = ()
    apps: tuple[AppSpec, ...] = ()
    #: Privileges taken out of the org's Lead Writer role, e.g. ``["prvReadUserEntityUISettings"]``.
    missing_privileges: tuple[str, ...] = ()
    #: Server execution time per record (ms) of each kind of write, and per request.
    execution: ExecutionModel = field(default_factory=ExecutionModel)
    #: The ``x-ms-dop-hint`` the org's responses carry; None: not sent.
    dop_hint: int | None = None


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in data or (data[key] is None and default is None):
        return default
    value = data[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise SimulatorConfigError(f"{where}.{key} must be a number")
    if not isinstance(value, kind):
        raise SimulatorConfigError(f"{where}.{key} has the wrong type")
    return value


def _required(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise SimulatorConfigError(f"{where}.{key} is required (a non-empty string)")
    return value


def parse_org(data: Any, where: str = "org") -> OrgSpec:
    """Parse one org object. Raises SimulatorConfigError naming the bad field."""
    if not isinstance(data, Mapping):
        raise SimulatorConfigError(f"{where} must be an object")
    limits_data = _get(data, "limits", Mapping, where, {})
    number = (int, float)
    defaults = Limits()
    try:
        limits = Limits(
            requests_per_window=int(
                _get(limits_data, "requestsPerWindow", int, f"{where}.limits", defaults.requests_per_window)
            ),
            window_seconds=float(
                _get(limits_data, "windowSeconds", number, f"{where}.limits", defaults.window_seconds)
            ),
            execution_seconds_per_window=float(
                _get(
                    limits_data,
                    "executionSecondsPerWindow",
                    number,
                    f"{where}.limits",
                    defaults.execution_seconds_per_window,
                )
            ),
            max_concurrent=int(
                _get(limits_data, "maxConcurrent", int, f"{where}.limits", defaults.max_concurrent)
            ),
        )
    except ValueError as exc:
        if isinstance(exc, SimulatorConfigError):
            raise
        raise SimulatorConfigError(f"{where}.limits: {exc}") from None
    execution_data = _get(data, "execution", Mapping, where, {})
    at = f"{where}.execution"
    try:
        execution = ExecutionModel(
            create_ms=float(_get(execution_data, "createMs", number, at, 0.0)),
            batch_part_ms=float(_get(execution_data, "batchPartMs", number, at, 0.0)),
            create_multiple_ms=float(_get(execution_data, "createMultipleTargetMs", number, at, 0.0)),
            request_ms=float(_get(execution_data, "requestMs", number, at, 0.0)),
        )
    except ValueError as exc:
        if isinstance(exc, SimulatorConfigError):
            raise
        raise SimulatorConfigError(f"{at}: {exc}") from None
    dop_hint = _get(data, "dopHint", int, where, None)
    if dop_hint is not None and dop_hint < 1:
        raise SimulatorConfigError(f"{where}.dopHint must be a positive integer")
    users = []
    for i, user in enumerate(_get(data, "users", list, where, [])):
        at = f"{where}.users[{i}]"
        if not isinstance(user, Mapping):
            raise SimulatorConfigError(f"{at} must be an object")
        users.append(
            UserSpec(
                username=_required(user, "username", at),
                password=_required(user, "password", at),
                has_role=_get(user, "hasRole", bool, at, True),
                mfa_required=_get(user, "mfaRequired", bool, at, False),
                disabled=_get(user, "disabled", bool, at, False),
            )
        )
    apps = []
    for i, app in enumerate(_get(data, "apps", list, where, [])):
        at = f"{where}.apps[{i}]"
        if not isinstance(app, Mapping):
            raise SimulatorConfigError(f"{at} must be an object")
        apps.append(
            AppSpec(
                client_id=_required(app, "clientId", at),
                client_secret=_required(app, "clientSecret", at),
                has_role=_get(app, "hasRole", bool, at, True),
            )
        )
    codes = _get(data, "leadSourceCodes", list, where, None)
    if codes is not None and not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise SimulatorConfigError(f"{where}.leadSourceCodes must be a list of integers")
    missing = _get(data, "missingPrivileges", list, where, [])
    if not all(isinstance(name, str) and name for name in missing):
        raise SimulatorConfigError(f"{where}.missingPrivileges must be a list of privilege names")
    latency = float(_get(data, "latency", number, where, 0.0))
    if latency < 0:
        raise SimulatorConfigError(f"{where}.latency must not be negative")
    solution = data.get("solutionVersion", "1.0.0.0")
    if solution is not None and not isinstance(solution, str):
        raise SimulatorConfigError(f"{where}.solutionVersion must be a string or null")
    return OrgSpec(
        name=_required(data, "name", where),
        tenant_id=_get(data, "tenantId", str, where, None),
        solution_version=solution,
        latency=latency,
        limits=limits,
        lead_source_codes=tuple(codes) if codes is not None else None,
        users=tuple(users),
        apps=tuple(apps),
        missing_privileges=tuple(missing),
        execution=execution,
        dop_hint=dop_hint,
    )


def load_config(source: Path | str | Mapping[str, Any]) -> list[OrgSpec]:
    """Read a configuration from a JSON file path or an already-parsed mapping.

    Raises SimulatorConfigError when it is invalid, OSError when the file cannot be read.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SimulatorConfigError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise SimulatorConfigError("the configuration must be a JSON object")
    orgs = data.get("orgs", [])
    if not isinstance(orgs, list):
        raise SimulatorConfigError("orgs must be a list")
    return [parse_org(org, f"orgs[{i}]") for i, org in enumerate(orgs)]
