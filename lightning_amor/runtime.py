"""Running a model on batches of contexts: evaluation mode and device moves."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from lightning_amor.objective import Context

__all__ = ["context_device", "evaluation_mode", "to_device"]


def context_device(x: Context) -> torch.device:
    """The device of a context batch (of its first tensor for a dict)."""
    return (x if isinstance(x, torch.Tensor) else next(iter(x.values()))).device


def to_device(x: Context, device: torch.device) -> Context:
    """A context batch (a tensor or a dict of tensors) moved to ``device``."""
    return x.to(device) if isinstance(x, torch.Tensor) else {k: v.to(device) for k, v in x.items()}


@contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode within the block (deterministic objectives, e.g. fixed noise); the previous mode of
    every submodule is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training

