"""Wire records of the task market.

Gossip on ``/vcoin/<network>/tasks/1`` (signed by the sender's libp2p key, checked
like every gossip record: sender, network, freshness, sequence):

- ``TaskAnnounce``: the origin offers tasks (``AnnouncedTask``, up to
  ``MAX_BATCH`` per message: a burst of submissions costs a few messages, not one
  per task).
- ``Bid`` from nodes of an earlier version (they gossiped their bids; still taken).

Direct protocol ``/vcoin/task/1.0.0`` (one request, one reply per stream):

- origin -> worker: ``Assignments`` (one or more ``Assign``; reply ``Accepted``,
  one verdict per assignment), ``Cancel`` (reply ``Ack``)
- worker -> origin: ``Bid`` (a node's offers, ``Offer``, one per task of that origin
  it can run; reply ``Ack``), ``Progress`` and ``TaskResult`` (reply ``Ack``). A bid goes
  to the origin alone: gossiped, every node would receive every bid. Only its author may
  send it, for tasks the origin announced and still takes bids for, within the sender's
  bid budget. They travel on ``/vcoin/bid/1.0.0`` (``vcoind.market.protocol``), a session
  per origin; the task protocol takes them too. The origin keeps bids per task as
  ``TaskBid`` and shows them with the task (``vcoin_getTask``), so its choice can be
  re-checked from its record (no longer by every node watching the gossip).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vcoind.compute.params import GenerationParams
from vcoind.consensus.outcome import TASK_ID_RE as TASK_ID_RE  # also imported from here
from vcoind.market.payments import SignedTicket
from vcoind.p2p.codec import Message, lim, message
from vcoind.p2p.streams import Ack as Ack  # the generic reply: with the stream transport
from vcoind.presence.messages import NETWORK_RE, PEER_ID_RE

TASK_PROTOCOL = "/vcoin/task/1.0.0"
MODEL_RE = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
MAX_INPUT_CHARS = 32_768
MAX_RESULT_CHARS = 262_144
MAX_DELTA_CHARS = 8192  # characters of streamed text per Progress record
MAX_BATCH = 64  # tasks per announce, offers per bid
TASK_TYPES = ("inference", "lora_training")
# The end of a worker's verdict on an attempt it holds already (a resent assignment)
ACCEPTED_BEFORE = "was accepted before"
ADAPTER_RE = r"(|[0-9a-f]{64})"

# send(peer_id, request, reply_type) -> reply on /vcoin/task/1.0.0; the node routes it
# over a stream, or as a plain call when the peer is itself.
Send = Callable[[str, Any, type[Any]], Awaitable[Any]]


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters (see ``vcoind.compute.generate.GenerationParams``)."""

    max_new_tokens: int = field(default=64, metadata=lim(min=1, max=8192))
    temperature: float = field(default=0.0, metadata=lim(min=0, max=100))
    top_p: float = field(default=1.0, metadata=lim(min=0, max=1))
    top_k: int = field(default=0, metadata=lim(min=0, max=1_000_000))
    seed: int = field(default=0, metadata=lim(min=0, max=(1 << 63) - 1))
    stop: tuple[str, ...] = field(default=(), metadata=lim(max_len=8, items={"max_len": 64}))
    # Parameters the request left out, to be taken from the model's generation_config.json
    # by the worker that holds it (the origin may not): some of SAMPLING_DEFAULTS.
    defaults: tuple[str, ...] = field(
        default=(), metadata=lim(max_len=3, items={"pattern": "temperature|top_p|top_k"})
    )

    @property
    def greedy(self) -> bool:
        """Decoded greedily for sure (the model's default temperature may sample)."""
        return self.temperature == 0 and "temperature" not in self.defaults

    def generation(self) -> GenerationParams:
        """The same parameters for the generation loop (validated there once more)."""
        return GenerationParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                                self.seed, self.stop)  # fmt: skip


@dataclass(frozen=True)
class AnnouncedTask:
    """What bidders need to know about a task (not its input)."""

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    model: str = field(metadata=lim(pattern=MODEL_RE, max_len=128))
    max_new_tokens: int = field(metadata=lim(min=1, max=8192))
    input_chars: int = field(metadata=lim(min=0, max=MAX_INPUT_CHARS))
    priority: int = field(default=0, metadata=lim(min=-1000, max=1000))
    max_price: float | None = field(default=None, metadata=lim(min=0))
    # "lora_training": bidders offer to train a shard (their training throughput)
    task_type: str = field(default="inference", metadata=lim(choices=TASK_TYPES))
    adapter: str = field(default="", metadata=lim(pattern=ADAPTER_RE, max_len=64))
    # Settlement v2: the requester's signed ticket (None: an unpaid task)
    ticket: SignedTicket | None = None


@message
@dataclass(frozen=True)
class TaskAnnounce(Message):
    KIND: ClassVar[str] = "task_announce"
    VERSION: ClassVar[int] = 3  # 2: batched; 3: tickets
    MAX_BYTES: ClassVar[int] = 64 * 1024

    network: str = field(metadata=lim(pattern=NETWORK_RE, max_len=32))
    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))  # the origin
    seq: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    timestamp: float = field(metadata=lim(min=0))
    tasks: tuple[AnnouncedTask, ...] = field(metadata=lim(min_len=1, max_len=MAX_BATCH))


@dataclass(frozen=True)
class Offer:
    """A bid for one task: ``eta_s`` from the bidder's measured tokens/s and its queue;
    ``price`` the whole task at ``price_per_token`` (wei; signed as a ``Bid`` on a shared
    chain: ``signature``)."""

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    model_id: str = field(metadata=lim(max_len=71))
    price: float = field(metadata=lim(min=0, max=1e12))
    eta_s: float = field(metadata=lim(min=0, max=1e6))
    tokens_per_s: float = field(metadata=lim(min=0, max=1e9))
    price_per_token: int = field(default=0, metadata=lim(min=0, max=(1 << 63) - 1))
    signature: bytes = field(default=b"", metadata=lim(max_len=65))


@message
@dataclass(frozen=True)
class Bid(Message):
    """A node's offers for tasks of one origin, with its state when it made them."""

    KIND: ClassVar[str] = "bid"
    VERSION: ClassVar[int] = 3  # 2: batched; 3: signed prices
    MAX_BYTES: ClassVar[int] = 32 * 1024

    network: str = field(metadata=lim(pattern=NETWORK_RE, max_len=32))
    peer_id: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))  # the bidder
    seq: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    timestamp: float = field(metadata=lim(min=0))
    origin: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    health: float = field(metadata=lim(min=0, max=1))
    queue_length: int = field(metadata=lim(min=0, max=1_000_000))
    offers: tuple[Offer, ...] = field(metadata=lim(min_len=1, max_len=MAX_BATCH))

    def task_bids(self) -> list[TaskBid]:
        return [
            TaskBid(self.peer_id, o.task_id, o.model_id, o.price, o.eta_s, self.health,
                    self.queue_length, o.tokens_per_s, self.timestamp, o.price_per_token,
                    o.signature)
            for o in self.offers
        ]  # fmt: skip


@dataclass(frozen=True)
class TaskBid:
    """One bidder's offer for one task, as the origin ranks and stores it."""

    peer_id: str
    task_id: str
    model_id: str
    price: float
    eta_s: float
    health: float
    queue_length: int
    tokens_per_s: float
    timestamp: float
    price_per_token: int = 0  # wei
    signature: bytes = b""  # the bidder's Bid signature (shared chain)


@dataclass(frozen=True)
class RouteHop:
    """Layers ``start``..``end`` of a pipeline, served by ``peer``."""

    peer: str = field(metadata=lim(pattern=PEER_ID_RE, max_len=64))
    start: int = field(metadata=lim(min=0, max=10_000))
    end: int = field(metadata=lim(min=0, max=10_000))


@dataclass(frozen=True)
class Assign:
    """One task for the worker: everything it needs to run it."""

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    attempt: int = field(metadata=lim(min=1, max=100))
    model: str = field(metadata=lim(pattern=MODEL_RE, max_len=128))
    input: str = field(metadata=lim(max_len=MAX_INPUT_CHARS))
    params: GenParams = field(default_factory=lambda: GenParams())
    priority: int = field(default=0, metadata=lim(min=-1000, max=1000))
    consensus: bool = False  # commit and reveal the result on the votes topic instead
    # A pipelined replica: run over this route (not a local model), and never through
    # ``exclude`` (the other replicas' nodes), rerouting included.
    route: tuple[RouteHop, ...] = field(default=(), metadata=lim(max_len=64))
    exclude: tuple[str, ...] = field(
        default=(), metadata=lim(max_len=256, items={"pattern": PEER_ID_RE, "max_len": 64})
    )
    # Generate with this LoRA adapter (its id: the sha256 of its safetensors bytes) merged
    # into the model; the worker fetches it from a node that holds it.
    adapter: str = field(default="", metadata=lim(pattern=ADAPTER_RE, max_len=64))
    # Settlement v2: the ticket, and the requester's award of this worker at its price
    ticket: SignedTicket | None = None
    price_per_token: int = field(default=0, metadata=lim(min=0, max=(1 << 63) - 1))
    award: bytes = field(default=b"", metadata=lim(max_len=65))
    # ``input`` is chat messages (a JSON list of {"role", "content"}) for the model's chat
    # template; ``stream``: send the answer's text in Progress records as it grows.
    chat: bool = False
    stream: bool = False


@message
@dataclass(frozen=True)
class Assignments(Message):
    """Assignments to one worker that were ready together (a burst costs one stream)."""

    KIND: ClassVar[str] = "task_assignments"
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    BUDGET: ClassVar[int] = 768 * 1024  # what the origin packs into one, input bytes

    items: tuple[Assign, ...] = field(metadata=lim(min_len=1, max_len=MAX_BATCH))


@message
@dataclass(frozen=True)
class Accepted(Message):
    """The worker's verdict per assignment, in order: "" accepted, else why not."""

    KIND: ClassVar[str] = "task_accepted"
    MAX_BYTES: ClassVar[int] = 80 * 1024

    errors: tuple[str, ...] = field(metadata=lim(max_len=MAX_BATCH, items={"max_len": 1024}))


@message
@dataclass(frozen=True)
class Cancel(Message):
    KIND: ClassVar[str] = "task_cancel"
    MAX_BYTES: ClassVar[int] = 256

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    attempt: int = field(metadata=lim(min=1, max=100))


@message
@dataclass(frozen=True)
class Progress(Message):
    KIND: ClassVar[str] = "task_progress"
    MAX_BYTES: ClassVar[int] = 4 * MAX_DELTA_CHARS + 512

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    attempt: int = field(metadata=lim(min=1, max=100))
    tokens: int = field(metadata=lim(min=0, max=1_000_000))
    # A streamed task (``Assign.stream``): the answer's characters ``offset`` onwards
    # that are new since the last Progress of this attempt.
    offset: int = field(default=0, metadata=lim(min=0, max=MAX_RESULT_CHARS))
    text: str = field(default="", metadata=lim(max_len=MAX_DELTA_CHARS))


@message
@dataclass(frozen=True)
class TaskResult(Message):
    """The worker's answer. ``error`` set means the attempt failed (no text)."""

    KIND: ClassVar[str] = "task_result"
    MAX_BYTES: ClassVar[int] = 1024 * 1024

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    attempt: int = field(metadata=lim(min=1, max=100))
    text: str = field(default="", metadata=lim(max_len=MAX_RESULT_CHARS))
    token_ids: tuple[int, ...] = field(default=(), metadata=lim(max_len=8192))
    finish_reason: str = field(default="", metadata=lim(max_len=16))
    model_id: str = field(default="", metadata=lim(max_len=71))
    prompt_tokens: int = field(default=0, metadata=lim(min=0, max=1_000_000))
    prefill_s: float = field(default=0.0, metadata=lim(min=0))
    decode_s: float = field(default=0.0, metadata=lim(min=0))
    error: str = field(default="", metadata=lim(max_len=1024))
    # Settlement v2 (a paid task): the worker's signatures of the outcome (decision
    # "majority", one replica) and of its own Result, and its numeric profile.
    eth_address: str = field(default="", metadata=lim(max_len=42))
    signature: bytes = field(default=b"", metadata=lim(max_len=65))
    result_sig: bytes = field(default=b"", metadata=lim(max_len=65))
    profile: bytes = field(default=b"", metadata=lim(max_len=32))
