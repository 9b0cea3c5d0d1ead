"""Everything that talks to a CRM or to Entra ID: the Dataverse client, tokens, ``$batch``, the one
status → error mapping, the URL guard, the solution rule, live verification, pacing and penalties.
Imports no pipeline, runtime or API module (architecture §4, §10)."""

from shared.crm.auth import TokenProvider
from shared.crm.client import DataverseClient, LeadWrite, WhoAmI, WriteResult

__all__ = ["DataverseClient", "LeadWrite", "TokenProvider", "WhoAmI", "WriteResult"]
