"""The task protocol's dispatch table (``vcoind.market.protocol``): one handler per
record kind, registered before the stream is served; to ourselves a plain call."""

from __future__ import annotations

from typing import Any

import pytest

from vcoind.market.messages import Cancel, Progress
from vcoind.market.protocol import TASK_STREAM, TaskProtocol, task_stream
from vcoind.p2p.streams import Ack, StreamProtocolError

ME = "12D3KooWGMTdKradxYteBELvx532vsTUrd5bQwrfkKYUaNjcNDjA"
TASK = "0" * 32


class RecordingStreams:
    """What TaskProtocol asks of the stream transport: serve (recorded) and request
    (which a send to ourselves must never reach)."""

    def __init__(self) -> None:
        self.served: list[Any] = []

    def serve(self, proto: Any, handler: Any) -> None:
        self.served.append(proto)

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a send to ourselves went over the network")


async def test_send_to_self_dispatches_by_record_kind() -> None:
    seen: list[tuple[str, Any]] = []

    async def on_progress(peer: str, p: Progress) -> Ack:
        seen.append((peer, p))
        return Ack()

    proto = TaskProtocol(RecordingStreams(), ME)  # type: ignore[arg-type]
    proto.handle(Progress, on_progress)
    assert await proto.send(ME, Progress(TASK, 1, 5), Ack) == Ack()
    assert seen == [(ME, Progress(TASK, 1, 5))]
    with pytest.raises(StreamProtocolError, match="unexpected Cancel"):
        await proto.send(ME, Cancel(TASK, 1), Ack)


async def test_the_stream_accepts_every_registered_kind_and_no_late_handler() -> None:
    streams = RecordingStreams()
    proto = TaskProtocol(streams, ME)  # type: ignore[arg-type]

    async def handler(peer: str, record: Any) -> Ack:
        return Ack()

    proto.handle(Progress, handler)
    with pytest.raises(ValueError, match="already has a handler"):
        proto.handle(Progress, handler)
    proto.handle(Cancel, handler)
    proto.serve()
    (served,) = streams.served
    assert served.requests == (Progress, Cancel)
    assert served.protocol_id == TASK_STREAM.protocol_id
    assert served.max_request_bytes == max(Progress.MAX_BYTES, Cancel.MAX_BYTES)
    with pytest.raises(RuntimeError, match="before the protocol is served"):
        proto.handle(Ack, handler)
    assert task_stream().requests == TASK_STREAM.requests
