"""The local Dataverse + Entra ID simulator (architecture §9): real HTTPS, real status codes and bodies.

with CrmSimulator(data_dir) as sim:
    org = sim.add_org("contoso")
    sim.add_user("contoso", "svc@contoso.example", "…")
    # point AZURE_AUTHORITY_HOST at sim.authority_host, REQUESTS_CA_BUNDLE at sim.ca_path,
    # and the CRM URL at org.url
"""

from shared.simulator.config import SimulatorConfigError
from shared.simulator.faults import Faults
from shared.simulator.simulator import CrmSimulator, SimOrg
from shared.simulator.state import RequestLog

__all__ = ["CrmSimulator", "Faults", "RequestLog", "SimOrg", "SimulatorConfigError"]
