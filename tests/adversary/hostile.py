"""A hostile node made of the project's own parts: a real libp2p host (``build_host``),
real pubsub and stream framing (``StreamService``), a real Ethereum key bound to its peer
id. It runs none of vcoind's rules, so a test can make it say anything a peer can say.
"""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
from eth_account import Account
from libp2p.crypto.ed25519 import create_new_key_pair

from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import Message, decode, encode
from vcoind.p2p.errors import CodecError
from vcoind.p2p.gossip import topic_name
from vcoind.p2p.host import P2PHost, build_host, running
from vcoind.p2p.keeper import parse_peer_addr
from vcoind.p2p.streams import StreamProtocol, StreamService
from vcoind.presence.messages import Heartbeat, sign_binding

R = TypeVar("R")


@dataclasses.dataclass
class Hostile:
    p2p: P2PHost
    streams: StreamService
    network: str
    account: Any  # eth_account LocalAccount: the key its binding names
    _seq: int = 0
    subs: dict[str, Any] = dataclasses.field(default_factory=dict)  # topic name -> queue
    bids: list[Any] = dataclasses.field(default_factory=list)  # Bids sent to us directly
    _bid_in: trio.Event = dataclasses.field(default_factory=trio.Event)
    _serving_bids: bool = False

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    @property
    def eth_address(self) -> str:
        return str(self.account.address)

    def topic(self, name: str) -> str:
        return topic_name(self.network, name)

    def seq(self) -> int:
        """A fresh gossip sequence number (a replayed one is rejected)."""
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        return self._seq

    async def connect(self, p2p_addr: str) -> str:
        """Dial a node by its multiaddr; returns its peer id."""
        info = parse_peer_addr(p2p_addr)
        await self.p2p.host.connect(info)
        return info.peer_id.to_base58()

    async def join(self, p2p_addr: str, *names: str) -> str:
        """Connect and subscribe to topics (``heartbeat``, ``tasks``, ``votes``), waiting
        until the node sees the subscriptions; returns the node's peer id."""
        info = parse_peer_addr(p2p_addr)
        await self.p2p.host.connect(info)
        for name in names:
            if name not in self.subs:
                self.subs[name] = await self.p2p.pubsub.subscribe(self.topic(name))
            await self.p2p.pubsub.wait_for_subscription(info.peer_id, self.topic(name))
        return info.peer_id.to_base58()

    async def next_record(self, name: str) -> Any:
        """The next record gossiped on a joined topic (decoded; junk is skipped)."""
        while True:
            msg = await self.subs[name].get()
            try:
                return decode(msg.data)
            except CodecError:
                continue

    async def publish(self, name: str, record: Message | bytes) -> None:
        data = record if isinstance(record, bytes) else encode(record)
        await self.p2p.pubsub.publish(self.topic(name), data)

    def heartbeat(self, **over: Any) -> Heartbeat:
        """A valid heartbeat binding this host to its Ethereum key (``over`` changes fields)."""
        hb = Heartbeat(
            network=self.network,
            peer_id=self.peer_id,
            eth_address=self.eth_address,
            eth_sig=sign_binding(self.account.key, self.network, self.peer_id, self.eth_address),
            seq=self.seq(),
            timestamp=time.time(),
            interval=0.3,
        )
        return dataclasses.replace(hb, **over)

    async def bids_from(
        self, node: str, model: str, *task_ids: str, task_type: str = "inference"
    ) -> None:
        """Announce tasks as their origin and wait for ``node``'s bid on them (a node takes
        an assignment or a training join only for a task it bid on, from its origin). The
        caller has joined the ``tasks`` topic; bids come to us on the bid protocol, which
        this serves from the first call on."""
        from vcoind.market.messages import AnnouncedTask, TaskAnnounce

        self.serve_bids()
        tasks = tuple(AnnouncedTask(t, model, 2, 0, task_type=task_type) for t in task_ids)
        await self.publish("tasks", TaskAnnounce(self.network, self.peer_id, self.seq(),
                                                 time.time(), tasks))  # fmt: skip
        want = set(task_ids)
        with trio.fail_after(30):
            while True:
                for rec in self.bids:
                    if rec.peer_id == node and rec.origin == self.peer_id:
                        want -= {o.task_id for o in rec.offers}
                if not want:
                    return
                await self._bid_in.wait()

    def serve_bids(self) -> None:
        """Take the bids nodes send us on the bid protocol (into ``bids``)."""
        from vcoind.market.messages import Ack
        from vcoind.market.protocol import BID_STREAM

        async def take(peer: Any, bid: Any) -> Ack:
            self.bids.append(bid)
            self._bid_in.set()
            self._bid_in = trio.Event()
            return Ack()

        if not self._serving_bids:
            self._serving_bids = True
            self.streams.serve(BID_STREAM, take)

    async def offered_training(self, node: str, model: str, *task_ids: str) -> None:
        """``bids_from`` for ``lora_training`` tasks (``node`` offered to train them)."""
        await self.bids_from(node, model, *task_ids, task_type="lora_training")

    async def request(
        self, peer_id: str, proto: StreamProtocol, record: Any, reply_type: type[R], **kw: Any
    ) -> R:
        """One request on a direct stream, framed as vcoind frames it."""
        from libp2p.peer.id import ID

        return await self.streams.request(ID.from_base58(peer_id), proto, record, reply_type, **kw)


@asynccontextmanager
async def hostile(network: str = "testnet", account: Any = None) -> AsyncIterator[Hostile]:
    """Run a hostile node on loopback for the duration of the block."""
    p2p = build_host(create_new_key_pair(), lambda peer, topic: None)
    async with running(p2p, ["/ip4/127.0.0.1/tcp/0"]):
        yield Hostile(p2p, StreamService(p2p, NodeMetrics()), network,
                      account or Account.create())  # fmt: skip
        await trio.sleep(0)


def metrics_text(node: Any) -> str:
    """A daemon's Prometheus /metrics (``node``: a ``devnet`` DevNode), with its cookie."""
    req = urllib.request.Request(node.info["rpc_url"] + "/metrics", headers=node.rpc.auth)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(resp.read().decode())


def metric(node: Any, name: str, **labels: str) -> float:
    """One sample of a daemon's /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", metrics_text(node), re.M)
    return float(m.group(1)) if m else 0.0


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run a blocking call (RPC to a daemon, ``wait_until``) off the trio thread."""
    return await trio.to_thread.run_sync(fn, *args)
