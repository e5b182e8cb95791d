"""Wire codec: round trips and every kind of malformed message."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from eth_account import Account

from vcoind.p2p.codec import decode, encode
from vcoind.p2p.errors import CodecError
from vcoind.presence.heartbeat import BindingCheck
from vcoind.presence.messages import DeviceInfo, Heartbeat, LayerSpan, ModelServed, sign_binding

PEER = "12D3KooWEAFCy2zHaWq3TPHeHx8F35FTbdWa12zjgDUzEWrp2RmC"
ACCT = Account.from_key("0x" + "11" * 32)


def make(**over: object) -> Heartbeat:
    hb = Heartbeat(
        network="devnet",
        peer_id=PEER,
        eth_address=ACCT.address,
        eth_sig=sign_binding(ACCT.key, "devnet", PEER, ACCT.address),
        seq=7,
        timestamp=time.time(),
        interval=5.0,
        listen_addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",),
        device=DeviceInfo(
            kind="cuda",
            name="Tesla T4",
            memory_total_mb=15360,
            memory_used_mb=100,
            utilization=12.5,
            temperature_c=41.0,
            cuda_version="12.2",
        ),
        models=(ModelServed("tiny-qwen2", "sha256:" + "ab" * 32),),
        spans=(LayerSpan("tiny-qwen2", 0, 13),),
        queue_length=2,
        health=0.9,
        software="vcoind/0.1.0",
    )
    return dataclasses.replace(hb, **over)  # type: ignore[arg-type]


def raw(hb: Heartbeat) -> dict[str, object]:
    out = msgpack.unpackb(encode(hb), raw=False)
    assert isinstance(out, dict)
    return out


def pack(d: object) -> bytes:
    return bytes(msgpack.packb(d, use_bin_type=True))


def test_round_trip_is_exact() -> None:
    hb = make()
    data = encode(hb)
    assert decode(data, Heartbeat) == hb
    assert decode(data) == hb  # kind taken from the message
    body = raw(hb)
    assert body["kind"] == "heartbeat" and body["version"] == 1
    assert body["device"]["temperature_c"] == 41.0  # type: ignore[index]


def test_optional_none_round_trips() -> None:
    hb = make(device=DeviceInfo(temperature_c=None))
    assert decode(encode(hb), Heartbeat).device.temperature_c is None


def test_binding_signature_checked() -> None:
    check = BindingCheck()
    assert check(make()) is None
    other = Account.create()
    forged = make(eth_sig=sign_binding(other.key, "devnet", PEER, other.address))
    assert check(forged) == "forged"
    wrong_peer = make(eth_sig=sign_binding(ACCT.key, "devnet", PEER[:-1] + "X", ACCT.address))
    assert check(wrong_peer) == "forged"
    assert check(make(eth_sig=b"\x00" * 65)) == "forged"


def mutate(**changes: object) -> bytes:
    body = raw(make())
    for k, v in changes.items():
        if v is KeyError:
            del body[k]
        else:
            body[k] = v
    return pack(body)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (pack([1, 2, 3]), "must be a map"),
        (pack({"kind": "nope", "version": 1}), "unknown message kind"),
        (pack({"version": 1}), "unknown message kind"),
        (mutate(version=2), "unsupported version"),
        (mutate(version=KeyError), "unsupported version"),
        (mutate(seq=KeyError), "seq: missing"),
        (mutate(seq="7"), "seq: must be an integer"),
        (mutate(seq=True), "seq: must be an integer"),
        (mutate(seq=-1), "seq: must be >= 0"),
        (mutate(timestamp=float("nan")), "timestamp: must be finite"),
        (mutate(health=1.5), "health: must be <= 1"),
        (mutate(peer_id="not a peer id!"), "peer_id: bad format"),
        (mutate(eth_address="0x1234"), "eth_address: bad format"),
        (mutate(eth_sig=b"\x01" * 64), "eth_sig: must be 65 bytes"),
        (mutate(eth_sig="ab" * 65), "eth_sig: must be bytes"),
        (mutate(network="Dev Net"), "network: bad format"),
        (mutate(listen_addrs=["/ip4/1.2.3.4/tcp/1"] * 9), "listen_addrs: too many items"),
        (mutate(listen_addrs=["x" * 300]), "listen_addrs[0]: too long"),
        (mutate(listen_addrs="one"), "listen_addrs: must be an array"),
        (mutate(device={"kind": "tpu"}), "device.kind: must be one of"),
        (mutate(device=[1]), "device: must be a map"),
        (mutate(spans=[{"model": "m", "start": 0}]), "spans[0].end: missing"),
        (mutate(extra_field=1), "unknown fields"),
        (mutate(models=[1]), "models[0]: must be a map"),
        (mutate(models=[{"name": "m", "model_id": "md5:00"}]), "models[0].model_id: bad format"),
        (
            mutate(models=[{"name": "../etc", "model_id": "sha256:" + "0" * 64}]),
            "models[0].name: bad format",
        ),
    ],
)
def test_malformed_rejected(data: bytes, problem: str) -> None:
    with pytest.raises(CodecError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode(data, Heartbeat)


def test_oversized_rejected_before_parsing() -> None:
    big = mutate(software="x" * 13000)
    with pytest.raises(CodecError, match="limit 12288"):
        decode(big, Heartbeat)
    with pytest.raises(CodecError, match="limit"):
        encode(make(models=tuple(ModelServed("m" * 128, "sha256:" + "0" * 64) for _ in range(64))))


def test_deep_or_huge_containers_rejected() -> None:
    with pytest.raises(CodecError):
        decode(pack({"kind": "heartbeat", "version": 1, "models": list(range(5000))}), Heartbeat)
