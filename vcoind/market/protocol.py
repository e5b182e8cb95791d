"""``/vcoin/task/1.0.0``: the direct request/response protocol of the task market.

One handler per record kind: services register theirs with :meth:`TaskProtocol.handle`
(the market its bids, assignments, cancels, progress and results; the oracle its queries and
confirmations) before the node starts; the stream is served with every registered kind.
:meth:`TaskProtocol.send` is the one way to send a record to a peer, and to ourselves it
is a plain call (the origin may be its own worker).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from libp2p.peer.id import ID

from vcoind.market.messages import (
    TASK_PROTOCOL,
    Assignments,
    Bid,
    Cancel,
    Progress,
    TaskResult,
)
from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService

R = TypeVar("R")
Handler = Callable[[str, Any], Awaitable[Any]]

MARKET_RECORDS: tuple[type[Any], ...] = (Assignments, Bid, Cancel, Progress, TaskResult)


def task_stream(records: tuple[type[Any], ...] = MARKET_RECORDS) -> StreamProtocol:
    """The protocol's definition for the given request kinds (size limit: the largest)."""
    return StreamProtocol(
        TASK_PROTOCOL, records, max_request_bytes=max(r.MAX_BYTES for r in records)
    )


# The market's own requests (what a test or another implementation sends).
TASK_STREAM = task_stream()


class TaskProtocol:
    def __init__(self, streams: StreamService, peer_id: str) -> None:
        self._streams = streams
        self._peer_id = peer_id
        self._handlers: dict[type[Any], Handler] = {}
        self._stream: StreamProtocol | None = None

    def handle(self, record: type[Any], handler: Handler) -> None:
        """Answer requests of type ``record`` with ``handler(peer, record)``."""
        if self._stream is not None:
            raise RuntimeError("handlers must be registered before the protocol is served")
        if record in self._handlers:
            raise ValueError(f"{record.__name__} already has a handler")
        self._handlers[record] = handler

    def serve(self) -> None:
        """Serve the stream with every registered kind (once, after all ``handle`` calls)."""
        self._stream = task_stream(tuple(self._handlers))
        self._streams.serve(self._stream, lambda peer, r: self.dispatch(peer.to_base58(), r))

    async def dispatch(self, peer: str, record: Any) -> Any:
        handler = self._handlers.get(type(record))
        if handler is None:
            raise StreamProtocolError(f"unexpected {type(record).__name__}")
        return await handler(peer, record)

    async def send(self, peer: str, record: Any, reply_type: type[R]) -> R:
        """A request to ``peer``; to ourselves it is a plain call."""
        if peer == self._peer_id:
            reply: R = await self.dispatch(peer, record)
            return reply
        stream = self._stream or TASK_STREAM
        return await self._streams.request(ID.from_base58(peer), stream, record, reply_type)
