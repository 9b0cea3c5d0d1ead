"""A local Azure Key Vault (secrets) endpoint for tests: real HTTPS, the REST shapes the SDK uses.

It speaks enough of the Key Vault secrets API for ``azure-keyvault-secrets``' :class:`SecretClient` to
run unmodified against it over a real socket: the bearer challenge, set / get (latest or a version) /
update properties / soft delete / get deleted / purge / recover, and paged listing with ``nextLink``,
with Key Vault's JSON bodies and error shapes. Secret names are case-insensitive, as in Key Vault.

A deleted secret stays in the deleted state (soft delete), where its name cannot be reused: a set
answers 409 ``Conflict`` until it is purged or recovered. ``purge_protection`` makes purges answer 403,
as a vault with purge protection does. ``fail_next`` injects service errors.

Test only: it trusts a single static token, and keeps everything in memory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from azure.core.credentials import AccessToken
from azure.keyvault.secrets import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.secretstore.keyvault import KeyVaultSecretStore

__all__ = ["KeyVaultStub", "StaticTokenCredential", "TlsMaterial", "make_tls_material"]

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
STUB_TOKEN = "stub-keyvault-token"
#: Key Vault's limit on a secret value.
MAX_VALUE_BYTES = 25 * 1024
_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")


@dataclass(frozen=True)
class TlsMaterial:
    ca_path: Path
    cert_path: Path
    key_path: Path


def make_tls_material(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsMaterial:
    """A throwaway CA and a server certificate it signs for ``hosts``, written as PEM into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lead Writer test Key Vault CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    material = TlsMaterial(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    material.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    material.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    material.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return material


class StaticTokenCredential:
    """A TokenCredential that hands out one fixed token (a fake at our seam, not Entra's)."""

    def __init__(self, token: str = STUB_TOKEN) -> None:
        self._token = token
        self.requests: list[tuple[tuple[str, ...], str | None]] = []
        self._lock = threading.Lock()

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        with self._lock:
            self.requests.append((scopes, tenant_id))
        return AccessToken(self._token, int(time.time()) + 3600)


@dataclass
class _Version:
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    created: int
    updated: int


@dataclass
class _Secret:
    name: str
    versions: list[_Version] = field(default_factory=list)
    managed: bool = False
    deleted_date: int | None = None

    @property
    def latest(self) -> _Version:
        return self.versions[-1]


class _KeyVaultError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner


def _not_found(name: str, deleted: bool = False) -> _KeyVaultError:
    what = "Deleted Secret" if deleted else "A secret with (name/id)"
    return _KeyVaultError(404, "SecretNotFound", f"{what} {name} was not found in this key vault.")


class KeyVaultStub:
    """The local Key Vault. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        directory: Path,
        *,
        token: str = STUB_TOKEN,
        tenant_id: str = TENANT_ID,
        page_size: int = 25,
        soft_delete: bool = True,
    ) -> None:
        self.tls = make_tls_material(directory)
        self.token = token
        self.tenant_id = tenant_id
        self.page_size = page_size
        self.soft_delete = soft_delete
        self.purge_protection = False
        #: Sets refused with 409 after each purge, as Key Vault does while a purge is still finishing.
        self.purge_lag = 0
        self._purging: dict[str, int] = {}
        #: (method, path, authorized) of every request, for assertions on what the SDK sent.
        self.requests: list[tuple[str, str, bool]] = []
        self._secrets: dict[str, _Secret] = {}
        self._deleted: dict[str, _Secret] = {}
        self._faults: list[tuple[int, float | None]] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.tls.ca_path

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the Key Vault stub is not running")
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KeyVaultStub:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert_path, self.tls.key_path)
        stub = self

        class Handler(_Handler):
            vault = stub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        # Handshake in each handler thread, not in the accept loop, so one slow client stalls nobody.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="keyvault-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> KeyVaultStub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every secret, fault and request; restore the default options."""
        with self._lock:
            self._secrets.clear()
            self._deleted.clear()
            self._faults.clear()
            self.requests.clear()
            self.purge_protection = False
            self.purge_lag = 0
            self._purging.clear()
            self.soft_delete = True

    def fail_next(self, status: int, count: int = 1, *, retry_after: float | None = None) -> None:
        """Answer the next ``count`` authorised requests with ``status`` (and Retry-After if given)."""
        with self._lock:
            self._faults.extend([(status, retry_after)] * count)

    def add_managed_secret(self, name: str, value: str) -> None:
        """A secret Key Vault manages for a certificate (``managed: true``)."""
        with self._lock:
            secret = _Secret(name=name, managed=True)
            now = int(time.time())
            secret.versions.append(
                _Version(uuid.uuid4().hex, value, "application/x-pkcs12", None, True, now, now)
            )
            self._secrets[name.lower()] = secret

    def deleted_names(self) -> list[str]:
        with self._lock:
            return sorted(s.name for s in self._deleted.values())

    def versions(self, name: str) -> int:
        """How many versions the active secret ``name`` has (0 when there is none)."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            return len(secret.versions) if secret else 0

    def client(self, credential: StaticTokenCredential | None = None, **kwargs: Any) -> SecretClient:
        """A real SecretClient for this vault, trusting the stub's CA."""
        return SecretClient(
            self.url,
            credential=credential or StaticTokenCredential(self.token),
            verify_challenge_resource=False,
            connection_verify=str(self.ca_path),
            **kwargs,
        )

    def store(self, credential: StaticTokenCredential | None = None, **kwargs: Any) -> KeyVaultSecretStore:
        """A KeyVaultSecretStore on this vault, trusting the stub's CA, never pausing between retries."""
        kwargs.setdefault("sleep", lambda _seconds: None)
        return KeyVaultSecretStore(
            self.url,
            credential or StaticTokenCredential(self.token),
            verify_challenge_resource=False,
            connection_verify=str(self.ca_path),
            **kwargs,
        )

    # -- the REST API ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        with self._lock:
            if self._faults:
                status, retry_after = self._faults.pop(0)
                raise _FaultError(status, retry_after)
            match method, parts:
                case "PUT", ["secrets", name]:
                    return 200, self._set(name, body)
                case "GET", ["secrets"]:
                    return 200, self._list(query)
                case "GET", ["secrets", name]:
                    return 200, self._get(name, "")
                case "GET", ["secrets", name, version]:
                    return 200, self._get(name, version)
                case "PATCH", ["secrets", name]:
                    return 200, self._update(name, "", body)
                case "PATCH", ["secrets", name, version]:
                    return 200, self._update(name, version, body)
                case "DELETE", ["secrets", name]:
                    return 200, self._delete(name)
                case "GET", ["deletedsecrets", name]:
                    return 200, self._get_deleted(name)
                case "DELETE", ["deletedsecrets", name]:
                    self._purge(name)
                    return 204, None
                case "POST", ["deletedsecrets", name, "recover"]:
                    return 200, self._recover(name)
            raise _KeyVaultError(400, "BadParameter", f"Unsupported request: {method} /{'/'.join(parts)}")

    def _check_name(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise _KeyVaultError(
                400, "BadParameter", "The request URI contains an invalid name: " + name[:140]
            )
        return name.lower()

    def _bundle(self, secret: _Secret, version: _Version, *, with_value: bool = True) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "id": f"{self.url}/secrets/{secret.name}/{version.version}",
            "attributes": {
                "enabled": version.enabled,
                "created": version.created,
                "updated": version.updated,
                "recoveryLevel": "Recoverable+Purgeable" if self.soft_delete else "Purgeable",
                "recoverableDays": 90 if self.soft_delete else 0,
            },
        }
        if with_value:
            bundle["value"] = version.value
        if version.content_type is not None:
            bundle["contentType"] = version.content_type
        if version.tags is not None:
            bundle["tags"] = version.tags
        if secret.managed:
            bundle["managed"] = True
        return bundle

    def _deleted_bundle(self, secret: _Secret) -> dict[str, Any]:
        bundle = self._bundle(secret, secret.latest, with_value=False)
        if self.soft_delete:
            deleted = secret.deleted_date or int(time.time())
            bundle["recoveryId"] = f"{self.url}/deletedsecrets/{secret.name}"
            bundle["deletedDate"] = deleted
            bundle["scheduledPurgeDate"] = deleted + 90 * 86400
        return bundle

    def _set(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        key = self._check_name(name)
        value = body.get("value")
        if not isinstance(value, str):
            raise _KeyVaultError(400, "BadParameter", "Property value is required")
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise _KeyVaultError(400, "BadParameter", "Secret value is too long (the maximum is 25 KB)")
        if self._purging.get(key, 0) > 0:
            self._purging[key] -= 1
            raise _KeyVaultError(409, "Conflict", f"Secret {name} is currently being deleted.")
        if key in self._deleted:
            raise _KeyVaultError(
                409,
                "Conflict",
                f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
                "reused; in this state, the secret can only be recovered or purged.",
                inner="ObjectIsDeletedButRecoverable",
            )
        secret = self._secrets.setdefault(key, _Secret(name=name))
        now = int(time.time())
        enabled = bool((body.get("attributes") or {}).get("enabled", True))
        version = _Version(
            uuid.uuid4().hex, value, body.get("contentType"), body.get("tags"), enabled, now, now
        )
        secret.versions.append(version)
        return self._bundle(secret, version)

    def _find_version(self, name: str, version: str) -> tuple[_Secret, _Version]:
        secret = self._secrets.get(self._check_name(name))
        if secret is None:
            raise _not_found(name)
        if not version:
            return secret, secret.latest
        for candidate in secret.versions:
            if candidate.version == version:
                return secret, candidate
        raise _not_found(f"{name}/{version}")

    def _get(self, name: str, version: str) -> dict[str, Any]:
        secret, found = self._find_version(name, version)
        if not found.enabled:
            raise _KeyVaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                                 inner="SecretDisabled")
        return self._bundle(secret, found)

    def _update(self, name: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
        secret, found = self._find_version(name, version)
        attributes = body.get("attributes") or {}
        if "enabled" in attributes:
            found.enabled = bool(attributes["enabled"])
        if "contentType" in body:
            found.content_type = body["contentType"]
        if "tags" in body:
            found.tags = body["tags"]
        found.updated = int(time.time())
        return self._bundle(secret, found, with_value=False)

    def _delete(self, name: str) -> dict[str, Any]:
        key = self._check_name(name)
        secret = self._secrets.pop(key, None)
        if secret is None:
            raise _not_found(name)
        if self.soft_delete:
            secret.deleted_date = int(time.time())
            self._deleted[key] = secret
        return self._deleted_bundle(secret)

    def _get_deleted(self, name: str) -> dict[str, Any]:
        secret = self._deleted.get(self._check_name(name))
        if secret is None:
            raise _not_found(name, deleted=True)
        return self._deleted_bundle(secret)

    def _purge(self, name: str) -> None:
        key = self._check_name(name)
        if self.purge_protection:
            raise _KeyVaultError(
                403,
                "Forbidden",
                'Operation "purge" is not allowed because purge protection is enabled for this vault.',
                inner="OperationNotAllowed",
            )
        if self._deleted.pop(key, None) is None:
            raise _not_found(name, deleted=True)
        if self.purge_lag:
            self._purging[key] = self.purge_lag

    def _recover(self, name: str) -> dict[str, Any]:
        key = self._check_name(name)
        secret = self._deleted.get(key)
        if secret is None:
            raise _not_found(name, deleted=True)
        if key in self._secrets:
            raise _KeyVaultError(409, "Conflict", f"Secret {name} already exists.")
        del self._deleted[key]
        secret.deleted_date = None
        self._secrets[key] = secret
        return self._bundle(secret, secret.latest)

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        try:
            size = min(int(query.get("maxresults") or self.page_size), self.page_size)
            skip = int(query.get("$skiptoken") or 0)
        except ValueError:
            raise _KeyVaultError(400, "BadParameter", "Invalid maxresults or $skiptoken") from None
        if size < 1:
            raise _KeyVaultError(400, "BadParameter", "maxresults must be between 1 and 25")
        secrets = sorted(self._secrets.values(), key=lambda s: s.name.lower())
        page = secrets[skip : skip + size]
        items = []
        for secret in page:
            item = self._bundle(secret, secret.latest, with_value=False)
            item["id"] = f"{self.url}/secrets/{secret.name}"
            items.append(item)
        next_link = None
        if skip + size < len(secrets):
            next_link = (
                f"{self.url}/secrets?api-version={query.get('api-version', '')}"
                f"&$skiptoken={skip + size}&maxresults={size}"
            )
        return {"value": items, "nextLink": next_link}


class _FaultError(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status, self.retry_after = status, retry_after


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    vault: KeyVaultStub
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle + delayed ACK add ~40 ms each.
    disable_nagle_algorithm = True
    server_version = "KeyVaultStub/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        authorized = self.headers.get("Authorization") == f"Bearer {self.vault.token}"
        with self.vault._lock:
            self.vault.requests.append((self.command, split.path, authorized))
        if not authorized:
            self._send(
                401,
                _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
                {
                    "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
                    f'{self.vault.tenant_id}", resource="https://vault.azure.net"'
                },
            )
            return
        if "api-version" not in query:
            self._send(400, _error("BadParameter", "The api-version query is required"))
            return
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
            status, payload = self.vault.handle(self.command, split.path, query, body)
        except ValueError:
            self._send(400, _error("BadParameter", "The request body is not valid JSON"))
        except _FaultError as fault:
            headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else {}
            code = "Throttled" if fault.status == 429 else "InternalServerError"
            self._send(fault.status, {"error": {"code": code, "message": "Injected failure"}}, headers)
        except _KeyVaultError as err:
            error: dict[str, Any] = {"code": err.code, "message": err.message}
            if err.inner:
                error["innererror"] = {"code": err.inner}
            self._send(err.status, {"error": error})
        else:
            self._send(status, payload)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch
