"""Training loaders whose position Lightning saves in a checkpoint, so that a resumed run continues the stream
of training batches exactly where the interrupted one stopped.

Lightning (2.x) treats a training loader with ``state_dict()`` and ``load_state_dict()`` as *stateful*: the fit
loop stores its state in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on resume, loads it
into the new loader after ``train_dataloader()`` and before the first ``iter()``. The position kept here is the
number of batches the loader has handed to the training loop. The count is taken where batches leave the loader
in the main process, so worker processes that draw indices ahead (``num_workers > 0``) do not advance it; and
Lightning fetches a sized loader's batches one at a time, right before each training step, so at a checkpoint the
count equals the batches trained on.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader, DistributedSampler


class BatchIndexSampler(DistributedSampler):
    """Yields global batch indices for one rank: epoch ``e`` covers ``e*T .. e*T+T-1``, rank ``r`` takes every
    ``world``-th of them starting at ``r``, so ranks never share a batch and their union is the single-process set.

    With :attr:`start` set (the number of batches this rank has already consumed, see :class:`ResumableLoader`)
    the stream continues there, mid-epoch included, up to the end of that epoch; otherwise it yields the epoch set
    by :meth:`set_epoch`. It is a ``DistributedSampler`` so that Lightning keeps it instead of wrapping it.
    """

    def __init__(self, total: int, rank: int = 0, world: int = 1, repeat_epochs: bool = True) -> None:
        # DistributedSampler.__init__ needs a dataset and a process group; this sampler needs neither.
        self.total = total
        self.rank = rank
        self.num_replicas = world
        self.repeat_epochs = repeat_epochs
        self.epoch = 0
        self.start: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose batches to yield when :attr:`start` is unset (called by Lightning)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.repeat_epochs:
            return iter(range(self.rank, self.total, self.num_replicas))
        per_epoch = len(self)
        start = self.epoch * per_epoch if self.start is None else self.start
        end = (start // per_epoch + 1) * per_epoch
        return (
            (k // per_epoch) * self.total + self.rank + (k % per_epoch) * self.num_replicas for k in range(start, end)
        )

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.num_replicas))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`BatchIndexSampler` that counts the batches it has handed out and begins
    each new iteration after them, so consecutive iterations walk through consecutive epochs.

    Its :meth:`state_dict` is that count; Lightning checkpoints it and, on resume, loads it before iterating, so
    the resumed run sees the batches the interrupted one would have seen next (with any number of workers, and on
    every rank of a DDP run, whose ranks all consume the same number of batches).

    Args:
        *args: the ``DataLoader`` arguments; ``sampler`` must be a :class:`BatchIndexSampler`.
        consumed: batches already handed out by an earlier loader of the same run (a reloaded loader continues).
        **kwargs: the ``DataLoader`` keyword arguments.
    """

    def __init__(self, *args: Any, consumed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, BatchIndexSampler):
            raise TypeError(
                f"ResumableLoader needs a BatchIndexSampler (it sets where the sampler starts), got "
                f"{type(self.sampler).__name__}"
            )
        self.consumed = consumed

    def __iter__(self) -> Iterator[Any]:
        # Read when the first batch is requested (a generator body runs lazily), so a state loaded after iter()
        # but before the first batch still counts.
        self.sampler.start = self.consumed
        for batch in super().__iter__():
            self.consumed += 1  # before the hand-over: a checkpoint taken after this step must include it
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"consumed": batches handed out so far}``, saved by Lightning in every checkpoint."""
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["consumed"]`` batches (called by Lightning on resume, before iterating)."""
        if "consumed" not in state:
            raise KeyError(
                f"a ResumableLoader state must hold 'consumed' (batches handed out), got keys {sorted(state)}; was "
                f"the checkpoint written with another training loader?"
            )
        self.consumed = int(state["consumed"])
