"""Kademlia DHT (py-libp2p's ``KadDHT``): provider records for models and layer spans.

Keys are sha256 digests of ``/vcoin/<network>/model/<model id>`` and
``/vcoin/<network>/span/<model id>/<start>-<end>`` (``model_key``, ``span_key``): a
node provides the keys of what it serves and re-provides them every
``p2p.dht_reprovide_s``; records others store at us expire after ``p2p.dht_record_ttl``
(an unloaded model's record lapses; Kademlia has no withdrawal). A DHT answer is a hint:
``vcoind.discovery`` counts a provider as a worker only once it proved what it serves
over a direct stream.

Mode: server (we answer queries and store records) once the node is publicly reachable,
client (we only ask) when it is private; ``p2p.dht`` forces one.

What py-libp2p 0.8.1's KadDHT does not bound, and what we do about it here:
- ADD_PROVIDER: any 80-byte key, 20 providers a key, no cap on keys, records kept 48 h,
  addresses unchecked. ``BoundedProviderStore`` takes only 32-byte keys (ours), at most
  ``dht_max_records`` records (the oldest go first: honest providers re-provide),
  ``dht_max_keys_per_peer`` keys per provider, ``MAX_ADDRS`` addresses per record, each
  passing the dial policy, and expires them after ``dht_record_ttl``.
- GET_PROVIDERS answers are written into the local store, and a lookup returns the local
  store alone when it holds anything (one poisoned answer hides every honest provider):
  our lookup asks the network every time and stores nothing it is told.
- PUT_VALUE stores any non-namespaced key up to 1 MiB, 50,000 of them: we use no values,
  so a strict validator with no namespace refuses them all.
- Addresses a peer names (closer peers, provider records, signed peer records) go into
  the peerstore and are dialled by ``host.new_stream``: the DHT sees the host through
  ``PolicedHost``, which drops addresses the dial policy refuses and dials a peer we are
  not connected to only at allowed addresses.
- Inbound KAD streams add the caller to the routing table even when it is a client: we
  add only peers whose identify lists the KAD protocol; a node that switches mode pushes
  identify to its peers (py-libp2p pushes only when listen addresses change).
- Provider records carry ``host.get_addrs()`` (listen addresses, never relayed ones): we
  send our advertised addresses (announce, relays).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.common import ALPHA, PROTOCOL_ID, QUERY_TIMEOUT
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint

from vcoind.config import P2PConfig
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import DIAL_OK, is_circuit

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.dht")

KEY_BYTES = 32
MAX_ADDRS = 8
MAX_PROVIDERS = 20  # per key, stored and returned (Kademlia's k)
DIAL_S = 5.0
SYNC_S = 2.0  # how often connected peers are offered to the routing table


def model_key(network: str, model_id: str) -> bytes:
    """The DHT key under which the nodes serving the whole model ``model_id`` provide."""
    return hashlib.sha256(f"/vcoin/{network}/model/{model_id}".encode()).digest()


def span_key(network: str, model_id: str, start: int, end: int) -> bytes:
    """The DHT key of layers ``start``..``end`` (inclusive) of ``model_id``."""
    return hashlib.sha256(f"/vcoin/{network}/span/{model_id}/{start}-{end}".encode()).digest()


Verdict = Callable[[str], str]


def _allowed(peer: ID, addrs: list[Any], verdict: Verdict) -> list[multiaddr.Multiaddr]:
    """The addresses of ``peer`` the dial policy allows, at most ``MAX_ADDRS``."""
    out: list[multiaddr.Multiaddr] = []
    suffix = f"/p2p/{peer.to_base58()}"
    for a in addrs:
        text = str(a)
        full = text if text.endswith(suffix) else text + suffix
        if len(text) <= 256 and verdict(full) == DIAL_OK:
            out.append(a if isinstance(a, multiaddr.Multiaddr) else multiaddr.Multiaddr(text))
        if len(out) >= MAX_ADDRS:
            break
    return out


class PolicedPeerstore:
    """The peerstore as the DHT sees it: addresses it learns pass the dial policy."""

    def __init__(self, inner: Any, verdict: Verdict) -> None:
        self._inner = inner
        self._verdict = verdict

    def add_addrs(self, peer_id: ID, addrs: list[Any], ttl: int) -> None:
        ok = _allowed(peer_id, list(addrs), self._verdict)
        if ok:
            self._inner.add_addrs(peer_id, ok, ttl)

    def add_addr(self, peer_id: ID, addr: Any, ttl: int) -> None:
        self.add_addrs(peer_id, [addr], ttl)

    def consume_peer_record(self, envelope: Any, ttl: int) -> bool:
        # A signed peer record names addresses too: we do not learn them from the DHT
        # (identify and heartbeats tell us where a peer is), and do not fail the message.
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class PolicedHost:
    """The host as the DHT sees it: it dials a peer it is not connected to only at the
    addresses the dial policy allows."""

    def __init__(self, inner: Any, verdict: Verdict) -> None:
        self._inner = inner
        self._verdict = verdict
        self._peerstore = PolicedPeerstore(inner.get_peerstore(), verdict)

    def get_peerstore(self) -> Any:
        return self._peerstore

    async def new_stream(self, peer_id: ID, protocol_ids: Any) -> Any:
        if peer_id not in self._inner.get_connected_peers():
            addrs = _allowed(peer_id, self._inner.get_peerstore().addrs(peer_id), self._verdict)
            direct = [a for a in addrs if not is_circuit(a)]
            if not direct:
                raise ConnectionError(f"no address of {peer_id} the dial policy allows")
            swarm = self._inner.get_network()
            swarm.unblock_peer(peer_id)
            for a in direct:
                bare = a.decapsulate_code(multiaddr.protocols.P_P2P) if "/p2p/" in str(a) else a
                try:
                    with trio.fail_after(DIAL_S):
                        await swarm.dial_addr(bare, peer_id)
                    break
                except Exception as exc:  # unreachable address: try the next
                    log.debug("dht dial %s at %s: %s", peer_id, a, exc)
            else:
                raise ConnectionError(f"cannot reach {peer_id}")
        return await self._inner.new_stream(peer_id, protocol_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class BoundedProviderStore(ProviderStore):
    """Provider records with bounds, expiry, our addresses, and lookups that ask the
    network (see the module docstring)."""

    def __init__(self, host: Any, peer_routing: Any, cfg: P2PConfig, verdict: Verdict,
                 own_addrs: Callable[[], list[str]]) -> None:  # fmt: skip
        super().__init__(host=host, peer_routing=peer_routing)
        self._cfg = cfg
        self._verdict = verdict
        self._own = own_addrs
        self.refused = 0  # records not stored (bad key, no allowed address, over a cap)

    # --- what others store at us ----------------------------------------------------

    def _count(self) -> int:
        return sum(len(v) for v in self.providers.values())

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        pid = provider.peer_id
        me = pid == self.local_peer_id
        addrs = list(provider.addrs[:MAX_ADDRS]) if me else _allowed(
            pid, list(provider.addrs), self._verdict)  # fmt: skip
        if len(key) != KEY_BYTES or not addrs:
            self.refused += 1
            return
        per_key = self.providers.setdefault(key, {})
        name = str(pid)
        if name not in per_key:
            if len(per_key) >= MAX_PROVIDERS and not me:
                self.refused += 1
                return
            if not me and len(self.get_provided_keys(pid)) >= self._cfg.dht_max_keys_per_peer:
                self.refused += 1
                return
        per_key[name] = ProviderRecord(PeerInfo(pid, addrs), timestamp=time.time())
        while self._count() > self._cfg.dht_max_records:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest = min((r.timestamp, k, p) for k, v in self.providers.items()
                     for p, r in v.items() if r.peer_id != self.local_peer_id)  # fmt: skip
        _, k, p = oldest
        del self.providers[k][p]
        if not self.providers[k]:
            del self.providers[k]

    def _expired(self, rec: ProviderRecord, now: float) -> bool:
        return now - rec.timestamp > self._cfg.dht_record_ttl

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        now = time.time()
        per_key = self.providers.get(key, {})
        for name in [p for p, r in per_key.items() if self._expired(r, now)]:
            del per_key[name]
        if not per_key:
            self.providers.pop(key, None)
        return [PeerInfo(r.peer_id, r.addresses) for r in per_key.values()]

    def cleanup_expired(self) -> None:
        for key in list(self.providers):
            self.get_providers(key)

    def withdraw(self, key: bytes) -> None:
        """Stop providing ``key``: our own record goes; those at others lapse."""
        self.providing_keys.discard(key)
        self.providers.get(key, {}).pop(str(self.local_peer_id), None)
        if not self.providers.get(key, True):
            del self.providers[key]

    def _save(self) -> None:  # no persistence: records live as long as their TTL
        return None

    # --- what we ask and announce ---------------------------------------------------

    async def provide(self, key: bytes) -> bool:
        """Store our record at the peers closest to ``key``; True if one took it."""
        own = [multiaddr.Multiaddr(a) for a in self._own()[:MAX_ADDRS]]
        self.providing_keys.add(key)
        self.add_provider(key, PeerInfo(self.local_peer_id, own))
        closest = await self.peer_routing.find_closest_peers_network(key)
        sent = 0

        async def send(peer: ID) -> None:
            nonlocal sent
            with trio.move_on_after(QUERY_TIMEOUT):
                if await self._send_add_provider(peer, key):
                    sent += 1

        async with trio.open_nursery() as nursery:
            for peer in closest[:MAX_PROVIDERS]:
                if peer != self.local_peer_id:
                    nursery.start_soon(send, peer)
        return sent > 0

    async def _send_add_provider(self, peer_id: ID, key: bytes) -> bool:
        stream = None
        try:
            stream = await self.host.new_stream(peer_id, [PROTOCOL_ID])
            msg = KadMessage()
            msg.type = KadMessage.MessageType.ADD_PROVIDER
            msg.key = key
            envelope, _ = env_to_send_in_RPC(self.host)
            msg.senderRecord = envelope
            provider = msg.providerPeers.add()
            provider.id = self.local_peer_id.to_bytes()
            provider.addrs.extend(multiaddr.Multiaddr(a).to_bytes()
                                  for a in self._own()[:MAX_ADDRS])  # fmt: skip
            data = msg.SerializeToString()
            await stream.write(encode_uvarint(len(data)) + data)
            return True
        except Exception as exc:  # a peer gone or refusing: the next re-provide retries
            log.debug("ADD_PROVIDER to %s: %s", peer_id, exc)
            return False
        finally:
            if stream is not None:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception as exc:  # closing a finished stream
                        log.debug("closing a DHT stream: %s", exc)

    async def find_providers(self, key: bytes, count: int = MAX_PROVIDERS) -> list[PeerInfo]:
        """Providers of ``key``: ours and those the closest peers know, deduplicated, their
        addresses policed; nothing learned here is stored."""
        found: dict[ID, PeerInfo] = {p.peer_id: p for p in self.get_providers(key)}
        closest = await self.peer_routing.find_closest_peers_network(key)
        limiter = trio.CapacityLimiter(ALPHA)

        async def ask(peer: ID) -> None:
            async with limiter:
                with trio.move_on_after(QUERY_TIMEOUT):
                    provs, _ = await self._get_providers_from_peer_with_closers(peer, key)
                    for p in provs[:MAX_PROVIDERS]:
                        addrs = _allowed(p.peer_id, list(p.addrs), self._verdict)
                        if addrs and p.peer_id not in found and p.peer_id != self.local_peer_id:
                            found[p.peer_id] = PeerInfo(p.peer_id, addrs)

        async with trio.open_nursery() as nursery:
            for peer in closest[:MAX_PROVIDERS]:
                if peer != self.local_peer_id:
                    nursery.start_soon(ask, peer)
        return list(found.values())[:count]


class VcoinKadDHT(KadDHT):
    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        # py-libp2p adds whoever opens a KAD stream (clients included) to the table.
        if skip_server_mode_check and not self.is_server(peer_id):
            return False
        return await super().add_peer(peer_id)

    def is_server(self, peer: ID) -> bool:
        try:
            return str(PROTOCOL_ID) in (self.host.get_peerstore().get_protocols(peer) or [])
        except Exception:  # unknown to the peerstore
            return False


class Dht:
    """The node's DHT: its mode, the keys it provides, and lookups."""

    def __init__(self, p2p: P2PHost, cfg: P2PConfig, *, verdict: Verdict,
                 own_addrs: Callable[[], list[str]],
                 reachability: Callable[[], str] = lambda: "unknown") -> None:  # fmt: skip
        self._p2p = p2p
        self._cfg = cfg
        self._reachability = reachability
        host: Any = PolicedHost(p2p.host, verdict)
        # No value records: a strict validator with no namespace refuses every PUT_VALUE.
        refuse_values = NamespacedValidator({}, strict_validation=True)
        self.kad = VcoinKadDHT(host, self._wanted_mode(), validator=refuse_values,
                               validator_changed=True, strict_validation=True)  # fmt: skip
        self.store = BoundedProviderStore(host, self.kad.peer_routing, cfg, verdict, own_addrs)
        self.kad.provider_store = self.store
        self._provided: set[bytes] = set()
        self._kick = trio.Event()
        self.last_provided: float | None = None

    @property
    def mode(self) -> str:
        return "server" if self.kad.mode == DHTMode.SERVER else "client"

    def _wanted_mode(self) -> DHTMode:
        cfg = self._cfg
        if cfg.dht == "server":
            return DHTMode.SERVER
        if cfg.dht == "client" or cfg.reachability == "private":
            return DHTMode.CLIENT
        public = cfg.reachability == "public" or self._reachability() == "public"
        return DHTMode.SERVER if public else DHTMode.CLIENT

    def provide_keys(self, keys: set[bytes]) -> None:
        """What we serve now: new keys are provided at once, dropped ones withdrawn."""
        for key in self._provided - keys:
            self.store.withdraw(key)
        if keys - self._provided:
            self._kick.set()
        self._provided = set(keys)

    async def find(self, key: bytes) -> list[PeerInfo]:
        """Who provides ``key`` (hints: not verified), us excluded."""
        found = await self.store.find_providers(key)
        return [p for p in found if p.peer_id != self._p2p.peer_id]

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "routing_table": self.kad.get_routing_table_size(),
                "provided": len(self._provided), "records": self.store._count(),
                "refused": self.store.refused, "last_provided": self.last_provided}  # fmt: skip

    async def _sync(self) -> None:
        """Follow reachability with the mode; offer connected DHT servers to the table (a
        connection alone does not put a peer there)."""
        while True:
            wanted = self._wanted_mode()
            if wanted != self.kad.mode:
                await self.kad.switch_mode(wanted)
                log.info("DHT mode: %s", self.mode)
                # py-libp2p pushes identify only when listen addresses change: tell our
                # peers we now do (or no longer do) speak KAD, so they add us (or not).
                with trio.move_on_after(DIAL_S):
                    try:
                        await push_identify_to_peers(self._p2p.host)
                    except Exception as exc:  # best effort: a peer may be gone
                        log.debug("identify push: %s", exc)
                self._kick.set()
            table = self.kad.routing_table
            for peer in list(self._p2p.connected_peers()):
                new = not table.peer_in_table(peer) and self.kad.is_server(peer)
                if new and await table.add_peer(peer):
                    self._kick.set()
            await trio.sleep(SYNC_S)

    async def _reprovide(self) -> None:
        while True:
            self._kick = trio.Event()
            for key in list(self._provided):
                if key in self._provided:
                    await self.store.provide(key)
            if self._provided:
                self.last_provided = time.time()
            with trio.move_on_after(self._cfg.dht_reprovide_s):
                await self._kick.wait()
            await trio.sleep(0.5)  # coalesce a burst of changes

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.kad), trio.open_nursery() as nursery:
            nursery.start_soon(self._sync)
            nursery.start_soon(self._reprovide)
            log.info("DHT up in %s mode", self.mode)
            task_status.started()
            await trio.sleep_forever()
