"""Consensus records. Commitments, closes and outcome votes are gossiped on
``/vcoin/<network>/votes/1``; reveals travel point to point, so gossip carries hashes,
never prompts or answers.

A consensus task runs on several replicas. Each replica's round, in order:

1. ``ResultCommitment``: ``commitment(task_id, committer, attempt, sha256(text), salt)``
   (``vcoind.consensus.outcome.commitment``: bound to the committer's peer id and the
   attempt), published as soon as the replica has its result. Nobody can copy an answer
   they have not seen, and a copied commitment cannot be revealed as one's own; the origin
   refuses a commitment equal to another replica's (``duplicate_commit``).
2. ``CommitsClosed``: the origin closes the commit phase once every replica has
   committed or the deadline passed. It lists the accepted commitments with the
   vote weight of each replica, and the hash of the prompt head the tally judges
   relevance on (each replica has the prompt from its assignment); later commitments
   are rejected.
3. ``ResultReveal``: each listed replica sends its text and salt, on the task protocol
   (``/vcoin/task/1.0.0``), to the origin and the other listed replicas. A reveal that
   does not hash to its commitment, from a replica not listed, from a peer other than
   its author, or before the phase closed is rejected and counted against the sender.
4. ``RevealsClosed``: when a listed replica has not revealed by the reveal deadline, the
   origin drops it from the round and names the reveals it tallies; the others vote on
   those (a replica that commits and never reveals cannot stall the round).
5. ``OutcomeVote``: every replica (and the origin) computes the same outcome from
   the revealed results and the listed weights, and signs its settlement-v2
   ``Outcome`` (``vcoind.chain.typed``) with its Ethereum key.

Gossip envelopes are signed by the sender's libp2p key, so the ``peer_id`` of a
gossiped record is its author; a reveal's author is the peer at the other end of its
stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vcoind.market.messages import TASK_ID_RE
from vcoind.p2p.codec import Message, lim, message
from vcoind.presence.messages import NETWORK_RE, PEER_ID_RE

MAX_REPLICAS = 8  # per round (2-5 asked, plus replacements)
MAX_REVEAL_CHARS = 131_072  # a reveal must fit one gossip frame (1 MiB)
HASH = {"exact_len": 32, "max_len": 32}


@dataclass(frozen=True)
class VoteRecord(Message):
    """What every votes-topic record starts with: its author (the libp2p key that signed
    the envelope), the gossip stamp and the task it is about."""

    network: str = field(metadata=lim(pattern=NETWORK_RE, max_len=32))
    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    seq: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    timestamp: float = field(metadata=lim(min=0))
    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))


@message
@dataclass(frozen=True)
class ResultCommitment(VoteRecord):
    KIND: ClassVar[str] = "result_commitment"
    MAX_BYTES: ClassVar[int] = 512

    origin: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    attempt: int = field(metadata=lim(min=1, max=100))
    commitment: bytes = field(metadata=lim(**HASH))


@dataclass(frozen=True)
class Committer:
    """A replica whose commitment the origin accepted, and its vote weight."""

    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    attempt: int = field(metadata=lim(min=1, max=100))
    commitment: bytes = field(metadata=lim(**HASH))
    weight: float = field(metadata=lim(min=0, max=1))


@message
@dataclass(frozen=True)
class CommitsClosed(VoteRecord):
    KIND: ClassVar[str] = "commits_closed"
    MAX_BYTES: ClassVar[int] = 2048

    round: int = field(metadata=lim(min=1, max=10))
    # sha256 of the prompt's head (relevance is judged on it; the replicas have the prompt)
    prompt_hash: bytes = field(metadata=lim(**HASH))
    committers: tuple[Committer, ...] = field(metadata=lim(min_len=1, max_len=MAX_REPLICAS))


@message
@dataclass(frozen=True)
class RevealsClosed(VoteRecord):
    """The origin's list of the reveals it tallied, sent when a listed replica did not
    reveal in time: the other replicas vote on exactly these."""

    KIND: ClassVar[str] = "reveals_closed"
    MAX_BYTES: ClassVar[int] = 1024

    round: int = field(metadata=lim(min=1, max=10))
    revealed: tuple[str, ...] = field(
        metadata=lim(min_len=1, max_len=MAX_REPLICAS, items=lim(pattern=PEER_ID_RE, max_len=64))
    )


@message
@dataclass(frozen=True)
class ResultReveal(VoteRecord):
    KIND: ClassVar[str] = "result_reveal"
    MAX_BYTES: ClassVar[int] = 640 * 1024

    origin: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    attempt: int = field(metadata=lim(min=1, max=100))
    text: str = field(metadata=lim(max_len=MAX_REVEAL_CHARS))
    token_ids: tuple[int, ...] = field(metadata=lim(max_len=8192))
    finish_reason: str = field(metadata=lim(max_len=16))
    salt: bytes = field(metadata=lim(**HASH))
    # Settlement v2: the replica's numeric profile and its signed Result (slash evidence)
    profile: bytes = field(default=bytes(32), metadata=lim(**HASH))
    result_sig: bytes = field(default=b"", metadata=lim(max_len=65))


@message
@dataclass(frozen=True)
class OutcomeVote(VoteRecord):
    """A signer's agreement to an outcome: ``signature`` over the settlement-v2 ``Outcome``
    (``vcoind.chain.typed``) of the task's ticket; empty for an unpaid task."""

    KIND: ClassVar[str] = "outcome_vote"
    MAX_BYTES: ClassVar[int] = 1024

    origin: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    round: int = field(metadata=lim(min=1, max=10))
    result_hash: bytes = field(metadata=lim(**HASH))
    decision: str = field(metadata=lim(choices=("none", "tie", "majority", "supermajority")))
    eth_address: str = field(metadata=lim(pattern=r"0x[0-9a-fA-F]{40}", max_len=42))
    signature: bytes = field(metadata=lim(max_len=65))
    units: int = field(default=0, metadata=lim(min=0, max=(1 << 32) - 1))
    profile: bytes = field(default=bytes(32), metadata=lim(**HASH))
