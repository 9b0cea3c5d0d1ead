"""The CRM URL guard (architecture §4): the CRM URL is the publisher's input, so it must never point us at
anything but a Dynamics 365 / Dataverse host.

The URL is parsed by hand, strictly, instead of trusting ``urllib.parse``: lenient parsers disagree on
backslashes, ``@`` and percent-encoding, and every disagreement is an SSRF bypass. Anything that is not
plainly ``https://<org>[.api].crm[N].dynamics.com[:443][/]`` (or one of the sovereign clouds) is
refused, unless an operator allowed the exact ``host:port`` with ``LEADWRITER_CRM_ALLOWED_HOSTS``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence

from shared.errors import UnsafeCrmUrl

logger = logging.getLogger(__name__)

_ORG = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DYNAMICS_HOST = re.compile(
    rf"{_ORG}(?:\.api)?\."
    r"(?:crm[0-9]*\.dynamics\.com|crm\.microsoftdynamics\.us|crm\.appsplatform\.us|crm\.dynamics\.cn)"
)
_HOST_CHARS = re.compile(r"[a-z0-9.-]+")
# A label made only of digits, or a 0x-prefixed hex number: inet_aton would read it as (part of) an
# IPv4 address (e.g. "2130706433", "0x7f.1", "017700000001").
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
_PORT = re.compile(r"[0-9]{1,5}")

HTTPS_PORT = 443


def check_crm_url(url: str, extra_hosts: Sequence[str] = ()) -> str:
    """Return the normalised origin of an allowed CRM URL.

    The origin is ``https://<host>`` in lowercase, without trailing dot or slash, with ``:<port>``
    only when the port is not 443 (which only an ``extra_hosts`` entry can allow).

    ``extra_hosts`` holds ``host:port`` patterns (``port`` may be ``*``); the host must match exactly.
    Only these may name an IP address or another port; they are still https-only, without userinfo,
    path, query or fragment.

    Raises UnsafeCrmUrl with a message naming the problem.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeCrmUrl("the CRM URL is empty")
    if any(not ("\x21" <= ch <= "\x7e") for ch in url):
        raise UnsafeCrmUrl(
            "the CRM URL contains whitespace, control or non-ASCII characters "
            "(internationalised host names are not allowed)"
        )
    if "\\" in url:
        raise UnsafeCrmUrl("the CRM URL contains a backslash")
    if "%" in url:
        raise UnsafeCrmUrl("the CRM URL contains percent-encoded characters")
    if url[:8].lower() != "https://":
        raise UnsafeCrmUrl("the CRM URL must start with https://")
    rest = url[8:]
    authority_end = len(rest)
    for separator in "/?#":
        index = rest.find(separator)
        if index != -1:
            authority_end = min(authority_end, index)
    authority, remainder = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        raise UnsafeCrmUrl("the CRM URL must not contain a user name or password (userinfo)")
    if "?" in remainder or "#" in remainder:
        raise UnsafeCrmUrl("the CRM URL must not have a query or fragment")
    if remainder not in ("", "/"):
        raise UnsafeCrmUrl("the CRM URL must be the instance root, without a path (e.g. /api/data)")
    host, port = _split_authority(authority)

    if _in_extra_hosts(host, port, extra_hosts):
        return _origin(host, port)

    if host.startswith("["):
        raise UnsafeCrmUrl("the CRM URL must not name an IP address")
    if host.endswith("."):
        raise UnsafeCrmUrl("the CRM host must not end with a dot")
    if not _HOST_CHARS.fullmatch(host):
        raise UnsafeCrmUrl("the CRM host contains characters not allowed in a host name")
    if _is_ip_like(host):
        raise UnsafeCrmUrl("the CRM URL must not name an IP address")
    if any(label.startswith("xn--") for label in host.split(".")):
        raise UnsafeCrmUrl("internationalised (IDNA) host names are not allowed for the CRM")
    if port != HTTPS_PORT:
        raise UnsafeCrmUrl(f"the CRM URL must use port 443, not {port}")
    if not _DYNAMICS_HOST.fullmatch(host):
        raise UnsafeCrmUrl(
            f"the CRM host {host} is not a Dynamics 365 host "
            "(expected <org>.crm<N>.dynamics.com, <org>.crm.microsoftdynamics.us, "
            "<org>.crm.appsplatform.us or <org>.crm.dynamics.cn)"
        )
    return _origin(host, port)


def _split_authority(authority: str) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 in brackets) into the lowercase host and the port (443 if absent)."""
    if not authority:
        raise UnsafeCrmUrl("the CRM URL has no host")
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise UnsafeCrmUrl("the CRM URL has an unterminated IPv6 address")
        host, after = authority[: close + 1], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise UnsafeCrmUrl("the CRM URL has characters after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise UnsafeCrmUrl("the CRM host contains more than one ':'")
        host, separator, port = authority.partition(":")
        port_text = port if separator else None
    if not host or host in ("[]", "."):
        raise UnsafeCrmUrl("the CRM URL has no host")
    return host.lower(), _parse_port(port_text)


def _parse_port(text: str | None) -> int:
    if text is None:
        return HTTPS_PORT
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 65535:
        raise UnsafeCrmUrl("the CRM URL has an invalid port")
    return int(text)


def _in_extra_hosts(host: str, port: int, extra_hosts: Sequence[str]) -> bool:
    for pattern in extra_hosts:
        pattern = pattern.strip().lower()
        if not pattern:
            continue
        if pattern.startswith("["):
            close = pattern.find("]")
            allowed_host, rest = pattern[: close + 1], pattern[close + 1 :]
            allowed_port = rest[1:] if rest.startswith(":") else str(HTTPS_PORT)
        elif ":" in pattern:
            allowed_host, _, allowed_port = pattern.rpartition(":")
        else:
            allowed_host, allowed_port = pattern, str(HTTPS_PORT)
        if allowed_host == host and (allowed_port == "*" or allowed_port == str(port)):
            return True
    return False


def _is_ip_like(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    # inet_aton accepts 1 to 4 parts in decimal, octal or hex; a resolver may too. The last label decides:
    # no real top-level domain is numeric.
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return bool(_NUMERIC_LABEL.fullmatch(last))


def _origin(host: str, port: int) -> str:
    return f"https://{host}" if port == HTTPS_PORT else f"https://{host}:{port}"
