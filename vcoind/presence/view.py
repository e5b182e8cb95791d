"""NetworkView: what this node knows of every node, itself included.

Built on the peer table (others' latest heartbeats) and the heartbeat service (our own
capabilities and last beat); the market, pipelines, training and the oracle ask it who
serves what instead of reading heartbeats themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vcoind.presence.heartbeat import Capabilities, HeartbeatService
from vcoind.presence.messages import LayerSpan, ModelServed
from vcoind.presence.peers import PeerTable


class NetworkView:
    def __init__(
        self,
        peer_id: str,
        eth_address: str,
        peers: PeerTable,
        heartbeat: HeartbeatService,
        *,
        connected: Callable[[], set[str]],
        eligible: Callable[[str | None], bool] = lambda address: True,
    ) -> None:
        self.peer_id = peer_id
        self.eth_address = eth_address
        self.peers = peers
        self._heartbeat = heartbeat
        self._connected = connected
        self._eligible = eligible

    @property
    def capabilities(self) -> Capabilities:
        """What we announce (models, spans, queue, services, adapters)."""
        return self._heartbeat.capabilities

    def alive(self, peer: str) -> bool:
        """Us, or a peer whose heartbeat is within the peer timeout."""
        return peer == self.peer_id or self.peers.get(peer) is not None

    def connected(self) -> set[str]:
        return self._connected()

    def met(self, peer: str) -> bool:
        """We have had ``peer``'s heartbeat (its spans) and hold a connection to it."""
        if peer == self.peer_id:
            return True
        return self.peers.get(peer) is not None and peer in self._connected()

    def eth_address_of(self, peer: str) -> str | None:
        if peer == self.peer_id:
            return self.eth_address
        st = self.peers.get(peer)
        return st.heartbeat.eth_address if st else None

    def health_of(self, peer: str) -> float:
        if peer == self.peer_id:
            last = self._heartbeat.last
            return last.health if last else 1.0
        st = self.peers.get(peer)
        return st.health if st else 0.5

    def profile_of(self, peer: str) -> Any:
        if peer == self.peer_id:
            last = self._heartbeat.last
            return last.profile if last else None
        st = self.peers.get(peer)
        return st.heartbeat.profile if st else None

    def eligible(self, peer: str) -> bool:
        """The peer's address may bid (the chain's stake rule; always, without a chain)."""
        return self._eligible(self.eth_address_of(peer))

    def serving(self, model: str) -> set[str]:
        """Peers (and us) whose last heartbeat says they serve ``model`` (name or id) and
        that may bid."""
        out = {
            st.peer_id
            for st in self.peers.peers()
            if any(model in (m.name, m.model_id) for m in st.heartbeat.models)
            and self.eligible(st.peer_id)
        }
        if any(model in (m.name, m.model_id) for m in self.capabilities.models) and (
            self.eligible(self.peer_id)
        ):
            out.add(self.peer_id)
        return out

    def served(self) -> list[ModelServed]:
        """Every whole model served in the network we know of, once per node (us first)."""
        return [*self.capabilities.models,
                *(m for st in self.peers.peers() for m in st.heartbeat.models)]  # fmt: skip

    def serving_count_by_model(self) -> dict[str, int]:
        """How many nodes (us included) serve each model name: the replicas possible."""
        names = {m.name for m in self.served()}
        return {name: len(self.serving(name)) for name in sorted(names)}

    def model_id_of(self, model: str) -> str | None:
        """The weight-hash id of ``model`` (a name or an id): the id most nodes we know of
        serve under that name (None: nobody does)."""
        if model.startswith("sha256:"):
            return model
        counts: dict[str, int] = {}
        for m in self.served():
            if m.name == model:
                counts[m.model_id] = counts.get(m.model_id, 0) + 1
        return max(sorted(counts), key=lambda k: counts[k]) if counts else None

    def models(self) -> dict[str, str]:
        """Model names and ids served anywhere in the network we know of -> a name."""
        out: dict[str, str] = {}
        for m in self.served():
            out[m.name] = out[m.model_id] = m.name
        return out

    def spans_by_peer(self) -> dict[str, list[LayerSpan]]:
        out = {st.peer_id: list(st.heartbeat.spans) for st in self.peers.peers()}
        out[self.peer_id] = list(self.capabilities.spans)
        return out

    def holders(self, adapter_id: str) -> list[str]:
        """Peers whose last heartbeat lists the adapter, healthiest first."""
        peers = [st for st in self.peers.peers() if adapter_id in st.heartbeat.adapters]
        return [st.peer_id for st in sorted(peers, key=lambda st: (-st.health, st.peer_id))]

    def with_service(self, service: str) -> list[str]:
        """Peers (not us) that announce ``service`` (e.g. "oracle")."""
        return [st.peer_id for st in self.peers.peers() if service in st.heartbeat.services]
