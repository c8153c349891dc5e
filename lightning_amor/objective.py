"""The problem being amortized: f(y; x) on a batch, a domain projection and an oracle."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

Context = Union[Tensor, Mapping[str, Tensor]]
"""A batch of contexts: a ``B x ...`` tensor or a dict of tensors that all lead with ``B``."""


class ObjectiveShapeError(ValueError):
    """An Objective (or its input) has a shape that does not match its declaration."""


def context_batch_size(x: Context) -> int:
    """The leading dimension ``B`` shared by every tensor of a context batch."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ObjectiveShapeError("a context must have a leading batch dimension, got a 0-d tensor")
        return x.shape[0]
    if isinstance(x, Mapping):
        if not x:
            raise ObjectiveShapeError("a context dict must hold at least one tensor")
        sizes = {k: v.shape[0] for k, v in x.items()}
        if len(set(sizes.values())) != 1:
            raise ObjectiveShapeError(f"every tensor of a context dict must lead with the same batch size, got {sizes}")
        return next(iter(sizes.values()))
    raise TypeError(f"a context must be a Tensor or a dict of Tensors, got {type(x).__name__}")


def context_index(x: Context, index: Tensor | slice) -> Context:
    """Select the contexts ``x[index]`` of a tensor or dict context."""
    if isinstance(x, Tensor):
        return x[index]
    return {k: v[index] for k, v in x.items()}


def context_repeat(x: Context, repeats: int) -> Context:
    """Repeat every context ``repeats`` times: ``B x ...`` -> ``(B*repeats) x ...``, row ``b*repeats+r`` is ``x[b]``."""
    if isinstance(x, Tensor):
        return x.repeat_interleave(repeats, dim=0)
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in x.items()}


class Objective(nn.Module):
    """f(y; x) for a batch: ``y`` is ``B x n``, ``x`` a :data:`Context` with batch ``B``; returns ``B`` values.

    Subclasses implement :meth:`value` and set :attr:`dim` (n). They may override :meth:`project`
    (the domain, e.g. the sphere or a box), :meth:`solve` (an oracle for reference solutions),
    :meth:`distance` (the problem's own distance between solutions) and :meth:`violation`
    (constraint violation of a solution). An Objective is an ``nn.Module``, so learnable context
    parameters (a VAE decoder, a Q-function) are trained along with the amortizer, and it follows
    the device and dtype that Lightning chooses.

    Calling the objective (``objective(y, x)``) validates shapes on the first call and raises an
    :class:`ObjectiveShapeError` that names the class and the expected and received shapes.
    """

    dim: int
    """The dimension n of a solution y."""

    def __init__(self) -> None:
        super().__init__()
        self._shapes_checked = False

    def value(self, y: Tensor, x: Context) -> Tensor:
        """f(y; x): ``y`` is ``B x n``; returns a ``B`` tensor. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement value(y, x) returning a B tensor")

    def forward(self, y: Tensor, x: Context) -> Tensor:
        """f(y; x) with shape validation on the first call: ``B x n``, context -> ``B``."""
        if not self._shapes_checked:
            self._check_input(y, x)
        out = self.value(y, x)
        if not self._shapes_checked:
            if not isinstance(out, Tensor) or out.shape != (y.shape[0],):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ObjectiveShapeError(
                    f"{type(self).__name__}.value(y, x) must return one value per context, shape "
                    f"({y.shape[0]},), but returned {got}; reduce over every non-batch dimension "
                    f"(e.g. `.sum(-1)`) and do not average over the batch"
                )
            self._shapes_checked = True
        return out

    def _check_input(self, y: Tensor, x: Context) -> None:
        name = type(self).__name__
        if not hasattr(self, "dim"):
            raise ObjectiveShapeError(f"{name} must set the attribute `dim` (the dimension n of a solution)")
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ObjectiveShapeError(
                f"{name} expects solutions y of shape (B, {self.dim}), got {tuple(y.shape)}"
            )
        batch = context_batch_size(x)
        if batch != y.shape[0]:
            raise ObjectiveShapeError(
                f"{name}: the context batch size {batch} does not match the solution batch size {y.shape[0]}"
            )

    def project(self, y: Tensor) -> Tensor:
        """Differentiable projection of ``B x n`` points onto the domain (identity for R^n)."""
        return y

    def projected(self, y: Tensor, x: Context) -> Tensor:
        """f(project(y); x), the unconstrained landscape that amortizers and solvers descend: ``B``."""
        return self(self.project(y), x)

    def distance(self, y: Tensor, y_ref: Tensor) -> Tensor:
        """The problem's distance between two ``B x n`` batches of solutions: ``B`` (Euclidean here)."""
        return (y - y_ref).norm(dim=-1)

    def violation(self, y: Tensor, x: Context) -> Optional[Tensor]:
        """Constraint violation of ``B x n`` solutions (``B``), or ``None`` when the domain has no constraints."""
        return None

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """An oracle: reference solutions ``B x n`` for contexts ``x``, optionally started from ``init``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no oracle: override solve(x, init=None) to return reference "
            f"solutions, or use a loss and metrics that do not need them"
        )

    @property
    def has_oracle(self) -> bool:
        """Whether this objective overrides :meth:`solve`."""
        return type(self).solve is not Objective.solve

    @property
    def references_fixed(self) -> bool:
        """Whether reference solutions can be solved once and reused: an oracle and no learnable parameters."""
        return self.has_oracle and not any(p.requires_grad for p in self.parameters())

    def initial_point(self, x: Context) -> Tensor:
        """A default starting point ``B x n`` for solvers (zeros, projected onto the domain)."""
        param = next(self.parameters(), None)
        ref = param if param is not None else _first_tensor(x)
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        return self.project(torch.zeros(context_batch_size(x), self.dim, device=ref.device, dtype=dtype))

    def random_points(self, num: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``num x n`` random points of the domain (projected standard normals), on ``like``'s device and dtype.

        Used as starts by :class:`~lightning_amor.solvers.MultiStart`; override for bounded domains.
        """
        z = torch.randn(num, self.dim, generator=generator, dtype=like.dtype, device="cpu")
        return self.project(z.to(like.device))

    def cache_key(self) -> Optional[str]:
        """A string that identifies this problem for on-disk caches of reference solutions.

        ``None`` (the default when the objective has learnable parameters) disables caching,
        since the reference solutions change as the parameters learn.
        """
        if any(p.requires_grad for p in self.parameters()):
            return None
        return f"{type(self).__module__}.{type(self).__qualname__}({self.extra_repr()})"


def _first_tensor(x: Context) -> Tensor:
    return x if isinstance(x, Tensor) else next(iter(x.values()))
