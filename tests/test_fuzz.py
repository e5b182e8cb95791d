"""Property tests (hypothesis) of every decoder a peer or a client reaches.

Arbitrary input gives the module's typed error (``CodecError``, ``StreamProtocolError``,
``FrameError``, a JSON-RPC error object), never another exception, a crash or a hang:

- codec messages: ``decode`` over arbitrary bytes, arbitrary msgpack values and, for every
  registered kind, well-formed maps with mutated fields (wrong types, huge ints, nested
  junk, NaN/inf, too-long strings, missing and unknown fields);
- stream frames: ``read_frame`` and the serving loop of a session protocol over a fake
  stream fed arbitrary bytes (oversized length prefixes, truncated frames, resets, stalls);
- tensor frames and the shard wire: ``TensorFrame.check``/``to_tensor`` and the
  ``ShardStep``/``ShardOutput`` records a pipeline hop turns into tensors (the training
  wire is msgpack records only: covered by the per-kind codec property);
- RPC bodies: ``Dispatcher.handle`` over arbitrary bytes and arbitrary JSON.

Each property is a ``Target`` (a strategy and a check): the tests run them derandomized
with few examples; ``bench/fuzz.py`` runs the same targets for minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast, get_args, get_origin

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID

import vcoind.node  # noqa: F401  (registers every wire kind the daemon speaks)
from vcoind.compute.frames import ITEM_SIZES, MAX_DIM, FrameError, TensorFrame
from vcoind.compute.shardwire import ShardClose, ShardOpen, ShardOutput, ShardStep
from vcoind.metrics import NodeMetrics
from vcoind.p2p import codec
from vcoind.p2p.codec import decode, encode
from vcoind.p2p.errors import CodecError
from vcoind.p2p.host import P2PHost
from vcoind.p2p.streams import (
    HEADER,
    Ack,
    ErrorReply,
    StreamProtocol,
    StreamProtocolError,
    StreamService,
    _EndOfStream,
    read_frame,
)
from vcoind.rpc import INVALID_REQUEST, PARSE_ERROR, MethodRegistry, Param, RPCError, RPCMethod
from vcoind.rpc.dispatch import Dispatcher

KINDS = sorted(codec.kinds())


@dataclass(frozen=True)
class Target:
    """One property: ``check(value)`` must hold for every ``value`` the strategy draws."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    examples: int  # in the test suite; bench/fuzz.py runs many more


def run(target: Target, cfg: settings, at_seed: int | None = None) -> None:
    """Run one target under ``cfg`` (hypothesis raises the shrunk failing example)."""

    @cfg
    @given(target.strategy)
    def prop(value: Any) -> None:
        target.check(value)

    (prop if at_seed is None else seed(at_seed)(prop))()


def suite_settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip


# --- junk: what a hostile encoder can put in msgpack ------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]
)
LONG = st.sampled_from(["x" * 5000, "\u20ac" * 2000, "\x00" * 300, "\u00e9" * 257])
SCALARS = st.one_of(
    st.none(), st.booleans(), INT64, st.sampled_from([-(2**63), 2**63 - 1, 2**64 - 1]),
    FLOATS, st.text(max_size=24), st.binary(max_size=24), LONG, st.just(b"\xff" * 5000),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)  # fmt: skip
KEYS = st.one_of(st.text(max_size=12), st.binary(max_size=6), st.integers(-5, 5))
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def pack(value: Any) -> bytes:
    return cast(bytes, msgpack.packb(value, use_bin_type=True))


# --- well-formed records, then mutated -------------------------------------------------


def _text(meta: dict[str, Any]) -> st.SearchStrategy[str]:
    max_len = meta.get("max_len", codec.DEFAULT_MAX_STR)
    if "choices" in meta:
        return st.sampled_from(list(meta["choices"]))
    if "pattern" in meta:
        return st.from_regex(meta["pattern"], fullmatch=True).filter(lambda s: len(s) <= max_len)
    return st.text(max_size=min(max_len, 80))


def valid(tp: Any, meta: dict[str, Any], mutate: bool = False) -> st.SearchStrategy[Any]:
    """Values of a record field's type within its limits (what an honest encoder sends);
    ``mutate``: nested records are mutated (``record_map``)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return st.none() | valid(inner, meta, mutate)
    if origin is tuple:
        item = valid(get_args(tp)[0], meta.get("items", {}), mutate)
        lo = meta.get("min_len", 0)
        return st.lists(item, min_size=lo, max_size=max(lo, min(meta.get("max_len", 64), 3)))
    if dataclasses.is_dataclass(tp):
        cls = cast(type[Any], tp)
        return record_map(cls, nested=True) if mutate else valid_map(cls)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(meta.get("min", -(2**63)), meta.get("max", 2**64 - 1))
    if tp is float:
        lo, hi = meta.get("min"), meta.get("max")
        return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)
    if tp is str:
        return _text(meta)
    if tp is bytes:
        if "exact_len" in meta:
            return st.binary(min_size=meta["exact_len"], max_size=meta["exact_len"])
        return st.binary(max_size=min(meta.get("max_len", codec.DEFAULT_MAX_STR), 80))
    raise TypeError(f"no strategy for {tp!r}")


def edge(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values just past a field's limits (lengths past 64 KiB: the size check covers them)."""
    out: list[Any] = [None]
    if "min" in meta:
        out += [meta["min"] - 1, float(meta["min"]) - 1e-9]
    if "max" in meta:
        out += [meta["max"] + 1, float(meta["max"]) * 2 + 1]
    n = meta.get("max_len", codec.DEFAULT_MAX_STR if tp in (str, bytes) else 64) + 1
    if n <= 1 << 16:
        out += ["a" * n, b"a" * n] if tp in (str, bytes) else [[0] * n]
    if "exact_len" in meta:
        out.append(b"\x00" * (meta["exact_len"] - 1))
    if "min_len" in meta:
        out.append([])
    return st.sampled_from(out)


def field_value(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly valid; sometimes junk or just past the limits."""
    good = valid(tp, meta, mutate=True)
    return st.one_of(good, good, good, good, good, good, good, good, JUNK, edge(tp, meta))


def valid_map(cls: type[Any]) -> st.SearchStrategy[dict[str, Any]]:
    hints = codec._hints(cls)
    return st.fixed_dictionaries({f.name: valid(hints[f.name], dict(f.metadata))
                                  for f in dataclasses.fields(cls)})  # fmt: skip


_RECORD_MAPS: dict[tuple[type[Any], bool], st.SearchStrategy[dict[Any, Any]]] = {}


def record_map(cls: type[Any], nested: bool = False) -> st.SearchStrategy[dict[Any, Any]]:
    """A record of ``cls`` as a wire map, fields mutated; some dropped, some unknown added."""
    made = _RECORD_MAPS.get((cls, nested))
    if made is None:
        made = _RECORD_MAPS[cls, nested] = _record_map(cls, nested)
    return made


def _record_map(cls: type[Any], nested: bool) -> st.SearchStrategy[dict[Any, Any]]:
    hints = codec._hints(cls)
    fields = {f.name: field_value(hints[f.name], dict(f.metadata))
              for f in dataclasses.fields(cls)}  # fmt: skip
    envelope: dict[str, st.SearchStrategy[Any]] = {}
    if not nested:
        version = cls.VERSION
        versions = [version] * 3 + [version + 1, float(version), True, None, str(version)]
        envelope = {"kind": st.just(cls.KIND), "version": st.sampled_from(versions)}
    names = sorted(fields)

    @st.composite
    def build(draw: st.DrawFn) -> dict[Any, Any]:
        body: dict[Any, Any] = {k: draw(s) for k, s in {**envelope, **fields}.items()}
        if names and draw(st.integers(0, 9)) == 0:
            body.pop(draw(st.sampled_from(names)))
        if draw(st.integers(0, 9)) == 0:
            body[draw(KEYS)] = draw(JUNK)
        return body

    return build()


def check_decoded(data: bytes, expect: type[Any] | None = None) -> Any:
    """Decode must give a registered record or a CodecError; a record re-encodes to itself."""
    try:
        msg = decode(data, expect)
    except CodecError:
        return None
    cls = type(msg)
    assert codec.kinds()[cls.KIND] is cls
    assert type(msgpack.unpackb(data, strict_map_key=False)["version"]) is int  # not True, 1.0
    assert expect is None or cls is expect
    try:
        again = encode(msg)
    except CodecError:  # a denser encoding than ours can fit a kind's limit when ours does not
        return msg
    assert decode(again) == msg
    return msg


def _codec_bytes(data: bytes) -> None:
    check_decoded(data)


def _codec_msgpack(value: Any) -> None:
    check_decoded(pack(value))


def _codec_kind(value: tuple[str, dict[Any, Any]]) -> None:
    kind, body = value
    data = pack(body)
    cls = codec.kinds()[kind]
    check_decoded(data)
    check_decoded(data, cls)


KIND_MAPS = st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), record_map(
    codec.kinds()[k])))  # fmt: skip
ANY_KIND_MSGPACK = (
    st.fixed_dictionaries(
        {"kind": st.sampled_from(KINDS) | st.text(max_size=8), "version": JUNK},
        optional={"task_id": JUNK, "peer_id": JUNK, "items": JUNK, "data": JUNK},
    )
    | JUNK
)

CODEC_BYTES = Target("codec_bytes", st.binary(max_size=512), _codec_bytes, 200)
CODEC_MSGPACK = Target("codec_msgpack", ANY_KIND_MSGPACK, _codec_msgpack, 150)
CODEC_KINDS = Target("codec_kinds", KIND_MAPS, _codec_kind, 300)


@example(pack({"kind": "ack", "version": True}))  # a boolean is not version 1
@example(pack({"kind": "ack", "version": 1.0}))  # nor is a float
@suite_settings(CODEC_BYTES.examples)
@given(CODEC_BYTES.strategy)
def test_codec_arbitrary_bytes(data: bytes) -> None:
    _codec_bytes(data)


def test_codec_arbitrary_msgpack() -> None:
    run(CODEC_MSGPACK, suite_settings(CODEC_MSGPACK.examples))


def test_codec_every_kind_mutated() -> None:
    assert len(KINDS) >= 31  # heartbeat, market, votes, oracle, training, shards, streams
    run(CODEC_KINDS, suite_settings(CODEC_KINDS.examples))


@pytest.mark.parametrize("kind", KINDS)
def test_codec_each_kind_valid_maps_decode(kind: str) -> None:
    """The mutating strategy also makes plenty of valid records: an unmutated map decodes."""
    cls = codec.kinds()[kind]

    @suite_settings(8)
    @given(valid_map(cls))
    def prop(fields: dict[str, Any]) -> None:
        data = pack({**fields, "kind": kind, "version": cls.VERSION})
        if len(data) <= cls.MAX_BYTES:
            assert check_decoded(data, cls) is not None

    prop()


# --- stream frames ---------------------------------------------------------------------

PEER = ID(b"\x00\x24\x08\x01\x12\x20" + bytes(32))


class FakeStream:
    """The part of a libp2p stream the framing uses, reading scripted chunks; at the end
    it reports EOF, a reset, or stalls forever."""

    def __init__(self, chunks: Sequence[bytes], end: str) -> None:
        self._chunks = deque(c for c in chunks if c)
        self._end = end
        self.consumed = 0
        self.written = bytearray()
        self.outcome = "open"
        self.muxed_conn = types.SimpleNamespace(peer_id=PEER)

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._chunks:
            chunk = self._chunks.popleft()
            out, rest = (chunk, b"") if n is None else (chunk[:n], chunk[n:])
            if rest:
                self._chunks.appendleft(rest)
            self.consumed += len(out)
            return out
        if self._end == "reset":
            raise StreamReset("reset by the peer")
        if self._end == "eof_exc":  # what py-libp2p does at the end
            raise StreamEOF()
        if self._end == "stall":
            await trio.sleep_forever()
        return b""

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data

    async def reset(self) -> None:
        self.outcome = "reset"

    async def close(self) -> None:
        self.outcome = "closed"


def frames_of(buf: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(buf):
        (n,) = HEADER.unpack_from(buf, at)
        out.append(buf[at + 4 : at + 4 + n])
        at += 4 + n
    assert at == len(buf)
    return out


def frame(body: bytes, declared: int | None = None) -> bytes:
    return HEADER.pack(len(body) if declared is None else declared) + body


RECORDS = st.one_of(
    st.builds(ShardClose, st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
    st.builds(ShardOpen, st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.text(max_size=71),
              st.integers(0, 10_000), st.integers(0, 10_000)),
    st.builds(Ack),
).map(encode)  # fmt: skip
FRAME_PARTS = st.one_of(
    RECORDS.map(frame),  # a well-formed request
    st.binary(max_size=40).map(frame),  # a frame of junk
    st.tuples(st.binary(max_size=40), st.sampled_from([0, 1, 4, 100, 2**31, 2**32 - 1])).map(
        lambda t: frame(*t)
    ),  # a length prefix that lies
    st.binary(max_size=6),  # raw bytes between frames
)


@st.composite
def scripted(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """A byte string made of frame parts, cut into chunks at arbitrary points."""
    data = b"".join(draw(st.lists(FRAME_PARTS, max_size=6)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, draw(st.sampled_from(["eof", "eof_exc", "reset", "stall"]))


MAX_FRAME = 256


async def _read_all(chunks: list[bytes], end: str) -> None:
    stream = FakeStream(chunks, "eof" if end == "stall" else end)
    data = b"".join(chunks)
    got: list[bytes] = []
    with trio.fail_after(5):
        while True:
            try:
                got.append(await read_frame(cast(Any, stream), MAX_FRAME))
            except _EndOfStream:  # only between two frames, after every byte
                assert b"".join(frame(f) for f in got) == data
                return
            except StreamProtocolError:
                assert all(len(f) <= MAX_FRAME for f in got)
                assert data.startswith(b"".join(frame(f) for f in got))
                return


def _read_frames(value: tuple[list[bytes], str]) -> None:
    trio.run(_read_all, *value)


READ_FRAMES = Target("read_frame", scripted(), _read_frames, 150)


@example(([frame(b"abcd")[:4]], "eof"))  # a 4-byte body cut off is not a clean end
@example(([frame(b"abcd")[:4]], "eof_exc"))
@suite_settings(READ_FRAMES.examples)
@given(READ_FRAMES.strategy)
def test_read_frame_arbitrary_bytes(value: tuple[list[bytes], str]) -> None:
    _read_frames(value)


# The serving loop of a session protocol (like /vcoin/shard/1.0.0) over a fake stream.
SESSION = StreamProtocol("/vcoin/fuzz-session/1.0.0", (ShardOpen, ShardClose),
                         max_request_bytes=MAX_FRAME, timeout_s=5, keep_open_s=10,
                         max_stream_bytes=600)  # fmt: skip


async def _session_handler(peer: ID, record: Any) -> Any:
    if isinstance(record, ShardClose):
        return Ack()
    if record.start > record.end:  # a refusal quoting the peer's whole request
        raise StreamProtocolError(f"bad span in {record!r} " * 20)
    raise RuntimeError("a handler bug")


async def _serve(chunks: list[bytes], end: str) -> FakeStream:
    handlers: dict[str, Any] = {}
    host = types.SimpleNamespace(set_stream_handler=handlers.__setitem__)
    service = StreamService(cast(P2PHost, types.SimpleNamespace(host=host)), METRICS)
    service.serve(SESSION, _session_handler)
    stream = FakeStream(chunks, end)
    with trio.fail_after(3600):  # virtual time: every timeout of the loop fires at once
        await handlers[SESSION.protocol_id](stream)
    assert stream.outcome in ("closed", "reset")
    assert stream.consumed <= SESSION.stream_budget + HEADER.size
    for reply in frames_of(bytes(stream.written)):
        assert isinstance(decode(reply), Ack | ErrorReply)
    return stream


def _serve_session(value: tuple[list[bytes], str]) -> None:
    trio.run(_serve, *value, clock=trio.testing.MockClock(autojump_threshold=0))


METRICS = NodeMetrics()
SERVE_SESSION = Target("serve_session", scripted(), _serve_session, 150)
_REFUSED = frame(encode(ShardOpen("0" * 32, "m", 2, 1)))


@example(([_REFUSED], "eof"))  # a refusal too long for an ErrorReply
@example(([frame(encode(ShardClose("0" * 32)))] * 30, "eof"))  # past the stream's budget
@suite_settings(SERVE_SESSION.examples)
@given(SERVE_SESSION.strategy)
def test_session_loop_arbitrary_bytes(value: tuple[list[bytes], str]) -> None:
    _serve_session(value)


def session_errors() -> str:
    key = f'vcoin_stream_errors_total{{protocol="{SESSION.protocol_id}"}}'
    return next((ln for ln in METRICS.render().decode().splitlines() if ln.startswith(key)), "")


def test_session_closed_by_the_peer_between_frames_is_no_error() -> None:
    before = session_errors()
    for end in ("eof", "eof_exc"):
        closes = [frame(encode(ShardClose("0" * 32)))] * 2
        stream = trio.run(_serve, closes, end, clock=trio.testing.MockClock(autojump_threshold=0))
        assert stream.outcome == "closed"
        assert [decode(f) for f in frames_of(bytes(stream.written))] == [Ack(), Ack()]
    assert session_errors() == before


# --- tensor frames and the shard wire ---------------------------------------------------

DTYPES = st.sampled_from(sorted(ITEM_SIZES)) | st.text(max_size=10)
DIMS = st.integers(0, 5) | st.sampled_from([-1, MAX_DIM, MAX_DIM + 1, 2**40])


@st.composite
def tensor_frames(draw: st.DrawFn) -> TensorFrame:
    """Mostly consistent frames (the right number of bytes), sometimes not."""
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(DIMS, max_size=5)))
    want = math.prod(shape) * ITEM_SIZES.get(dtype, 1)
    if 0 <= want <= 4096 and draw(st.integers(0, 3)):
        data = draw(st.binary(min_size=want, max_size=want))
    else:
        data = draw(st.binary(max_size=64))
    return TensorFrame(dtype, shape, data)


def _tensor_frame(f: TensorFrame) -> None:
    try:
        t = f.to_tensor(max_bytes=1 << 20)
    except FrameError:
        return
    assert tuple(t.shape) == f.shape
    assert TensorFrame.from_tensor(t) == f


def _shard_record(value: tuple[bool, TensorFrame, float]) -> None:
    step, f, compute_s = value
    record: Any = (ShardStep("0" * 32, 0, f.dtype, cast(Any, f.shape), f.data) if step
                   else ShardOutput(f.dtype, cast(Any, f.shape), f.data, compute_s))  # fmt: skip
    try:
        data = encode(record)
    except CodecError:
        return
    got = check_decoded(data)
    if got is not None:
        _tensor_frame(TensorFrame(got.dtype, tuple(got.shape), got.data))


TENSOR_FRAMES = Target("tensor_frame", tensor_frames(), _tensor_frame, 100)
SHARD_RECORDS = Target("shard_wire", st.tuples(st.booleans(), tensor_frames(), FLOATS),
                       _shard_record, 60)  # fmt: skip


@example(TensorFrame("float32", (0, MAX_DIM, MAX_DIM, MAX_DIM), b""))  # strides overflow
@example(TensorFrame("float32", (MAX_DIM, MAX_DIM, MAX_DIM, 0), b""))  # storage overflows
@suite_settings(TENSOR_FRAMES.examples)
@given(TENSOR_FRAMES.strategy)
def test_tensor_frames(f: TensorFrame) -> None:
    _tensor_frame(f)


def test_shard_wire_frames() -> None:
    run(SHARD_RECORDS, suite_settings(SHARD_RECORDS.examples))


# --- RPC bodies ------------------------------------------------------------------------


async def _echo(params: dict[str, Any]) -> Any:
    return params


async def _refuse(params: dict[str, Any]) -> Any:
    raise RPCError(-32004, "not found", {"unserialisable": {1, 2}})


async def _bug(params: dict[str, Any]) -> Any:
    raise KeyError("a handler bug")


def rpc_registry() -> MethodRegistry:
    reg = MethodRegistry()
    params = (
        Param("text", {"type": "string", "maxLength": 16, "pattern": "[a-z]*"}),
        Param("n", {"type": "integer", "minimum": 0, "maximum": 100}),
        Param("x", {"type": ["number", "null"]}),
        Param("tags", {"type": "array", "maxItems": 4, "items": {"type": "string"}}),
        Param("mode", {"enum": ["a", 1, True]}),
        Param("obj", {"type": "object"}),
    )
    reg.add(RPCMethod("echo", "Echo the params.", params, {}, _echo))
    reg.add(RPCMethod("need", "A required param.", (Param("n", {"type": "integer"},
                                                          required=True),), {}, _echo))  # fmt: skip
    reg.add(RPCMethod("refuse", "An RPCError.", (), {}, _refuse))
    reg.add(RPCMethod("bug", "A handler bug.", (), {}, _bug))
    return reg


DISPATCHER = Dispatcher(rpc_registry(), max_batch=8, on_call=lambda name, outcome: None)
METHOD_NAMES = ["echo", "need", "refuse", "bug", "nope", "rpc.discover", ""]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**4299, -(10**4299)])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0]) | JSON,
        "method": st.sampled_from(METHOD_NAMES) | JSON,
        "params": st.fixed_dictionaries({}, optional={"text": JSON, "n": JSON, "x": JSON,
                                                      "tags": JSON, "mode": JSON, "obj": JSON})
                  | st.lists(JSON, max_size=7) | JSON,
        "id": st.integers() | st.text(max_size=8) | st.none() | JSON,
    },
)  # fmt: skip


def _nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "array" else ('{"a":' * depth + "1" + "}" * depth)


BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    JSON.map(json.dumps).map(str.encode),
    REQUEST.map(json.dumps).map(str.encode),
    st.lists(REQUEST, max_size=10).map(json.dumps).map(str.encode),
    st.tuples(st.integers(1, 200_000), st.sampled_from(["array", "object"])).map(
        lambda t: _nested(*t).encode()
    ),
    st.sampled_from(
        [
            b"NaN",
            b'{"id": Infinity}',
            b"[-Infinity]",
            b"\xef\xbb\xbf{}",
            '{"id":1}'.encode("utf-16"),
            b'{"jsonrpc":"2.0","method":"echo","id":1,'
            b'"params":{"obj":' + b"[" * 900 + b"]" * 900 + b"}}",
        ]
    ),
)


def _is_reply(obj: Any) -> bool:
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0" or "id" not in obj:
        return False
    if "error" in obj:
        err = obj["error"]
        return ("result" not in obj and isinstance(err, dict) and isinstance(err.get("code"), int)
                and isinstance(err.get("message"), str))  # fmt: skip
    return "result" in obj


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _rpc_body(body: bytes) -> None:
    reply = trio.run(DISPATCHER.handle, body)
    try:
        payload = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
        assert reply is not None
        assert json.loads(reply)["error"]["code"] == PARSE_ERROR
        return
    if reply is None:  # only notifications: nothing to answer
        items = payload if isinstance(payload, list) else [payload]
        assert items and all(isinstance(i, dict) and "id" not in i for i in items)
        return
    out = json.loads(reply)
    if isinstance(payload, list) and payload and len(payload) <= 8:
        assert isinstance(out, list) and out and all(_is_reply(o) for o in out)
    else:
        assert _is_reply(out)
        if not isinstance(payload, dict):
            assert out["error"]["code"] == INVALID_REQUEST


RPC_BODIES = Target("rpc_body", BODIES, _rpc_body, 200)


def test_rpc_bodies() -> None:
    run(RPC_BODIES, suite_settings(RPC_BODIES.examples))


TARGETS: tuple[Target, ...] = (CODEC_BYTES, CODEC_MSGPACK, CODEC_KINDS, READ_FRAMES,
                               SERVE_SESSION, TENSOR_FRAMES, SHARD_RECORDS, RPC_BODIES)  # fmt: skip
