"""The simulated Entra ID authority: OpenID discovery, user realm, and the v2.0 token endpoint with
the password and client-credentials grants and Entra's real error bodies (AADSTS codes)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from shared.simulator.server import Request, Response, json_response
from shared.simulator.state import PUBLIC_CLIENT_IDS, Directory, OrgState, Principal, principal_key

logger = logging.getLogger(__name__)

#: Lifetime of issued access tokens, as Entra's ``expires_in``.
TOKEN_LIFETIME = 3599

_ERRORS: dict[int, tuple[int, str, str]] = {
    50126: (400, "invalid_grant", "Error validating credentials due to invalid username or password."),
    50076: (
        400,
        "invalid_grant",
        "Due to a configuration change made by your administrator, or because you moved to a new "
        "location, you must use multi-factor authentication to access '{resource}'.",
    ),
    50057: (
        400,
        "invalid_grant",
        "The user account is disabled. The account has been disabled by an administrator.",
    ),
    7000215: (
        401,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
        "value, not the client secret ID, for a secret added to app '{client_id}'.",
    ),
    700016: (
        400,
        "unauthorized_client",
        "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented "
        "to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
    ),
    90002: (
        400,
        "invalid_request",
        "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there "
        "are no active subscriptions for the tenant.",
    ),
    500011: (
        400,
        "invalid_resource",
        "The resource principal named {resource} was not found in the tenant named {tenant}. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented "
        "to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
    ),
    900144: (400, "invalid_request", "The request body must contain the following parameter: '{parameter}'."),
    70016: (
        400,
        "unsupported_grant_type",
        "The provided value for the input parameter 'grant_type' is not valid.",
    ),
    90033: (503, "temporarily_unavailable", "A transient error has occurred. Please try again."),
    90100: (500, "server_error", "An unexpected error occurred. Please try again."),
}


def entra_error(
    code: int, *, correlation_id: str | None = None, status: int | None = None, **fields: str
) -> Response:
    """An Entra token-endpoint error answer for AADSTS ``code`` (fields fill its message)."""
    default_status, error, text = _ERRORS[code]
    trace_id = str(uuid.uuid4())
    correlation = correlation_id or str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    message = text.format_map(_Missing(fields))
    description = (
        f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation}\r\n"
        f"Timestamp: {now.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}Z"
    )
    body = {
        "error": error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return json_response(status or default_status, body, _NO_STORE)


class _Missing(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


_NO_STORE = [("Cache-Control", "no-store, no-cache"), ("Pragma", "no-cache")]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwt(claims: dict[str, Any]) -> str:
    # Unsigned-looking but well-formed JWT: clients decode the claims, nobody can verify it.
    header = {"typ": "JWT", "alg": "RS256", "kid": "simulator"}
    return ".".join(
        [
            _b64url(json.dumps(header, separators=(",", ":")).encode()),
            _b64url(json.dumps(claims, separators=(",", ":")).encode()),
            _b64url(secrets.token_bytes(32)),
        ]
    )


class AuthorityApp:
    """The authority listener's application. ``admin`` serves ``/_simulator/`` paths."""

    def __init__(
        self,
        directory: Directory,
        authority_host: Callable[[], str],
        admin: Callable[[Request], Response] | None = None,
        *,
        token_lifetime: Callable[[], float] = lambda: TOKEN_LIFETIME,
    ) -> None:
        self._directory = directory
        self._authority_host = authority_host
        self._admin = admin
        self._token_lifetime = token_lifetime

    def __call__(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_simulator/") or path == "/_simulator":
            if self._admin is None:
                return json_response(404, {"error": "not_found"})
            return self._admin(request)
        parts = [p for p in path.split("/") if p]
        correlation = request.header("client-request-id") or None
        if request.method == "GET":
            if len(parts) >= 2 and parts[-2:] == [".well-known", "openid-configuration"]:
                return self._openid_configuration(parts[0], correlation)
            if parts[:3] == ["common", "discovery", "instance"]:
                return self._instance_discovery(request)
            if len(parts) == 3 and parts[:2] == ["common", "userrealm"]:
                return self._user_realm(parts[2])
        if request.method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self._token(parts[0], request, correlation)
        return json_response(404, {"error": "not_found", "error_description": f"no route for {path}"})

    # --- discovery -------------------------------------------------------------------------------

    def _known_tenant(self, tenant: str) -> bool:
        return bool(self._directory.orgs_in_tenant(tenant))

    def _openid_configuration(self, tenant: str, correlation: str | None) -> Response:
        if not self._known_tenant(tenant):
            return entra_error(90002, correlation_id=correlation, tenant=tenant)
        base = f"{self._authority_host()}/{tenant}"
        return json_response(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{self._authority_host()}/{tenant}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "aud",
                    "exp",
                    "iat",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "oid",
                ],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
        )

    def _instance_discovery(self, request: Request) -> Response:
        endpoint = request.query.get("authorization_endpoint", "")
        segments = [p for p in urlsplit(endpoint).path.split("/") if p]
        tenant = segments[0] if segments else "common"
        host = urlsplit(self._authority_host()).netloc
        return json_response(
            200,
            {
                "tenant_discovery_endpoint": (
                    f"{self._authority_host()}/{tenant}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            },
        )

    def _user_realm(self, username: str) -> Response:
        domain = username.rsplit("@", 1)[-1] if "@" in username else ""
        with self._directory.lock:
            orgs = list(self._directory.orgs.values())
        known = any(principal_key("user", username) in org.principals for org in orgs)
        return json_response(
            200,
            {
                "ver": "1.0",
                "account_type": "Managed" if known else "Unknown",
                "domain_name": domain,
                "cloud_instance_name": "microsoftonline.com",
                "cloud_audience_urn": "urn:federation:MicrosoftOnline",
            },
        )

    # --- token ------------------------------------------------------------------------------------

    def _token(self, tenant: str, request: Request, correlation: str | None) -> Response:
        orgs = self._directory.orgs_in_tenant(tenant)
        self._directory.count_token_request(orgs[0].tenant_id if orgs else None)
        if not orgs:
            return entra_error(90002, correlation_id=correlation, tenant=tenant)
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        resource = _resource(form.get("scope", ""))
        target = self._directory.org_by_url(resource) if resource else None
        # The org named by the scope answers for its tenant's faults first.
        for org in ([target] if target in orgs else []) + orgs:
            status = org.faults.take_token_failure() if org is not None else None
            if status is not None:
                code = 90033 if status == 503 else 90100
                return entra_error(code, correlation_id=correlation, status=status)

        grant = form.get("grant_type", "")
        client_id = form.get("client_id", "").strip()
        if not grant:
            return entra_error(900144, correlation_id=correlation, parameter="grant_type")
        if not client_id:
            return entra_error(900144, correlation_id=correlation, parameter="client_id")
        app = _find(orgs, target, principal_key("app", client_id))
        if grant == "client_credentials":
            if app is None:
                return entra_error(700016, correlation_id=correlation, client_id=client_id, tenant=tenant)
            if not secrets.compare_digest(form.get("client_secret", "").encode(), app.secret.encode()):
                return entra_error(7000215, correlation_id=correlation, client_id=client_id)
            principal = app
        elif grant == "password":
            if app is None and client_id.lower() not in PUBLIC_CLIENT_IDS:
                return entra_error(700016, correlation_id=correlation, client_id=client_id, tenant=tenant)
            user = _find(orgs, target, principal_key("user", form.get("username", "")))
            if user is None or not secrets.compare_digest(
                form.get("password", "").encode(), user.secret.encode()
            ):
                return entra_error(50126, correlation_id=correlation)
            if user.disabled:
                return entra_error(50057, correlation_id=correlation)
            if user.mfa_required:
                return entra_error(50076, correlation_id=correlation, resource=resource)
            principal = user
        else:
            return entra_error(70016, correlation_id=correlation)
        if target is None or target not in orgs:
            return entra_error(500011, correlation_id=correlation, resource=resource, tenant=tenant)
        return self._grant(target, principal, client_id, grant == "password", form.get("scope", ""))

    def _grant(
        self, org: OrgState, principal: Principal, client_id: str, with_id_token: bool, scope: str
    ) -> Response:
        now = int(time.time())
        lifetime = int(self._token_lifetime())
        issuer = f"{self._authority_host()}/{org.tenant_id}/v2.0"
        claims: dict[str, Any] = {
            "aud": org.url,
            "iss": f"https://sts.windows.net/{org.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": client_id,
            "oid": principal.object_id,
            "sub": principal.object_id,
            "tid": org.tenant_id,
            "ver": "1.0",
            "uti": secrets.token_urlsafe(16),
        }
        if principal.kind == "user":
            claims["upn"] = principal.name
            claims["scp"] = "user_impersonation"
        else:
            claims["roles"] = []
        access_token = _jwt(claims)
        self._directory.remember_token(access_token, org.name, principal.key, float(now + lifetime))
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": f"{org.url}/user_impersonation {org.url}/.default"
            if with_id_token
            else f"{org.url}/.default",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        }
        if with_id_token:
            body["id_token"] = _jwt(
                {
                    "aud": client_id,
                    "iss": issuer,
                    "iat": now,
                    "nbf": now,
                    "exp": now + lifetime,
                    "name": principal.name.split("@", 1)[0],
                    "oid": principal.object_id,
                    "preferred_username": principal.name,
                    "sub": _b64url(principal.object_id.encode())[:43],
                    "tid": org.tenant_id,
                    "ver": "2.0",
                }
            )
            body["client_info"] = _b64url(
                json.dumps({"uid": principal.object_id, "utid": org.tenant_id}).encode()
            )
        logger.debug("issued a token for org %s to %s", org.name, principal.key)
        return json_response(200, body, _NO_STORE)


def _resource(scope: str) -> str:
    for item in scope.split():
        if item.endswith("/.default"):
            return item[: -len("/.default")].rstrip("/")
    return ""


def _find(orgs: list[OrgState], preferred: OrgState | None, key: str) -> Principal | None:
    # The tenant's directory is the union of its orgs' principals; the scope's org wins on conflict.
    for org in ([preferred] if preferred in orgs and preferred is not None else []) + orgs:
        with org.lock:
            principal = org.principals.get(key)
        if principal is not None:
            return principal
    return None
