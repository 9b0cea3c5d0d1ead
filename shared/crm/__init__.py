"""Everything that talks to a CRM or to Entra ID: the Dataverse client, tokens, ``$batch``, the one
status → error mapping, the URL guard, the solution rule, live verification, pacing and penalties.
Imports no pipeline, runtime or API module (architecture §4, §10).

The client and the token provider are imported on first use (``from shared.crm import DataverseClient``
still works): a process that only needs :mod:`shared.crm.connection` — ``leadwriter enqueue``, the
dead-letter commands — does not pay for azure-identity and requests at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.crm.auth import TokenProvider
    from shared.crm.client import DataverseClient, LeadWrite, WhoAmI, WriteResult

_LAZY = {
    "TokenProvider": "shared.crm.auth",
    "DataverseClient": "shared.crm.client",
    "LeadWrite": "shared.crm.client",
    "WhoAmI": "shared.crm.client",
    "WriteResult": "shared.crm.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["DataverseClient", "LeadWrite", "TokenProvider", "WhoAmI", "WriteResult"]
