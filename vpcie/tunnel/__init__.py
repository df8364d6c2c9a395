"""Backend side of the network link to a host agent (docs/PROTOCOL.md).

``TunnelClient`` (client.py) speaks the tunnel protocol over asyncio;
``Completion``/``QueryInfo`` (results.py) are what comes back; ``commands``
builds the records of the convenience calls; ``Runstate`` (runstate.py) is
the connection's state machine; scatter.py maps DATA frames onto scatter lists.
"""

from vpcie.tunnel.client import TunnelClient
from vpcie.tunnel.results import Completion, QueryInfo
from vpcie.tunnel.runstate import Runstate, RunstateError

__all__ = ["Completion", "QueryInfo", "Runstate", "RunstateError", "TunnelClient"]
