"""The shape every feature service follows.

A service is constructed from its config section plus the typed ports it needs (other
services, or plain callables), never has attributes assigned from outside, and:

- ``mount(m)`` registers its RPC methods, HTTP aliases, stream protocols and gossip
  routes on the node's shared :class:`Mounts`;
- ``run(*, task_status)`` runs it under the node's root nursery (``nursery.start``),
  calling ``task_status.started()`` once it is ready. Cancellation is shutdown.

``vcoind.node`` builds the services from ``Config`` in dependency order, mounts them,
then starts them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vcoind.p2p.gossip import Gossip
from vcoind.p2p.streams import StreamService
from vcoind.rpc import MethodRegistry, RPCServer

if TYPE_CHECKING:
    from trio_typing import TaskStatus


@dataclass(frozen=True)
class Mounts:
    """Where services register what they serve."""

    rpc: MethodRegistry  # JSON-RPC methods (vcoin_*)
    http: RPCServer  # GET aliases, extra routes, WebSocket channels
    gossip: Gossip  # topic routes (typed, validated records)
    streams: StreamService  # direct request/response protocols


class Service(Protocol):
    def mount(self, m: Mounts) -> None: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...
