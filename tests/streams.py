"""A toy context stream for the tests and the docs: sphere contexts that drift by a random walk pulled by the
model's own predictions, pushed into a replay buffer that training batches are sampled from.

Its next contexts depend on its state (walkers, generator, buffer) and on the current model, so a resumed run
matches an uninterrupted one only if all of that state is checkpointed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_lightning import LightningModule
from torch import Tensor

from datamodules import ContextStream, ReplayBuffer
from datamodules.context import seeded_generator


class DriftingSphereStream(ContextStream):
    """``walkers`` sphere contexts (4 centres on S² and 4 offsets, ``walkers x 16``) whose centres take a random
    step each batch, pulled towards the model's predicted point; every step's walkers go into a replay buffer of
    ``capacity`` contexts, and each batch is a uniform sample of the buffer.

    Args:
        walkers: contexts moved (and added to the buffer) per batch.
        capacity: the replay buffer's capacity.
        step: the scale of the random step of each centre.
        pull: how far the centres move towards the model's prediction ŷ(x) per batch.
    """

    def __init__(self, walkers: int = 8, capacity: int = 64, step: float = 0.2, pull: float = 0.3) -> None:
        self.walkers_count, self.step, self.pull = walkers, step, pull
        self.buffer = ReplayBuffer(capacity)
        self.generator = torch.Generator()
        self.walkers = torch.zeros(walkers, 16)

    def setup(self, seed: int, rank: int, world: int) -> None:
        """Fresh walkers and an empty buffer, seeded by ``(seed, rank)``."""
        self.generator = seeded_generator(seed, 100, rank)
        centres = torch.randn(self.walkers_count, 4, 3, generator=self.generator)
        alphas = 0.7 * torch.rand(self.walkers_count, 4, generator=self.generator)
        self.walkers = torch.cat([(centres / centres.norm(dim=-1, keepdim=True)).flatten(1), alphas], dim=1)
        self.buffer.reset(int(torch.randint(2**62, (), generator=self.generator)))

    def next_batch(self, batch_size: int, module: Optional[LightningModule]) -> Tensor:
        """Move the walkers, add them to the buffer, sample ``batch_size x 16`` contexts from it."""
        centres = self.walkers[:, :12].reshape(-1, 4, 3)
        moved = centres + self.step * torch.randn(centres.shape, generator=self.generator)
        if module is not None:
            target = module(self.walkers.to(module.device)).detach().cpu()  # walkers x 3
            moved = moved + self.pull * target[:, None, :]
        moved = moved / moved.norm(dim=-1, keepdim=True)
        self.walkers = torch.cat([moved.flatten(1), self.walkers[:, 12:]], dim=1)
        self.buffer.add(self.walkers)
        return self.buffer.sample(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Walkers, generator state and the buffer's state."""
        return {"walkers": self.walkers.clone(), "generator": self.generator.get_state(),
                "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.walkers = state["walkers"].clone()
        self.generator.set_state(state["generator"])
        self.buffer.load_state_dict(state["buffer"])
