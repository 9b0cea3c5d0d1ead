"""The simulator's JSON admin API, served on the authority listener under ``/_simulator/``: lets a
separately started simulator be inspected and driven (by the demo, a test, or a human with curl).

    GET  /_simulator/orgs                          every org (no secrets)
    POST /_simulator/orgs                          add an org: a config-file org object (users, apps too)
    GET  /_simulator/orgs/{org}                    one org
    GET  /_simulator/orgs/{org}/leads              {"value": [lead, …]} in write order
    GET  /_simulator/orgs/{org}/leads/count        {"count": n}: how many leads are stored (cheap to poll)
    GET  /_simulator/orgs/{org}/requests           the RequestLog counters
    GET  /_simulator/orgs/{org}/faults             pending faults and added latency
    POST /_simulator/orgs/{org}/faults             {"latency": s, "fail_next": {"n", "status"},
                                                   "hang_next": {"n", "seconds"}, "reset_next": {"n"},
                                                   "hang_all": {"seconds"} (every request, until clear),
                                                   "throttle_next": {"n", "retry_after"},
                                                   "redirect_next": {"n", "location"},
                                                   "token_fail_next": {"n", "status"}, "clear": true}
    PUT  /_simulator/orgs/{org}/solution           {"version": "1.2.0.0" | null}
    PUT  /_simulator/orgs/{org}/roles/{principal}  {"hasRole": bool}
    PUT  /_simulator/orgs/{org}/privileges         {"missing": ["prvReadSolution", …]} (taken out of the role)
    POST /_simulator/orgs/{org}/users              {"username", "password", "hasRole", "mfaRequired",
                                                   "disabled"}
    POST /_simulator/orgs/{org}/apps               {"clientId", "clientSecret", "hasRole"}
    GET  /_simulator/token-requests[?org=]         {"count": n}
    POST /_simulator/expire-tokens[?org=]          {"expired": n}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.simulator.config import SimulatorConfigError, parse_org
from shared.simulator.server import Request, Response, json_response

if TYPE_CHECKING:
    from shared.simulator.simulator import CrmSimulator

logger = logging.getLogger(__name__)


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdminError(400, f"{key} must be a number")
    return float(value)


def _count(spec: Any, name: str) -> tuple[int, dict[str, Any]]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec, {}
    if not isinstance(spec, dict):
        raise AdminError(400, f"{name} must be an object with 'n' (or a count)")
    n = spec.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AdminError(400, f"{name}.n must be a non-negative integer")
    return n, spec


class AdminApi:
    """The ``/_simulator/`` routes of one simulator."""

    def __init__(self, simulator: CrmSimulator) -> None:
        self._sim = simulator

    def __call__(self, request: Request) -> Response:
        try:
            return self._route(request)
        except AdminError as exc:
            return json_response(exc.status, {"error": exc.message})
        except KeyError as exc:
            return json_response(404, {"error": str(exc.args[0]) if exc.args else "not found"})
        except (SimulatorConfigError, ValueError) as exc:
            return json_response(400, {"error": str(exc)})

    def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = request.json() if request.body.strip() else {}
        except ValueError:
            raise AdminError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise AdminError(400, "the body must be a JSON object")
        return body

    def _route(self, request: Request) -> Response:
        sim = self._sim
        parts = [p for p in request.path.split("/") if p][1:]
        method = request.method
        if parts == ["orgs"]:
            if method == "GET":
                return json_response(
                    200,
                    {
                        "authorityHost": sim.authority_host,
                        "caPath": str(sim.ca_path),
                        "orgs": [sim.describe(o.name) for o in sim.orgs()],
                    },
                )
            if method == "POST":
                return self._add_org(self._body(request))
        elif parts == ["token-requests"] and method == "GET":
            return json_response(200, {"count": sim.token_requests(request.query.get("org") or None)})
        elif parts == ["expire-tokens"] and method == "POST":
            return json_response(200, {"expired": sim.expire_tokens(request.query.get("org") or None)})
        elif len(parts) >= 2 and parts[0] == "orgs":
            return self._org_route(request, parts[1], parts[2:])
        raise AdminError(
            404 if method in ("GET", "POST", "PUT") else 405, f"no admin route {method} {request.path}"
        )

    def _add_org(self, body: dict[str, Any]) -> Response:
        spec = parse_org(body)
        sim = self._sim
        sim.add_org_spec(spec)
        return json_response(201, sim.describe(spec.name))

    def _org_route(self, request: Request, org: str, rest: list[str]) -> Response:
        sim = self._sim
        method = request.method
        sim.org(org)  # KeyError → 404 for an unknown org
        if not rest and method == "GET":
            return json_response(200, sim.describe(org))
        if rest == ["leads"] and method == "GET":
            return json_response(200, {"value": sim.leads(org)})
        if rest == ["leads", "count"] and method == "GET":
            return json_response(200, {"count": sim.lead_count(org)})
        if rest == ["requests"] and method == "GET":
            return json_response(200, dataclasses.asdict(sim.requests(org)))
        if rest == ["faults"]:
            if method == "POST":
                self._apply_faults(org, self._body(request))
            elif method != "GET":
                raise AdminError(405, "faults take GET or POST")
            faults = sim.faults(org)
            return json_response(200, {"latency": faults.latency, "pending": faults.pending()})
        if rest == ["solution"] and method == "PUT":
            body = self._body(request)
            version = body.get("version")
            if version is not None and not isinstance(version, str):
                raise AdminError(400, "version must be a string or null")
            sim.set_solution(org, version)
            return json_response(200, sim.describe(org))
        if len(rest) == 2 and rest[0] == "roles" and method == "PUT":
            has_role = self._body(request).get("hasRole")
            if not isinstance(has_role, bool):
                raise AdminError(400, "hasRole must be true or false")
            sim.set_role(org, rest[1], has_role)
            return json_response(200, sim.describe(org))
        if rest == ["privileges"] and method == "PUT":
            missing = self._body(request).get("missing")
            if not isinstance(missing, list) or not all(isinstance(name, str) for name in missing):
                raise AdminError(400, "missing must be a list of privilege names")
            try:
                sim.set_missing_privileges(org, missing)
            except ValueError as exc:
                raise AdminError(400, str(exc)) from None
            return json_response(200, sim.describe(org))
        if rest == ["users"] and method == "POST":
            body = self._body(request)
            spec = parse_org({"name": org, "users": [body]}).users[0]
            sim.add_user(
                org,
                spec.username,
                spec.password,
                has_role=spec.has_role,
                mfa_required=spec.mfa_required,
                disabled=spec.disabled,
            )
            return json_response(201, sim.describe(org))
        if rest == ["apps"] and method == "POST":
            body = self._body(request)
            app = parse_org({"name": org, "apps": [body]}).apps[0]
            sim.add_app(org, app.client_id, app.client_secret, has_role=app.has_role)
            return json_response(201, sim.describe(org))
        raise AdminError(404, f"no admin route {method} {request.path}")

    def _apply_faults(self, org: str, body: dict[str, Any]) -> None:
        faults = self._sim.faults(org)
        known = {
            "latency",
            "clear",
            "fail_next",
            "hang_next",
            "hang_all",
            "reset_next",
            "throttle_next",
            "redirect_next",
            "token_fail_next",
        }
        unknown = sorted(set(body) - known)
        if unknown:
            raise AdminError(400, f"unknown fault settings: {', '.join(unknown)}")
        # Validate everything before changing anything, so a bad body changes nothing.
        actions: list[Callable[[], None]] = []
        if body.get("clear"):
            actions.append(faults.clear)
        if "latency" in body:
            latency = _number(body, "latency")
            actions.append(lambda: setattr(faults, "latency", latency))
        for name in ("fail_next", "token_fail_next"):
            if name in body:
                n, spec = _count(body[name], name)
                status = int(_number(spec, "status", 503))
                if not 400 <= status <= 599:
                    raise AdminError(400, f"{name}.status must be 4xx or 5xx")
                method: Callable[[int, int], None] = getattr(faults, name)
                actions.append(functools.partial(method, n, status))
        if "hang_next" in body:
            n, spec = _count(body["hang_next"], "hang_next")
            seconds = _number(spec, "seconds")
            actions.append(functools.partial(faults.hang_next, n, seconds))
        if "hang_all" in body:
            spec = body["hang_all"]
            if not isinstance(spec, dict):
                raise AdminError(400, "hang_all must be an object")
            hang_seconds = _number(spec, "seconds")
            if hang_seconds < 0:
                raise AdminError(400, "hang_all.seconds must not be negative")
            actions.append(functools.partial(faults.hang_all, hang_seconds))
        if "reset_next" in body:
            n_reset, _ = _count(body["reset_next"], "reset_next")
            actions.append(functools.partial(faults.reset_next, n_reset))
        if "throttle_next" in body:
            n_throttle, spec = _count(body["throttle_next"], "throttle_next")
            retry_after = _number(spec, "retry_after", 5)
            if retry_after <= 0:
                raise AdminError(400, "throttle_next.retry_after must be positive")
            actions.append(functools.partial(faults.throttle_next, n_throttle, retry_after))
        if "redirect_next" in body:
            n_redirect, spec = _count(body["redirect_next"], "redirect_next")
            location = spec.get("location")
            if not isinstance(location, str) or not location:
                raise AdminError(400, "redirect_next.location is required")
            actions.append(functools.partial(faults.redirect_next, n_redirect, location))
        for action in actions:
            action()
        logger.info("admin API changed the faults of org %s", org)
