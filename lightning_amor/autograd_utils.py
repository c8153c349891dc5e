"""Autograd helpers that let inner loops take gradients inside Lightning's evaluation loops."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from lightning_amor.objective import Context


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad`` or ``torch.inference_mode``.

    Lightning evaluates under ``inference_mode``; semi-amortized models and solvers still need
    ∇_y f there. Tensors created under inference mode must pass through :func:`usable` first.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def usable(t: Tensor) -> Tensor:
    """A copy of an inference-mode tensor that autograd may record (the tensor itself otherwise)."""
    return t.clone() if t.is_inference() else t


def usable_context(x: Context) -> Context:
    """:func:`usable` applied to every tensor of a context."""
    if isinstance(x, Tensor):
        return usable(x)
    return {k: usable(v) for k, v in x.items()}


def constant_context(x: Context) -> Context:
    """A context as a constant of an inner loop: :func:`usable` by autograd, and detached from any graph."""
    x = usable_context(x)
    return x.detach() if isinstance(x, Tensor) else {k: v.detach() for k, v in x.items()}
