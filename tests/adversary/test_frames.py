"""A hostile peer abuses the framing of direct streams on a real daemon.

- ``/vcoin/shard/1.0.0`` is a session protocol (several requests per stream): the peer
  keeps sending frames on one stream, past the stream's byte budget. The daemon resets
  the stream (counted in ``vcoin_stream_errors_total``, logged) and keeps serving.
- ``/vcoin/task/1.0.0``: a length prefix of 4 GiB, a frame cut off, a half frame left
  stalled. Each stream is reset or left to its timeout; the daemon keeps serving.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from tests.adversary.hostile import Hostile, hostile, in_thread
from tests.conftest import Cluster, wait_until
from vcoind.compute.service import SHARD_STREAM
from vcoind.compute.shardwire import SHARD_PROTOCOL, ShardClose, ShardStep
from vcoind.datadir import DataDir
from vcoind.market.messages import TASK_PROTOCOL, Cancel
from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import decode, encode
from vcoind.p2p.keeper import parse_peer_addr
from vcoind.p2p.streams import (
    HEADER,
    Ack,
    ErrorReply,
    StreamProtocolError,
    StreamService,
    read_frame,
)

pytestmark = pytest.mark.slow

BUDGET = 64 * 1024  # the daemon's p2p.max_stream_bytes in these tests
STEP_DATA = 16 * 1024


def stream_errors(node: Any, protocol: str) -> float:
    req = urllib.request.Request(node.info["rpc_url"] + "/metrics")
    req.add_header("Authorization", f"Bearer {DataDir(node.datadir).read_cookie()}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    key = f'vcoin_stream_errors_total{{protocol="{protocol}"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(key)), key + "0")
    return float(line.split()[-1])


async def open_stream(h: Hostile, node: Any, protocol: str) -> INetStream:
    stream: INetStream = await h.p2p.host.new_stream(parse_peer_addr(node.p2p_addr).peer_id,
                                                     [protocol])  # type: ignore[list-item]  # fmt: skip
    return stream


async def send(stream: INetStream, data: bytes) -> None:
    await stream.write(HEADER.pack(len(data)) + data)


async def reply_of(stream: INetStream) -> Any:
    with trio.fail_after(20):
        return decode(await read_frame(stream, 64 * 1024))


async def still_serving(h: Hostile, node: Any) -> None:
    """A fresh shard session and a task request are answered; RPC works."""
    s = await open_stream(h, node, SHARD_PROTOCOL)
    await send(s, encode(ShardClose("0" * 32)))
    assert isinstance(await reply_of(s), Ack)
    await s.close()
    t = await open_stream(h, node, TASK_PROTOCOL)
    await send(t, encode(Cancel("0" * 32, 1)))
    assert isinstance(await reply_of(t), Ack | ErrorReply)
    info = await in_thread(node.rpc.call, "vcoin_nodeInfo")
    assert info["peer_id"] == node.info["peer_id"]


@pytest.fixture
def node(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("VCOIN_P2P_MAX_STREAM_BYTES", str(BUDGET))
    return cluster.start(1)


async def test_a_session_stream_past_its_byte_budget_is_reset(node: Any) -> None:
    step_record = ShardStep("0" * 32, 0, "float32", (STEP_DATA // 4,), b"\0" * STEP_DATA)
    step = encode(step_record)
    per_frame = HEADER.size + len(step)
    before = await in_thread(stream_errors, node, SHARD_PROTOCOL)
    async with hostile() as h:
        await h.connect(node.p2p_addr)
        s = await open_stream(h, node, SHARD_PROTOCOL)
        answered = 0
        with pytest.raises((StreamProtocolError, BaseLibp2pError)):
            for _ in range(3 * BUDGET // per_frame):  # three times the budget
                await send(s, step)
                reply = await reply_of(s)  # no session: refused, the stream stays open
                assert isinstance(reply, ErrorReply) and reply.code == "refused"
                answered += 1
        # every frame within the budget was answered; the one past it reset the stream
        assert answered == BUDGET // per_frame
        await in_thread(wait_until, lambda: stream_errors(node, SHARD_PROTOCOL) > before, 10,
                        "the reset counted in vcoin_stream_errors_total")  # fmt: skip
        assert "left of the stream's budget" in node.log_path.read_text()
        await still_serving(h, node)
        # An honest session that needs more than the budget goes on on a fresh stream.
        session = StreamService(h.p2p, NodeMetrics(), max_stream_bytes=BUDGET).session(
            parse_peer_addr(node.p2p_addr).peer_id, SHARD_STREAM
        )
        for _ in range(3 * BUDGET // per_frame):
            with pytest.raises(StreamProtocolError, match="answered refused: no session"):
                await session.request(step_record, Ack)
        await session.aclose()


async def test_oversized_cut_and_stalled_frames_on_the_task_protocol(node: Any) -> None:
    before = await in_thread(stream_errors, node, TASK_PROTOCOL)
    async with hostile() as h:
        await h.connect(node.p2p_addr)
        # A length prefix of 4 GiB: reset before a byte of it is read.
        big = await open_stream(h, node, TASK_PROTOCOL)
        await big.write(HEADER.pack(2**32 - 1) + b"\0" * 64)
        with pytest.raises((StreamProtocolError, BaseLibp2pError)):
            await reply_of(big)
        # A frame of 4 bytes cut off after its length prefix, then the peer closes: a
        # broken frame (reset), not a clean end of the stream left open.
        cut = await open_stream(h, node, TASK_PROTOCOL)
        await cut.write(HEADER.pack(4))
        await cut.close()
        with pytest.raises((StreamProtocolError, BaseLibp2pError)):
            await reply_of(cut)
        # Half frames left stalled: they wait for their timeout; meanwhile the daemon
        # serves everyone else.
        stalled = []
        for _ in range(8):
            s = await open_stream(h, node, TASK_PROTOCOL)
            await s.write(HEADER.pack(100) + b"\x81\xa4kind")
            stalled.append(s)
        await still_serving(h, node)
        await in_thread(wait_until, lambda: stream_errors(node, TASK_PROTOCOL) >= before + 2, 10,
                        "both broken frames counted")  # fmt: skip
        for s in stalled:
            await s.reset()
        await still_serving(h, node)
