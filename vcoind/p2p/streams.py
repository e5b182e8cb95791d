"""Direct request/response protocols over libp2p streams (``/vcoin/task/1.0.0``, ...).

Framing, the same for every protocol and language-neutral: a 4-byte big-endian
length, then that many bytes of one msgpack record (see ``codec``). A request
stream carries exactly one request frame from the dialler and one reply frame
back, then closes. The reply is the handler's record, or an ``ErrorReply``.

Limits are enforced before reading: a declared length above the protocol's
maximum resets the stream at once (the bytes are never read), a peer that
stalls mid-frame is cut off by a timeout, and malformed records get an
``ErrorReply``. A session stream (``keep_open_s``) carries at most the
protocol's byte budget (``stream_budget``): a frame that would pass it resets
the stream before it is read. Nothing a peer sends can make the node read
unbounded data or crash a handler loop.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import Message, decode, encode, lim, message
from vcoind.p2p.errors import CodecError, P2PError
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import is_circuit

log = logging.getLogger("vcoind.streams")

HEADER = struct.Struct(">I")
DEFAULT_TIMEOUT_S = 30.0
DIAL_TIMEOUT_S = 5.0
RESOLVED_ADDR_TTL_S = 600
# A session stream's default byte budget, in requests of the largest size: far above what
# a pipeline session sends (new positions only, per step), far below "unlimited".
STREAM_BUDGET_REQUESTS = 64
R = TypeVar("R")


@message
@dataclass(frozen=True)
class Ack(Message):
    """The generic reply of a request that returns nothing else."""

    KIND: ClassVar[str] = "ack"
    MAX_BYTES: ClassVar[int] = 256

    ok: bool = True


class StreamProtocolError(P2PError):
    """The remote answered with an error, broke the framing, or did not answer in time."""


class StreamOpenError(StreamProtocolError):
    """No stream could be opened: nothing was sent, so the request can be retried."""


@message
@dataclass(frozen=True)
class ErrorReply(Message):
    """Reply sent instead of the expected record when a request cannot be served."""

    KIND: ClassVar[str] = "error"
    MAX_BYTES: ClassVar[int] = 4096

    code: str = field(metadata=lim(max_len=64))  # "bad_request", "too_large", "internal", ...
    message: str = field(default="", metadata=lim(max_len=1024))


# Characters of an ErrorReply's message we send: under its max_len, and even at 4 bytes
# a character under its MAX_BYTES.
_MAX_ERROR_CHARS = 512


def error_reply(code: str, text: str) -> ErrorReply:
    """An ``ErrorReply`` within its limits, whatever the text (it may quote the peer)."""
    return ErrorReply(code, text if len(text) <= _MAX_ERROR_CHARS else
                      text[: _MAX_ERROR_CHARS - 3] + "...")  # fmt: skip


class _EndOfStream(StreamProtocolError):
    """The peer closed the stream cleanly between two frames."""


class StreamBudgetError(StreamProtocolError):
    """A session stream would carry more bytes than its protocol's budget."""


async def read_frame(stream: INetStream, max_bytes: int, budget: int | None = None) -> bytes:
    """One length-prefixed frame; StreamProtocolError if too large or cut short, and
    StreamBudgetError if the frame, header included, takes more than ``budget`` bytes
    (checked before its body is read)."""
    header = await _read_exactly(stream, HEADER.size, frame_start=True)
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise StreamProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    if budget is not None and HEADER.size + length > budget:
        raise StreamBudgetError(f"a frame of {length} bytes with {max(budget, 0)} bytes "
                                "left of the stream's budget")  # fmt: skip
    return await _read_exactly(stream, length)


async def _read_exactly(stream: INetStream, n: int, *, frame_start: bool = False) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except StreamEOF:  # (how py-libp2p reports that the peer closed its side)
            chunk = b""
        except BaseLibp2pError as exc:
            raise StreamProtocolError(
                f"stream ended after {len(buf)} of {n} bytes ({exc!r})"
            ) from None
        if not chunk:
            if not buf and frame_start:  # (not a 4-byte body cut off)
                raise _EndOfStream("stream closed")
            raise StreamProtocolError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def write_frame(stream: INetStream, data: bytes) -> None:
    await stream.write(HEADER.pack(len(data)) + data)


@dataclass(frozen=True)
class StreamProtocol:
    """A direct protocol: its id, the request records it accepts and its size limit."""

    protocol_id: str
    requests: tuple[type[Any], ...]
    max_request_bytes: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    # > 0: a stream may carry further requests (a session), each awaited this long;
    # 0: one request per stream.
    keep_open_s: float = 0.0
    # Bytes one stream may carry from the peer, frame headers included (0: the default,
    # STREAM_BUDGET_REQUESTS requests of the largest size); past it the stream is reset.
    max_stream_bytes: int = 0

    @property
    def stream_budget(self) -> int:
        return self.max_stream_bytes or STREAM_BUDGET_REQUESTS * (
            HEADER.size + self.max_request_bytes
        )


Handler = Callable[[ID, Any], Awaitable[Any]]


class StreamService:
    """Serves registered protocols and sends requests to peers.

    ``max_stream_bytes`` > 0 caps the byte budget of every session protocol served here
    (the ``p2p.max_stream_bytes`` setting); 0 leaves each protocol its own."""

    def __init__(
        self, p2p: P2PHost, metrics: NodeMetrics, *, max_stream_bytes: int = 0,
        resolve: Callable[[ID], list[Any]] = lambda peer: [],
        connect: Callable[[PeerInfo, float], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        self._p2p = p2p
        self._metrics = metrics
        self._max_stream_bytes = max_stream_bytes
        # Addresses a peer announced (the keeper's, dial policy applied): a stream to a
        # peer we are not connected to yet can dial them.
        self._resolve = resolve
        # Dials a peer's direct addresses, else its relayed ones (``Relays.connect``).
        self._connect = connect

    def budget(self, proto: StreamProtocol) -> int:
        """The bytes one stream of ``proto`` may carry from the peer."""
        cap = self._max_stream_bytes
        if cap <= 0 or proto.keep_open_s <= 0:  # one request a stream: max_request_bytes
            return proto.stream_budget
        return min(proto.stream_budget, cap)

    def serve(self, proto: StreamProtocol, handler: Handler) -> None:
        """Answer ``proto`` requests with ``handler(peer, request) -> reply record``."""
        budget = self.budget(proto)

        async def on_stream(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            left = budget
            try:
                with trio.fail_after(proto.timeout_s):
                    data = await read_frame(stream, proto.max_request_bytes, left)
                    left -= HEADER.size + len(data)
                    await self._answer(stream, peer, proto, handler, data)
                while proto.keep_open_s > 0:  # a session: more requests on this stream
                    with trio.move_on_after(proto.keep_open_s) as idle:
                        data = await read_frame(stream, proto.max_request_bytes, left)
                    if idle.cancelled_caught:
                        break
                    left -= HEADER.size + len(data)
                    with trio.fail_after(proto.timeout_s):
                        await self._answer(stream, peer, proto, handler, data)
            except _EndOfStream:  # the peer is done: close our side too
                await _close(stream)
            except StreamBudgetError as exc:
                log.warning("%s from %s: %s (budget %d bytes); resetting the stream",
                            proto.protocol_id, peer, exc, budget)  # fmt: skip
                self._metrics.stream_errors.labels(protocol=proto.protocol_id).inc()
                await _reset(stream)
            except (StreamProtocolError, trio.TooSlowError, BaseLibp2pError) as exc:
                log.info("%s from %s: %s; resetting the stream", proto.protocol_id, peer, exc)
                self._metrics.stream_errors.labels(protocol=proto.protocol_id).inc()
                await _reset(stream)
            else:
                await _close(stream)

        self._p2p.host.set_stream_handler(proto.protocol_id, on_stream)  # type: ignore[arg-type]

    async def _answer(
        self,
        stream: INetStream,
        peer: ID,
        proto: StreamProtocol,
        handler: Handler,
        data: bytes,
    ) -> None:
        try:
            request: Any = decode(data)
            if not isinstance(request, proto.requests):
                kinds = ", ".join(r.KIND for r in proto.requests)
                raise CodecError(f"expected {kinds}, got {request.KIND}")
        except CodecError as exc:
            reply: Any = error_reply("bad_request", str(exc))
        else:
            self._metrics.stream_requests.labels(proto.protocol_id, request.KIND, "in").inc()
            try:
                reply = await handler(peer, request)
            except StreamProtocolError as exc:
                reply = error_reply("refused", str(exc))
            except Exception:  # a handler bug answers "internal", the node keeps serving
                log.exception("%s handler failed", proto.protocol_id)
                reply = error_reply("internal", "internal error")
        try:
            data = encode(reply)
        except CodecError as exc:  # a handler bug too: a reply over its kind's limit
            log.error("%s handler replied what cannot be sent: %s", proto.protocol_id, exc)
            data = encode(error_reply("internal", "internal error"))
        await write_frame(stream, data)

    async def request(
        self,
        peer: ID,
        proto: StreamProtocol,
        record: Any,
        reply_type: type[R],
        *,
        max_reply_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> R:
        """Send one request and return the decoded reply (StreamProtocolError otherwise)."""
        session = StreamSession(self, peer, proto)
        try:
            return await session.request(
                record, reply_type, max_reply_bytes=max_reply_bytes, timeout_s=timeout_s
            )
        finally:
            await session.aclose()

    async def _open(self, peer: ID, proto: StreamProtocol) -> INetStream:
        # py-libp2p refuses to redial a peer for 60 s after a failed dial; callers
        # have their own retry policy, so lift that block first.
        cast(Any, self._p2p.host.get_network()).unblock_peer(peer)
        known = self._resolve(peer)
        direct = [a for a in known if not is_circuit(a)]
        if direct:
            self._p2p.host.get_peerstore().add_addrs(peer, direct, RESOLVED_ADDR_TTL_S)
        relayed = len(direct) < len(known) and self._connect is not None
        if relayed and peer not in self._p2p.host.get_connected_peers():
            await self._dial(peer, known)  # behind a NAT: through its relay first
        try:
            stream: INetStream = await self._p2p.host.new_stream(peer, [proto.protocol_id])  # type: ignore[list-item]
        except BaseLibp2pError as exc:
            if not relayed:
                raise StreamOpenError(f"cannot open {proto.protocol_id} to {peer}: {exc}"
                                      ) from None  # fmt: skip
            await self._dial(peer, known)  # direct failed: through a relay
            try:
                stream = await self._p2p.host.new_stream(peer, [proto.protocol_id])  # type: ignore[list-item]
            except BaseLibp2pError as exc2:
                raise StreamOpenError(f"cannot open {proto.protocol_id} to {peer}: "
                                      f"{exc2}") from None  # fmt: skip
        return stream

    async def _dial(self, peer: ID, addrs: list[Any]) -> None:
        assert self._connect is not None
        try:
            await self._connect(PeerInfo(peer, addrs), DIAL_TIMEOUT_S)
        except Exception as exc:  # py-libp2p raises many unrelated types on dial failure
            raise StreamOpenError(f"cannot reach {peer}: {exc}") from None

    def count_out(self, proto: StreamProtocol, record: Any) -> None:
        self._metrics.stream_requests.labels(proto.protocol_id, record.KIND, "out").inc()

    def session(self, peer: ID, proto: StreamProtocol) -> StreamSession:
        return StreamSession(self, peer, proto)


def _decode_reply(data: bytes, reply_type: type[R], peer: ID, proto: StreamProtocol) -> R:
    try:
        reply: Any = decode(data)
    except CodecError as exc:
        raise StreamProtocolError(f"{proto.protocol_id} reply from {peer}: {exc}") from None
    if isinstance(reply, ErrorReply):
        raise StreamProtocolError(f"{peer} answered {reply.code}: {reply.message}")
    if not isinstance(reply, reply_type):
        raise StreamProtocolError(f"{peer} answered a {type(reply).__name__}")
    return reply


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except BaseLibp2pError as exc:
            log.debug("stream reset failed: %s", exc)


async def _close(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()
        except BaseLibp2pError as exc:
            log.debug("stream close failed: %s", exc)


class StreamSession:
    """Requests, one after another, on one stream: ``StreamService.request`` uses one per
    request; a protocol with ``keep_open_s`` serves several on the same stream (no stream
    setup per request). A request that would take the stream past the protocol's byte
    budget goes on a fresh stream (the remote's state is keyed by the records, not the
    stream)."""

    def __init__(self, service: StreamService, peer: ID, proto: StreamProtocol) -> None:
        self._service = service
        self._peer = peer
        self._proto = proto
        self._stream: INetStream | None = None
        self._sent = 0  # bytes sent on the current stream
        self._lock = trio.Lock()

    async def request(
        self,
        record: Any,
        reply_type: type[R],
        *,
        max_reply_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> R:
        """Send ``record`` and return the decoded reply (StreamProtocolError otherwise);
        the stream is opened on first use and reset after any failure."""
        limit = max_reply_bytes or reply_type.MAX_BYTES  # type: ignore[attr-defined]
        proto, peer = self._proto, self._peer
        request = encode(record)
        async with self._lock:
            if self._sent + HEADER.size + len(request) > self._service.budget(proto):
                await self.aclose()
            with trio.move_on_after(timeout_s or proto.timeout_s) as scope:
                if self._stream is None:
                    self._stream = await self._service._open(peer, proto)
                    self._sent = 0
                try:
                    self._sent += HEADER.size + len(request)
                    self._service.count_out(proto, record)
                    await write_frame(self._stream, request)
                    data = await read_frame(self._stream, max(limit, ErrorReply.MAX_BYTES))
                except BaseLibp2pError as exc:
                    await self._reset()
                    raise StreamProtocolError(f"{proto.protocol_id} to {peer}: {exc}") from None
                except BaseException:
                    await self._reset()
                    raise
            if scope.cancelled_caught:
                await self._reset()
                raise StreamProtocolError(f"{proto.protocol_id} to {peer}: no reply in time")
        return _decode_reply(data, reply_type, peer, proto)

    @property
    def is_open(self) -> bool:
        """Whether a stream is open (a failed request resets it)."""
        return self._stream is not None

    async def _reset(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await _reset(stream)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await _close(stream)
