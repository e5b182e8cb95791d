"""``/vcoin/task/1.0.0``: the direct request/response protocol of the task market.

Bids have a protocol of their own, ``/vcoin/bid/1.0.0``: a session (one stream per origin
carries a bidder's bids one after another, kept open ``BID_SESSION_IDLE_S``), each request
at most a ``Bid``'s size. A bid is the first reply to every announcement, so it must not
wait for a stream to be set up each time.

One handler per record kind: services register theirs with :meth:`TaskProtocol.handle`
(the market its bids, assignments, cancels, progress and results; the oracle its queries and
confirmations) before the node starts; the stream is served with every registered kind.
:meth:`TaskProtocol.send` is the one way to send a record to a peer, and to ourselves it
is a plain call (the origin may be its own worker).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from libp2p.peer.id import ID

from vcoind.market.messages import (
    TASK_PROTOCOL,
    Assignments,
    Bid,
    Cancel,
    Progress,
    TaskResult,
)
from vcoind.p2p.streams import (
    Ack,
    StreamProtocol,
    StreamProtocolError,
    StreamService,
    StreamSession,
)

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

BID_PROTOCOL = "/vcoin/bid/1.0.0"
BID_SESSION_IDLE_S = 30.0
BID_RETRY_S = 0.2  # before a bid goes again on a new stream (a reset connection redials)
MAX_BID_SESSIONS = 64  # origins whose bid stream we keep; the oldest is closed past it
BID_STREAM = StreamProtocol(
    BID_PROTOCOL, (Bid,), max_request_bytes=Bid.MAX_BYTES, keep_open_s=BID_SESSION_IDLE_S
)


class TaskProtocol:
    def __init__(self, streams: StreamService, peer_id: str) -> None:
        self._streams = streams
        self._peer_id = peer_id
        self._handlers: dict[type[Any], Handler] = {}
        self._stream: StreamProtocol | None = None
        self._bid_sessions: dict[str, StreamSession] = {}  # origin -> our bids' stream

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
        if Bid in self._handlers:
            self._streams.serve(BID_STREAM, lambda peer, r: self.dispatch(peer.to_base58(), r))

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

    async def send_bid(self, peer: str, bid: Bid) -> None:
        """Our bid to the origin ``peer``, on the session we keep with it; once more on a
        fresh stream when the kept one was closed or the connection was lost meanwhile
        (a refusal is not sent again)."""
        if peer == self._peer_id:
            await self.dispatch(peer, bid)
            return
        for last in (False, True):
            session = self._bid_sessions.get(peer)
            if session is None or not session.is_open:
                if session is None and len(self._bid_sessions) >= MAX_BID_SESSIONS:
                    oldest = next(iter(self._bid_sessions))
                    await self._bid_sessions.pop(oldest).aclose()
                session = self._bid_sessions[peer] = self._streams.session(
                    ID.from_base58(peer), BID_STREAM
                )
            try:
                await session.request(bid, Ack)
                return
            except StreamProtocolError:
                if last or session.is_open:  # a refusal keeps the stream open
                    raise
            await trio.sleep(BID_RETRY_S)
