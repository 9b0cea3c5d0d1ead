"""The Dataverse Web API client (DESIGN §4) and the tokens it needs."""

from shared.crm.auth import TokenProvider
from shared.crm.client import DataverseClient, LeadWrite, WhoAmI, WriteResult

__all__ = ["DataverseClient", "LeadWrite", "TokenProvider", "WhoAmI", "WriteResult"]
