"""Training contexts from a process with state: environment rollouts pushed into a replay buffer, or contexts
that depend on the model being trained.

A :class:`ContextStream` produces each training batch from its own state (and, if it likes, from the current
module), and exposes that state through ``state_dict()``/``load_state_dict()``. A
:class:`~datamodules.context.ContextDataModule` given ``stream=`` serves its training batches through a
:class:`StreamLoader`, which Lightning treats as a stateful loader: the stream's full state goes into every
checkpoint and is loaded back before the resumed run draws its first batch, so the resumed run is bitwise the
uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from pytorch_lightning import LightningModule

from lightning_amor.objective import Context, context_batch_size


class ContextStream(ABC):
    """A process that yields training contexts and has state (an environment, a replay buffer, a random walk).

    Subclasses implement :meth:`setup`, :meth:`next_batch`, :meth:`state_dict` and :meth:`load_state_dict`.
    The state must hold *everything* the next batches depend on besides the module: buffer contents, counters and
    the states of every random generator the stream owns (draw from your own ``torch.Generator``, never from the
    global one). Keep it to tensors, numbers, strings and containers of them, so that checkpoints load with
    ``torch.load(weights_only=True)``.

    The stream runs in the training process, one batch right before each training step, and each DDP rank has its
    own stream (:meth:`setup` tells it which rank it is).
    """

    @abstractmethod
    def setup(self, seed: int, rank: int, world: int) -> None:
        """Start afresh for rank ``rank`` of ``world`` with the data module's ``seed``.

        Called once per fit, before any checkpointed state is loaded, and for a stand-alone training loader. Seed
        every generator of the stream here from ``(seed, rank)`` (e.g. with
        :func:`~datamodules.context.seeded_generator`), so ranks walk different paths, and empty its buffers.
        """

    @abstractmethod
    def next_batch(self, batch_size: int, module: Optional[LightningModule]) -> Context:
        """The next ``batch_size`` training contexts (a ``batch_size x ...`` tensor or a dict of them).

        ``module`` is the module being trained (``None`` outside a ``Trainer``); the stream may use it, e.g. to
        act in an environment with the current amortizer. It is called under ``torch.no_grad()``.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything the next batches depend on besides the module (buffers, counters, generator states)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` (after :meth:`setup`, before the next batch)."""


class StreamLoader:
    """The training loader of a data module with a :class:`ContextStream`: ``batches_per_epoch`` batches
    ``{"x": stream.next_batch(batch_size, module)}`` per epoch, stateful for Lightning.

    Its state holds the stream's state and the number of batches handed out (which fixes where the current epoch
    ends). Under DDP every rank's stream differs, so :meth:`state_dict` gathers the states of all ranks (Lightning
    calls it on every rank when it saves a checkpoint) and :meth:`load_state_dict` gives each rank its own.

    Args:
        stream: the stream of contexts.
        batch_size: contexts per batch.
        batches_per_epoch: batches per epoch (and rank).
        module: returns the module being trained, or ``None`` (read at every batch).
        consumed: batches already handed out by an earlier loader of the same run (a reloaded loader continues).
    """

    def __init__(
        self, stream: ContextStream, batch_size: int, batches_per_epoch: int,
        module: Callable[[], Optional[LightningModule]] = lambda: None, consumed: int = 0,
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.module = module
        self.consumed = consumed

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Context]]:
        # Lazily, like a DataLoader's sampler: the epoch's end follows from the count when the first batch is drawn.
        end = (self.consumed // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self.consumed < end:
            with torch.no_grad():
                x = self.stream.next_batch(self.batch_size, self.module())
            if context_batch_size(x) != self.batch_size:
                raise ValueError(
                    f"{type(self.stream).__name__}.next_batch({self.batch_size}, module) returned "
                    f"{context_batch_size(x)} contexts; return exactly batch_size of them"
                )
            self.consumed += 1  # before the hand-over: a checkpoint taken after this step must include it
            yield {"x": x}

    def state_dict(self) -> dict[str, Any]:
        """``{"ranks": [{"consumed": int, "stream": the stream's state}, ...]}``, one entry per rank."""
        local = {"consumed": self.consumed, "stream": self.stream.state_dict()}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {"ranks": [local]}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return {"ranks": gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's entry of a :meth:`state_dict` (the checkpoint must come from as many ranks)."""
        ranks = state.get("ranks")
        if not isinstance(ranks, list):
            raise KeyError(
                f"a StreamLoader state holds 'ranks' (one state per DDP rank), got keys {sorted(state)}; was the "
                f"checkpoint written with another training loader?"
            )
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if len(ranks) != world:
            raise ValueError(
                f"the checkpoint holds the context stream of {len(ranks)} rank(s) but this run has {world}; a stream's "
                f"state belongs to its rank, so resume with {len(ranks)} process(es) (devices x num_nodes)"
            )
        self.consumed = int(ranks[rank]["consumed"])
        self.stream.load_state_dict(ranks[rank]["stream"])
