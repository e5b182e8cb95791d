"""Direct request/response protocol between two real libp2p hosts on loopback."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import Message, encode, lim, message
from vcoind.p2p.host import P2PHost, build_host, running
from vcoind.p2p.streams import (
    HEADER,
    StreamProtocol,
    StreamProtocolError,
    StreamService,
    read_frame,
    write_frame,
)


@message
@dataclass(frozen=True)
class EchoRequest(Message):
    KIND: ClassVar[str] = "test_echo"
    MAX_BYTES: ClassVar[int] = 1024
    text: str = field(metadata=lim(max_len=900))
    delay: float = field(default=0.0, metadata=lim(min=0, max=100))


@message
@dataclass(frozen=True)
class EchoReply(Message):
    KIND: ClassVar[str] = "test_echo_reply"
    MAX_BYTES: ClassVar[int] = 1024
    text: str = field(metadata=lim(max_len=900))
    peer: str = field(metadata=lim(max_len=64))


ECHO = StreamProtocol("/vcoin/test-echo/1.0.0", (EchoRequest,), max_request_bytes=1024, timeout_s=2)


async def echo(peer: ID, req: EchoRequest) -> EchoReply:
    if req.text == "boom":
        raise RuntimeError("handler bug")
    if req.text == "refuse":
        raise StreamProtocolError("not serving that")
    await trio.sleep(req.delay)
    return EchoReply(text=req.text.upper(), peer=peer.to_base58())


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[P2PHost, StreamService, P2PHost, StreamService, Any]]:
    a = build_host(create_new_key_pair(), lambda f, m: None)
    b = build_host(create_new_key_pair(), lambda f, m: None)
    ma, mb = NodeMetrics(), NodeMetrics()
    sa, sb = StreamService(a, ma), StreamService(b, mb)
    sb.serve(ECHO, echo)
    async with running(a, ["/ip4/127.0.0.1/tcp/0"]), running(b, ["/ip4/127.0.0.1/tcp/0"]):
        await a.host.connect(PeerInfo(b.peer_id, b.host.get_addrs()))
        yield a, sa, b, sb, mb


async def test_request_reply_and_errors() -> None:
    async with pair() as (a, sa, b, _sb, _mb):
        reply = await sa.request(b.peer_id, ECHO, EchoRequest("hello"), EchoReply)
        assert reply == EchoReply("HELLO", a.peer_id.to_base58())
        with pytest.raises(StreamProtocolError, match="answered internal"):
            await sa.request(b.peer_id, ECHO, EchoRequest("boom"), EchoReply)
        with pytest.raises(StreamProtocolError, match="answered refused: not serving that"):
            await sa.request(b.peer_id, ECHO, EchoRequest("refuse"), EchoReply)
        with pytest.raises(StreamProtocolError, match="no reply in time"):
            await sa.request(
                b.peer_id, ECHO, EchoRequest("slow", delay=5), EchoReply, timeout_s=0.5
            )
        # the server is still fine after all of that
        assert (await sa.request(b.peer_id, ECHO, EchoRequest("again"), EchoReply)).text == "AGAIN"


async def test_oversized_and_malformed_frames() -> None:
    async with pair() as (a, _sa, b, _sb, mb):
        stream = await a.host.new_stream(b.peer_id, [ECHO.protocol_id])
        await stream.write(HEADER.pack(50_000_000))  # declares 50 MB: never read, reset
        with pytest.raises(StreamProtocolError):
            await read_frame(stream, 1024)
        errors = mb.render().decode()
        assert 'vcoin_stream_errors_total{protocol="/vcoin/test-echo/1.0.0"} 1.0' in errors

        stream = await a.host.new_stream(b.peer_id, [ECHO.protocol_id])
        await write_frame(stream, b"\x93\x01\x02\x03")  # msgpack, but not a record
        reply = await read_frame(stream, 4096)
        assert b"bad_request" in reply

        stream = await a.host.new_stream(b.peer_id, [ECHO.protocol_id])
        await write_frame(stream, encode(EchoReply("x", "y")))  # a record of the wrong kind
        assert b"expected test_echo" in await read_frame(stream, 4096)

        stream = await a.host.new_stream(b.peer_id, [ECHO.protocol_id])
        await stream.write(struct.pack(">I", 100) + b"only part")  # then stall: timed out
        with trio.fail_after(10), pytest.raises(StreamProtocolError):
            await read_frame(stream, 4096)

        ok = await StreamService(a, NodeMetrics()).request(
            b.peer_id, ECHO, EchoRequest("still up"), EchoReply
        )
        assert ok.text == "STILL UP"


async def test_unreachable_peer_is_a_clear_error() -> None:
    async with pair() as (_a, sa, _b, _sb, _mb):
        stranger = ID.from_pubkey(create_new_key_pair().public_key)
        with pytest.raises(StreamProtocolError, match=r"cannot open|no reply"):
            await sa.request(stranger, ECHO, EchoRequest("hi"), EchoReply, timeout_s=3)
