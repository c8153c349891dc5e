"""ReplayBuffer: a ring buffer of contexts with its own sampling generator and an exact state.

Why not torchrl's replay buffer: it installs beside this torch (torchrl 0.14.1, tensordict 0.14.3) and its
``state_dict`` does restore contents and sampler generator exactly, but it brings two compiled extensions built
against one torch ABI (``torchrl._torchrl``, ``tensordict._C``: the pinned-binary breakage users of neighbouring
libraries report most), five more runtime packages and two seconds of import, for what a context stream needs:
a fixed-capacity ring of tensors, uniform sampling and a state of plain tensors that checkpoints load with
``weights_only=True``. That is the few lines below.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_amor.objective import Context, context_batch_size


class ReplayBuffer:
    """The ``capacity`` most recent contexts added (a ring: the oldest are overwritten first), sampled uniformly
    with replacement by the buffer's own generator.

    Contexts are a ``B x ...`` tensor or a dict of ``B x ...`` tensors; every later :meth:`add` must match the
    first one's keys, per-context shapes and dtypes. The buffer lives on the CPU.

    Args:
        capacity: the number of contexts kept.
        seed: the seed of the sampling generator (see :meth:`reset`).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.generator = torch.Generator()
        self._storage: Optional[dict[str, Tensor]] = None
        self._is_tensor = False
        self._cursor = 0  # where the next context is written
        self._size = 0
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Empty the buffer and reseed its sampling generator."""
        self.generator.manual_seed(seed)
        self._storage, self._cursor, self._size = None, 0, 0

    def __len__(self) -> int:
        return self._size

    def _allocate(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.zeros(self.capacity, *v.shape[1:], dtype=v.dtype) for k, v in rows.items()}

    def _as_dict(self, contexts: Context) -> dict[str, Tensor]:
        if isinstance(contexts, Tensor):
            return {"": contexts}
        return dict(contexts)

    def add(self, contexts: Context) -> None:
        """Append ``B`` contexts (a ``B x ...`` tensor or dict), overwriting the oldest beyond ``capacity``."""
        rows = {k: v.detach().cpu() for k, v in self._as_dict(contexts).items()}
        num = context_batch_size(rows)
        if self._storage is None:
            self._is_tensor = isinstance(contexts, Tensor)
            self._storage = self._allocate(rows)
        expected = {k: (tuple(v.shape[1:]), v.dtype) for k, v in self._storage.items()}
        got = {k: (tuple(v.shape[1:]), v.dtype) for k, v in rows.items()}
        if got != expected or self._is_tensor != isinstance(contexts, Tensor):
            raise ValueError(
                f"ReplayBuffer.add: contexts of per-context shapes/dtypes {got} do not match the buffer's {expected} "
                f"(set by the first add); add contexts of one kind, or reset() the buffer first"
            )
        if num > self.capacity:  # only the last `capacity` would survive
            rows = {k: v[num - self.capacity :] for k, v in rows.items()}
            self._cursor = (self._cursor + num - self.capacity) % self.capacity
            num = self.capacity
        index = (self._cursor + torch.arange(num)) % self.capacity
        for key, value in rows.items():
            self._storage[key][index] = value
        self._cursor = (self._cursor + num) % self.capacity
        self._size = min(self._size + num, self.capacity)

    def sample(self, num: int) -> Context:
        """``num`` contexts drawn uniformly with replacement (a ``num x ...`` tensor or dict, like those added)."""
        if self._storage is None or self._size == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty; add() contexts before sampling")
        index = torch.randint(self._size, (num,), generator=self.generator)
        picked = {k: v[index] for k, v in self._storage.items()}
        return picked[""] if self._is_tensor else picked

    def contents(self) -> Context:
        """Every context held, oldest first: a ``len(self) x ...`` tensor or dict."""
        if self._storage is None:
            raise RuntimeError("ReplayBuffer.contents: the buffer is empty; add() contexts first")
        start = self._cursor if self._size == self.capacity else 0
        order = (start + torch.arange(self._size)) % self.capacity
        held = {k: v[order] for k, v in self._storage.items()}
        return held[""] if self._is_tensor else held

    def state_dict(self) -> dict[str, Any]:
        """Contents, write position, size and sampling generator state (tensors and numbers only)."""
        data = None if self._storage is None else {k: v[: self._size].clone() for k, v in self._storage.items()}
        return {"capacity": self.capacity, "data": data, "is_tensor": self._is_tensor, "cursor": self._cursor,
                "size": self._size, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly (the capacity must be the same)."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: the state was saved with capacity {state['capacity']}, this buffer "
                f"has {self.capacity}; build the buffer with the capacity of the run that saved it"
            )
        self.generator.set_state(state["generator"])
        self._is_tensor, self._cursor, self._size = bool(state["is_tensor"]), int(state["cursor"]), int(state["size"])
        self._storage = None
        if state["data"] is not None:
            self._storage = self._allocate(state["data"])
            for key, value in state["data"].items():
                self._storage[key][: self._size] = value
