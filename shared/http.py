"""HTTP pieces every outbound caller shares: the hardened session factory and ``Retry-After``.

Every call to a CRM or to the Entra authority that goes through ``requests`` uses :func:`new_session`;
every ``Retry-After`` (CRM, authority, Key Vault) is read by :func:`retry_after_seconds`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

import requests

#: Used when a 429 carries no usable Retry-After (Dataverse always sends one; a proxy might not).
DEFAULT_RETRY_AFTER = 30.0
#: Longest wait we accept from a Retry-After, so a malformed header cannot park a publisher for days.
MAX_RETRY_AFTER = 3600.0


def new_session(origin: str) -> requests.Session:
    """A session for ``origin`` whose environment settings are read once, here, not on every request.

    With ``trust_env`` on, requests re-reads the proxy variables (walking the whole environment) and
    ~/.netrc for each request — about a tenth of our CPU per lead at low volume — and a netrc entry
    could add credentials we never meant to send. The CA bundle comes from settings
    (``REQUESTS_CA_BUNDLE``) and is passed with every request; the proxies the environment names for
    this origin are taken once. Callers pass ``allow_redirects=False`` and explicit timeouts.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(origin))
    return session


def retry_after_seconds(
    headers: Mapping[str, str] | None, default: float | None = DEFAULT_RETRY_AFTER
) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), bounded to
    ``[0, MAX_RETRY_AFTER]``; ``default`` when there is none or it cannot be read."""
    if not headers:
        return default
    lowered = {str(name).lower(): value for name, value in headers.items()}
    raw = (lowered.get("retry-after") or "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return default
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
