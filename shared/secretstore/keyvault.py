"""Azure Key Vault as a :class:`~shared.secretstore.base.SecretStore` (``azure-keyvault-secrets``).

Soft delete. Every vault has it, so ``delete`` only moves a secret into the deleted state, and while
it sits there (90 days by default) Key Vault answers 409 Conflict to a ``set_secret`` of the same name.
A publisher that removes its connection and stores a new one must still work, so ``put`` resolves the
conflict itself:

1. **purge** the deleted secret (needs the ``secrets/purge`` permission — Key Vault Secrets Officer
   has it), then set. Purging is preferred: the publisher deleted those credentials, so they should
   not linger as a recoverable old version.
2. when purging is refused (403: no purge permission, or purge protection is on), **recover** the
   deleted secret and set the new value as a new version on top of it.

Key Vault finishes purges and recoveries asynchronously, so the set is retried a bounded number of
times with a short backoff while it still answers 409.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.keyvault.secrets import SecretClient

from shared.errors import ConfigurationError, SecretStoreUnavailable
from shared.http import retry_after_seconds
from shared.secretstore.base import CONTENT_TYPE, validate_secret_name

logger = logging.getLogger(__name__)

#: How often ``put`` retries a set that Key Vault still refuses while a purge or recovery completes.
CONFLICT_ATTEMPTS = 8
#: Seconds between the SDK's polls of a delete or recovery (its default is 2 s).
POLL_INTERVAL = 0.5


def _conflict_backoff(attempt: int) -> float:
    return float(min(0.25 * 2**attempt, 4.0))


def _error_code(exc: HttpResponseError) -> str | None:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    return str(code) if code else None


def _unavailable(action: str, name: str, exc: AzureError) -> SecretStoreUnavailable:
    """Translate an SDK error into ours from safe parts only (status, code, request id)."""
    status = exc.status_code if isinstance(exc, HttpResponseError) else None
    code = _error_code(exc) if isinstance(exc, HttpResponseError) else None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    request_id = headers.get("x-ms-request-id")
    retry_after = retry_after_seconds(headers, default=None)
    if status in (401, 403):
        detail = "Key Vault refused access (check the identity's Key Vault role assignment)"
    elif status is None:
        detail = f"Key Vault could not be reached ({type(exc).__name__})"
    else:
        detail = "Key Vault failed"
    return SecretStoreUnavailable(
        f"{detail} while trying to {action} secret {name!r}",
        retry_after=retry_after,
        status=status,
        code=code,
        request_id=request_id,
    )


class KeyVaultSecretStore:
    """Secrets in Azure Key Vault. Names are case-insensitive there; disabled secrets count as absent."""

    def __init__(
        self,
        vault_url: str,
        credential: TokenCredential,
        *,
        client: SecretClient | None = None,
        sleep: Callable[[float], None] = time.sleep,
        **client_kwargs: Any,
    ) -> None:
        """Build the store on ``vault_url`` (``https://<vault>.vault.azure.net``).

        ``client_kwargs`` go to :class:`SecretClient` (transport, ``connection_verify``, retry
        options, ``verify_challenge_resource`` for a non-Azure host). ``sleep`` paces the bounded
        retries of a set after a purge or recovery. Raises ConfigurationError for a URL that is not
        https.
        """
        parts = urlsplit(vault_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigurationError("invalid setting KEYVAULT_URL: expected https://<vault>.vault.azure.net")
        # Never follow redirects: a redirect could carry the bearer token to another host.
        client_kwargs.setdefault("permit_redirects", False)
        self.vault_url = vault_url.rstrip("/")
        self._client = client or SecretClient(self.vault_url, credential, **client_kwargs)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"KeyVaultSecretStore({self.vault_url!r})"

    def get(self, name: str) -> str | None:
        """The current value, or None when the secret does not exist or is disabled.

        Raises InvalidSecretName for a malformed name, SecretStoreUnavailable when Key Vault cannot
        answer.
        """
        validate_secret_name(name)
        try:
            secret = self._client.get_secret(name)
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            if exc.status_code == 403 and "disabled" in str(getattr(exc.error, "message", "") or ""):
                return None
            raise _unavailable("read", name, exc) from exc
        except AzureError as exc:
            raise _unavailable("read", name, exc) from exc
        if secret.properties.enabled is False:
            return None
        return secret.value

    def put(
        self,
        name: str,
        value: str,
        *,
        content_type: str = CONTENT_TYPE,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Create or replace ``name`` (a new version), clearing a soft-deleted one first if needed.

        Raises InvalidSecretName for a malformed name, SecretStoreUnavailable when Key Vault cannot
        store it.
        """
        validate_secret_name(name)
        tag_dict = dict(tags) if tags else None
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                self._client.set_secret(name, value, content_type=content_type, tags=tag_dict)
                return
            except ResourceExistsError as exc:
                # 409: the name is held by a deleted secret (or one being deleted / recovered).
                if attempt == CONFLICT_ATTEMPTS - 1:
                    raise _unavailable("store", name, exc) from exc
                if attempt:
                    self._sleep(_conflict_backoff(attempt))
                self._clear_deleted(name)
            except AzureError as exc:
                raise _unavailable("store", name, exc) from exc

    def _clear_deleted(self, name: str) -> None:
        """Purge (preferred) or recover the soft-deleted ``name`` so that it can be set again."""
        try:
            self._client.purge_deleted_secret(name)
            logger.info("purged soft-deleted secret %s before storing it again", name)
            return
        except ResourceNotFoundError:
            return  # already purged or recovered (by us on an earlier attempt, or by someone else)
        except ResourceExistsError:
            return  # still being deleted: the caller waits and tries again
        except HttpResponseError as exc:
            if exc.status_code != 403:
                raise _unavailable("purge", name, exc) from exc
            logger.info(
                "purging secret %s is not permitted (%s); recovering it instead", name, _error_code(exc)
            )
        try:
            poller = self._client.begin_recover_deleted_secret(name, _polling_interval=POLL_INTERVAL)
            poller.wait()
        except (ResourceNotFoundError, ResourceExistsError):
            return
        except AzureError as exc:
            raise _unavailable("recover", name, exc) from exc

    def delete(self, name: str) -> bool:
        """Soft-delete ``name`` and wait until Key Vault has finished; True if it existed.

        Raises InvalidSecretName for a malformed name, SecretStoreUnavailable when Key Vault cannot
        delete it.
        """
        validate_secret_name(name)
        try:
            poller = self._client.begin_delete_secret(name, _polling_interval=POLL_INTERVAL)
            # Waiting means a put right after finds the name in the deleted state (which it can
            # resolve) rather than "currently being deleted".
            poller.wait()
        except ResourceNotFoundError:
            return False
        except AzureError as exc:
            raise _unavailable("delete", name, exc) from exc
        return True

    def list_names(self, prefix: str = "") -> list[str]:
        """Names of the enabled secrets starting with ``prefix`` (case-insensitively), sorted.

        Secrets Key Vault manages for certificates are left out. Raises SecretStoreUnavailable when
        Key Vault cannot list them.
        """
        folded = prefix.lower()
        names: list[str] = []
        try:
            for props in self._client.list_properties_of_secrets():
                name = props.name
                if not name or props.enabled is False or props.managed:
                    continue
                if name.lower().startswith(folded):
                    names.append(name)
        except AzureError as exc:
            raise _unavailable("list", prefix + "*", exc) from exc
        return sorted(names)

    def close(self) -> None:
        """Close the client's sockets."""
        self._client.close()
