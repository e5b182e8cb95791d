"""What the market needs from other services, as typed ports.

The market never imports ``vcoind.train``: training reaches it through :class:`Trainer`
(implemented by ``vcoind.train.service.TrainService``), pipelines through
:class:`Pipelines` (``vcoind.market.routes.Routes``). A port's work fails with
:class:`WorkError` (or a subclass), which the market records as the task's reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vcoind.compute.sampling import GenerationResult
    from vcoind.market.messages import Assign, TaskBid
    from vcoind.store import TaskRow


class WorkError(Exception):
    """Work a port ran for the market failed (a training round, ...): the reason."""


OnView = Callable[[dict[str, Any]], Awaitable[None]]
# (peer, tag, held): keep the connection to a peer we have work in progress with (the
# connection manager never trims a held peer); held=False lets go of that tag.
Hold = Callable[[str, str, bool], None]


def no_hold(peer: str, tag: str, held: bool) -> None:
    return None


class Trainer(Protocol):
    def can_train(self) -> bool:
        """Whether this node can train (the training libraries are installed)."""
        ...

    def samples_per_s(self, model_id: str) -> float | None:
        """Measured training speed on ``model_id`` (None: not measured yet)."""
        ...

    def offered(self, task_id: str, origin: str) -> None:
        """We bid to train ``task_id`` for ``origin``: only its joins are accepted."""
        ...

    def adapter_known(self, adapter_id: str) -> bool:
        """The adapter is here or a peer announces it."""
        ...

    async def adapter_path(self, adapter_id: str) -> Path:
        """The adapter's local file, fetched from a holder first if need be."""
        ...

    async def run_training(
        self, row: TaskRow, bids: list[TaskBid], on_view: OnView
    ) -> dict[str, Any]:
        """Run a ``lora_training`` task as its origin: {"adapter_id", "model_id",
        "summary", "view"}; WorkError when it fails."""
        ...


class Pipelines(Protocol):
    async def run(
        self, row: TaskRow, on_token: Callable[[int], None],
        on_text: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """A pipelined task from this origin: {"text", "model_id", "tokens", "hops",
        "timings"}; PipelineError when no route serves it."""
        ...

    async def disjoint(self, model: str, k: int) -> tuple[str, list[list[tuple[str, int, int]]]]:
        """(model id, up to ``k`` routes with no node in two of them)."""
        ...

    async def run_route(
        self, a: Assign, on_token: Callable[[int], None]
    ) -> tuple[GenerationResult, str]:
        """A pipelined consensus replica driven by this node over ``a.route``."""
        ...
