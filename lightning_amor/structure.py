"""Structured solutions: named shapes over one flat ``B x n`` tensor.

A solution need not be a flat vector: MAML's is the weights of a network, an MPC solution an ``H x m`` action
sequence, a deep-equilibrium state a ``C x H x W`` tensor, Meta OT's a pair of potentials. An
:class:`~lightning_amor.objective.Objective` declares the structure (``solution_shape`` for one tensor,
``solution_shapes`` for named tensors, or :meth:`~lightning_amor.objective.Objective.set_structure`), and its
own hooks (``value``, ``project``, ``residual``, ...) receive the structured view: a ``B x *shape`` tensor, or a
dict of named ``B x *shape`` tensors.

Why a flat carrier with named views (and not a TensorDict or a pytree of parameters passed around): the
framework's solvers keep per-context histories, line searches, moment estimates and convergence masks; calibration
takes quantiles of per-context residuals; the reference cache, ``MultiStart``, metrics and export move one tensor.
On a ``B x n`` carrier each of those is one batched kernel, and a view per name costs nothing (the views share the
carrier's storage, so gradients flow to it unchanged). A TensorDict would add a dependency and turn every solver
operation into a map over leaves; a module's parameters are supported through the named view, each name a
``B x *param_shape`` batch of weights evaluated with :func:`batched_functional_call`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]
Solution = Union[Tensor, dict[str, Tensor]]
"""A batch of solutions as an Objective's hooks see it: ``B x n``, ``B x *shape``, or a dict of ``B x *shape``."""

__all__ = ["Shape", "Solution", "Structure", "batched_functional_call", "module_structure", "parameters_vector"]


class Structure:
    """The layout of one solution inside a flat vector of ``n`` numbers.

    Args:
        shapes: a shape (one tensor per solution) or a mapping of names to shapes (named tensors, laid out in the
            mapping's order). Every size must be a positive integer.
    """

    def __init__(self, shapes: Union[Sequence[int], Mapping[str, Sequence[int]]]) -> None:
        if isinstance(shapes, Mapping):
            if not shapes:
                raise ValueError("a structure needs at least one named shape")
            self.names: tuple[str, ...] | None = tuple(shapes)
            self.shapes: tuple[Shape, ...] = tuple(_check_shape(name, s) for name, s in shapes.items())
        else:
            self.names = None
            self.shapes = (_check_shape("solution_shape", shapes),)
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.numel = sum(self.sizes)

    @property
    def named(self) -> bool:
        """Whether the solution is a dict of named tensors (``False``: a single ``B x *shape`` tensor)."""
        return self.names is not None

    def view(self, y: Tensor) -> Solution:
        """The structured view of flat ``B x n`` solutions (views of ``y``'s storage, no copy)."""
        if y.dim() != 2 or y.shape[1] != self.numel:
            raise ValueError(f"expected flat solutions of shape (B, {self.numel}), got {tuple(y.shape)}")
        if not self.named:
            return y.unflatten(1, self.shapes[0]) if self.shapes[0] else y[:, 0]
        # One split, not a narrow per name: its backward concatenates the names' gradients into one B x n tensor,
        # where a narrow per name would build a zero-filled B x n gradient for each and add them up (a cost paid
        # on every inner step of a semi-amortized model, twice when it is unrolled to second order). A 1-d shape
        # is the split part itself (no further view, so no further node in the graph).
        out = {}
        for name, shape, part in zip(self.names, self.shapes, y.split(self.sizes, dim=1), strict=True):
            out[name] = part if len(shape) == 1 else part.unflatten(1, shape) if shape else part[:, 0]
        return out

    def flatten(self, solution: Solution) -> Tensor:
        """Flat ``B x n`` solutions from a structured batch (a ``B x *shape`` tensor or a dict of them)."""
        if isinstance(solution, Tensor):
            if self.named:
                if solution.dim() == 2 and solution.shape[1] == self.numel:
                    return solution
                raise ValueError(f"expected a dict with the entries {list(self.names)}, got a tensor of shape "
                                 f"{tuple(solution.shape)}")
            batch = solution.shape[0] if solution.dim() > 0 else 0
            if tuple(solution.shape[1:]) == self.shapes[0]:
                return solution.reshape(batch, self.numel)
            if solution.dim() == 2 and solution.shape[1] == self.numel:
                return solution
            raise ValueError(f"expected solutions of shape (B, {', '.join(map(str, self.shapes[0]))}) or "
                             f"(B, {self.numel}), got {tuple(solution.shape)}")
        if not isinstance(solution, Mapping) or not self.named:
            raise TypeError(f"expected a tensor of solutions, got {type(solution).__name__}")
        missing = [n for n in self.names if n not in solution]
        extra = [n for n in solution if n not in self.names]
        if missing or extra:
            raise ValueError(f"structured solutions must have exactly the entries {list(self.names)}; missing "
                             f"{missing}, unexpected {extra}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = solution[name]
            if tuple(value.shape[1:]) != shape:
                raise ValueError(f"the entry {name!r} must have shape (B, {', '.join(map(str, shape))}), got "
                                 f"{tuple(value.shape)}")
            parts.append(value.reshape(value.shape[0], -1))
        return torch.cat(parts, dim=1)

    def describe(self) -> dict[str, Any]:
        """Plain values describing the layout (for checkpoints and export metadata)."""
        if self.named:
            return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}
        return {"shape": list(self.shapes[0])}

    def __repr__(self) -> str:
        if self.named:
            return f"Structure({dict(zip(self.names, self.shapes, strict=True))})"
        return f"Structure({self.shapes[0]})"


def _check_shape(name: str, shape: Sequence[int]) -> Shape:
    shape = tuple(shape)
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"the shape of {name!r} must be positive integers, got {shape}")
    return shape


def module_structure(module: nn.Module) -> dict[str, Shape]:
    """Named shapes of a module's parameters (in ``named_parameters`` order), for ``Objective.set_structure``."""
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def parameters_vector(module: nn.Module) -> Tensor:
    """A module's parameters as one flat ``n`` vector (the layout of :func:`module_structure`), detached."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def batched_functional_call(module: nn.Module, params: Mapping[str, Tensor], *inputs: Tensor) -> Any:
    """Evaluate ``module`` with a different set of parameters per context.

    ``params`` holds ``B x *param_shape`` weights under the module's parameter names (a structured solution of
    :func:`module_structure`), every input leads with ``B``; context ``b`` runs the module with ``params[·][b]`` on
    ``inputs[·][b]`` (``torch.func.vmap`` over ``torch.func.functional_call``). Differentiable in the weights.
    """

    def one(p: dict[str, Tensor], *args: Tensor) -> Any:
        return torch.func.functional_call(module, p, args)

    return torch.func.vmap(one)(dict(params), *inputs)
