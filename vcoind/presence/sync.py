"""Keeping the peer table's full heartbeats current from small beats and their digests.

A peer's :class:`Beat` names the digest of its full heartbeat. When we hold that full
heartbeat the beat is applied to it at once. When we hold another (its capability changed
and we missed the full one) or none (a peer new to us), the beat waits here and we ask for
the full heartbeat over ``/vcoin/presence/1.0.0``: the peer itself when we are connected to
it, else a connected peer that holds it (every node keeps the full heartbeats of the peers
it knows). A full heartbeat fetched that way is taken only if its digest is the one the
signed, fresh beat announced and its eth binding checks out, so whoever relays it cannot
change it. Peers that answer nothing leave the beat waiting for the sender's next full
heartbeat (one every ``FULL_EVERY`` beats).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID

from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService
from vcoind.presence.messages import (
    Beat,
    Heartbeat,
    PresenceReply,
    PresenceRequest,
    apply_beat,
    capability_digest,
)
from vcoind.presence.peers import PeerTable

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.presence.sync")

PRESENCE_STREAM = StreamProtocol(
    "/vcoin/presence/1.0.0", (PresenceRequest,), PresenceRequest.MAX_BYTES, timeout_s=10.0
)
FETCH_BATCH = 32  # peer ids per request (PresenceRequest's limit)
FETCH_TRIES = 3  # peers asked in one round before the beats wait for the next round
FETCH_DELAY_S = 0.2  # beats that arrive together are fetched together
# The same digest of the same peer is asked for at most this often (a peer announcing a
# digest nobody holds must not make us ask around at its beat rate).
RETRY_S = 10.0
# Beats waiting for their full heartbeat, at most (a flood of fresh identities is capped by
# the gossip budgets before it gets here; this bounds memory whatever happens).
MAX_PENDING = 4096

Check = Callable[[Heartbeat], str | None]


class PresenceSync:
    def __init__(
        self,
        table: PeerTable,
        check: Check,
        *,
        own_full: Callable[[], Heartbeat | None],
        connected: Callable[[], set[str]],
    ) -> None:
        self._table = table
        self._check = check  # the eth binding check gossip applies to full heartbeats
        self._own_full = own_full
        self._connected = connected
        self._digests: dict[str, bytes] = {}  # peer id -> digest of the full we hold
        self._pending: dict[str, Beat] = {}  # peer id -> newest beat we cannot apply yet
        self._asked: dict[str, tuple[bytes, float]] = {}  # peer id -> (digest, when)
        self._wake = trio.Event()
        self._streams: StreamService | None = None
        self.fetched = 0  # full heartbeats taken from presence requests
        self.requests = 0  # presence requests sent
        table.on_presence.append(self._on_presence)

    def mount(self, streams: StreamService) -> None:
        streams.serve(PRESENCE_STREAM, self._serve)
        self._streams = streams

    def digest_of(self, peer_id: str) -> bytes | None:
        """The digest of the full heartbeat we hold of ``peer_id``."""
        if self._table.get(peer_id) is None:
            return None
        return self._digests.get(peer_id)

    def pending(self) -> set[str]:
        return set(self._pending)

    async def _on_presence(self, peer_id: str, online: bool, when: float) -> None:
        if not online:  # it left the table: a later beat of it needs its full state again
            self._digests.pop(peer_id, None)
            self._asked.pop(peer_id, None)

    # --- gossip handlers ----------------------------------------------------------------

    async def on_full(self, hb: Heartbeat) -> None:
        """A full heartbeat from gossip (or fetched): the table takes it; a waiting beat
        with its digest is applied on top."""
        digest = capability_digest(hb)
        beat = self._pending.get(hb.peer_id)
        if beat is not None and beat.digest == digest:
            del self._pending[hb.peer_id]
            if beat.seq > hb.seq:
                hb = apply_beat(hb, beat)
        elif beat is not None and beat.seq < hb.seq:
            del self._pending[hb.peer_id]  # this full one is newer than the beat
        st = self._table.get(hb.peer_id)
        if st is not None and st.heartbeat.seq >= hb.seq:
            return  # an older one, late (the table would drop it too)
        await self._table.on_heartbeat(hb)
        if (st := self._table.get(hb.peer_id)) is not None and st.heartbeat.seq == hb.seq:
            self._digests[hb.peer_id] = digest

    async def on_beat(self, beat: Beat) -> None:
        st = self._table.get(beat.peer_id)
        if st is not None and self._digests.get(beat.peer_id) == beat.digest:
            self._pending.pop(beat.peer_id, None)
            await self._table.on_heartbeat(apply_beat(st.heartbeat, beat))
            return
        old = self._pending.get(beat.peer_id)
        if old is None and len(self._pending) >= MAX_PENDING:
            return
        if old is None or old.seq < beat.seq:
            self._pending[beat.peer_id] = beat
            self._wake.set()

    # --- fetching -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            await trio.sleep(FETCH_DELAY_S)
            self._wake = trio.Event()
            await self.fetch_pending()

    async def fetch_pending(self) -> None:
        """Ask for the full heartbeats of the beats waiting here (one round)."""
        streams = self._streams
        if streams is None:
            return
        now = trio.current_time()
        want = []
        for peer_id, beat in sorted(self._pending.items()):
            asked = self._asked.get(peer_id)
            if asked is None or asked[0] != beat.digest or asked[1] <= now - RETRY_S:
                self._asked[peer_id] = (beat.digest, now)
                want.append(peer_id)
        connected = self._connected()
        for i in range(0, len(want), FETCH_BATCH):
            batch = want[i : i + FETCH_BATCH]
            direct = [p for p in batch if p in connected]
            others = sorted(connected - set(batch))
            random.shuffle(others)
            for peer in [*direct[:1], *others][:FETCH_TRIES]:
                batch = [p for p in batch if p in self._pending]
                if not batch:
                    break
                await self._ask(streams, peer, batch)

    async def _ask(self, streams: StreamService, peer: str, peer_ids: list[str]) -> None:
        self.requests += 1
        try:
            reply = await streams.request(
                ID.from_base58(peer), PRESENCE_STREAM, PresenceRequest(tuple(peer_ids)),
                PresenceReply, max_reply_bytes=PresenceReply.MAX_BYTES,
            )  # fmt: skip
        except (StreamProtocolError, ValueError) as exc:
            log.debug("presence request to %s failed: %s", peer, exc)
            return
        for hb in reply.heartbeats:
            beat = self._pending.get(hb.peer_id)
            if beat is None or hb.network != beat.network:
                continue
            if capability_digest(hb) != beat.digest or self._check(hb) is not None:
                log.debug("%s sent a full heartbeat of %s that does not match", peer, hb.peer_id)
                continue
            self.fetched += 1
            await self.on_full(apply_beat(hb, beat))

    async def _serve(self, peer: ID, req: PresenceRequest) -> PresenceReply:
        out: list[Heartbeat] = []
        me = self._own_full()
        for peer_id in req.peer_ids:
            if me is not None and peer_id == me.peer_id:
                out.append(me)
            elif (st := self._table.get(peer_id)) is not None:
                out.append(st.heartbeat)
        return PresenceReply(tuple(out))
