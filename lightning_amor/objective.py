"""The problem being amortized: f(y; x) on a batch, a domain projection and an oracle."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_amor.fingerprint import code_digest, tensor_digest
from lightning_amor.structure import Solution, Structure

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

    Subclasses implement :meth:`value` and set :attr:`dim` (n), or declare a structured solution with
    :attr:`solution_shape` (one ``B x *shape`` tensor, e.g. an ``H x m`` action sequence) or
    :attr:`solution_shapes` (named tensors, e.g. a pair of potentials), which set ``dim`` for them; a structure
    only known at construction (a network's weights) is declared with :meth:`set_structure`. They may override
    :meth:`project` (the domain, e.g. the sphere or a box), :meth:`solve` (an oracle for reference solutions),
    :meth:`distance` (the problem's own distance between solutions), :meth:`violation` (constraint violation of a
    solution) and :meth:`residual` (the problem's certificate: zero exactly at a solution). An Objective is an
    ``nn.Module``, so learnable context parameters (a VAE decoder, a Q-function) are trained along with the
    amortizer, and it follows the device and dtype that Lightning chooses.

    The framework carries solutions as flat ``B x n`` tensors and calls the ``*_flat`` entry points
    (:meth:`project_flat`, :meth:`violation_flat`, :meth:`distance_flat`, :meth:`residual_flat`,
    :meth:`solve_flat`) and ``objective(y, x)``; these hand the hooks above the structured view of ``y``
    (:meth:`view`), so user code never flattens by hand. Without a declared structure the view is ``y`` itself.

    Calling the objective (``objective(y, x)``) validates shapes on the first call and raises an
    :class:`ObjectiveShapeError` that names the class and the expected and received shapes.
    """

    dim: int
    """The dimension n of a (flattened) solution y."""

    solution_shape: Optional[tuple[int, ...]] = None
    """The shape of one solution when it is a single tensor other than a vector (``dim`` is its size)."""

    solution_shapes: Optional[dict[str, tuple[int, ...]]] = None
    """Named shapes when a solution is several tensors (``dim`` is their total size)."""

    basin_threshold: Optional[float] = None
    """A prediction farther than this from the reference (in :meth:`distance`) lies in another basin (``None``:
    the problem does not say; ``lightning-amor evaluate`` then reports no wrong-basin share)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("solution_shapes") or cls.__dict__.get("solution_shape")
        if declared is not None and "dim" not in cls.__dict__:
            cls.dim = Structure(declared).numel

    def __init__(self) -> None:
        super().__init__()
        self._shapes_checked = False
        self._structure: Optional[Structure] = None
        declared = self.solution_shapes if self.solution_shapes is not None else self.solution_shape
        if declared is not None:
            self.set_structure(declared)

    # --- structure ----------------------------------------------------------------------------------------------

    def set_structure(self, shapes: Union[Sequence[int], Mapping[str, Sequence[int]]]) -> None:
        """Declare the solution's structure: a shape, or named shapes (see :mod:`lightning_amor.structure`);
        sets :attr:`dim` to its size. E.g. ``self.set_structure(module_structure(net))`` for a network's weights."""
        self._structure = Structure(shapes)
        self.dim = self._structure.numel

    @property
    def structure(self) -> Optional[Structure]:
        """The declared :class:`~lightning_amor.structure.Structure`, or ``None`` for flat ``B x n`` solutions."""
        return self._structure

    def view(self, y: Tensor) -> Solution:
        """The structured view of flat ``B x n`` solutions (``y`` itself without a declared structure)."""
        return y if self._structure is None else self._structure.view(y)

    def flatten(self, solution: Solution) -> Tensor:
        """Flat ``B x n`` solutions from structured ones (the inverse of :meth:`view`; a flat tensor passes)."""
        return solution if self._structure is None else self._structure.flatten(solution)

    # --- the hooks a subclass implements (structured y) ---------------------------------------------------------

    def value(self, y: Solution, x: Context) -> Tensor:
        """f(y; x): ``y`` is ``B x n`` (or the structured view); returns a ``B`` tensor. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement value(y, x) returning a B tensor")

    def forward(self, y: Solution, x: Context) -> Tensor:
        """f(y; x) for flat ``B x n`` (or structured) solutions, with shape validation on the first call: ``B``."""
        # a 2-d tensor is the flat carrier: a wrong width is reported by _check_input (an ObjectiveShapeError)
        if not isinstance(y, Tensor) or (self._structure is not None and y.dim() != 2):
            y = self.flatten(y)
        if not self._shapes_checked:
            self._check_input(y, x)
        out = self.value(self.view(y), x)
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
            raise ObjectiveShapeError(
                f"{name} must set the attribute `dim` (the dimension n of a solution), or declare "
                f"`solution_shape` / `solution_shapes`"
            )
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ObjectiveShapeError(
                f"{name} expects solutions y of shape (B, {self.dim}), got {tuple(y.shape)}"
            )
        batch = context_batch_size(x)
        if batch != y.shape[0]:
            raise ObjectiveShapeError(
                f"{name}: the context batch size {batch} does not match the solution batch size {y.shape[0]}"
            )

    def project(self, y: Solution) -> Solution:
        """Differentiable projection of solutions onto the domain (identity for R^n); same structure in and out."""
        return y

    def distance(self, y: Solution, y_ref: Solution) -> Tensor:
        """The problem's distance between two batches of solutions: ``B`` (Euclidean over every entry here)."""
        return (self.flatten(y) - self.flatten(y_ref)).norm(dim=-1)

    def violation(self, y: Solution, x: Context) -> Optional[Tensor]:
        """Constraint violation of solutions (``B``), or ``None`` when the domain has no constraints."""
        return None

    def residual(self, y: Solution, x: Context) -> Tensor:
        """The certificate of solutions: ``B`` non-negative numbers, zero exactly at a solution of the problem.

        Used by the amortize-then-refine policy, its calibration, the metrics and the evaluation. The default is
        the projected-gradient fixed-point residual ``‖y − P(y − ∇f(y; x))‖`` (``‖∇f‖`` on R^n); override it with
        the problem's own (a QP's KKT residual, a fixed point's ``‖g(z) − z‖``, OT's marginal error). NaN where
        f is not finite.
        """
        from lightning_amor.certificates import stationarity_residual

        return stationarity_residual(self, self.flatten(y), x)

    @property
    def has_residual(self) -> bool:
        """Whether this objective overrides :meth:`residual` with a certificate of its own."""
        return type(self).residual is not Objective.residual

    def solve(self, x: Context, init: Optional[Solution] = None) -> Solution:
        """An oracle: reference solutions for contexts ``x``, optionally started from ``init``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no oracle: override solve(x, init=None) to return reference "
            f"solutions, or use a loss and metrics that do not need them"
        )

    # --- the flat entry points the framework calls (flat B x n y) -----------------------------------------------

    def project_flat(self, y: Tensor) -> Tensor:
        """:meth:`project` on flat ``B x n`` solutions: ``B x n``."""
        if type(self).project is Objective.project:
            return y
        return self.flatten(self.project(self.view(y)))

    def projected(self, y: Tensor, x: Context) -> Tensor:
        """f(project(y); x), the unconstrained landscape that amortizers and solvers descend: ``B``."""
        return self(self.project_flat(y), x)

    def smooth_projected(self, y: Tensor, x: Context) -> Tensor:
        """The smooth part of f(project(y); x) that proximal steps differentiate: ``B`` (all of f here; a
        :class:`~lightning_amor.proximal.CompositeObjective` returns g of f = g + h)."""
        return self.projected(y, x)

    def prox_flat(self, y: Tensor, step: Union[Tensor, float]) -> Tensor:
        """The proximal operator of f's nonsmooth part with step ``step`` on flat ``B x n`` points (the identity
        here, where f has no nonsmooth part)."""
        return y

    def violation_flat(self, y: Tensor, x: Context) -> Optional[Tensor]:
        """:meth:`violation` of flat ``B x n`` solutions: ``B`` or ``None``."""
        return self.violation(self.view(y), x)

    def distance_flat(self, y: Tensor, y_ref: Tensor) -> Tensor:
        """:meth:`distance` between flat ``B x n`` solutions: ``B``."""
        return self.distance(self.view(y), self.view(y_ref))

    def residual_flat(self, y: Tensor, x: Context) -> Tensor:
        """:meth:`residual` of flat ``B x n`` solutions: ``B``, detached; works under ``no_grad`` and
        ``inference_mode``."""
        if not self.has_residual:
            from lightning_amor.certificates import stationarity_residual

            return stationarity_residual(self, y, x)
        from lightning_amor.autograd_utils import constant_context, gradients_enabled, usable

        with gradients_enabled():  # a certificate may differentiate (a KKT residual's gradient term)
            out = self.residual(self.view(usable(y).detach()), constant_context(x))
        return out.detach()

    def solve_flat(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """:meth:`solve` with flat ``B x n`` initial points and results."""
        return self.flatten(self.solve(x, None if init is None else self.view(init)))

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
        return self.project_flat(torch.zeros(context_batch_size(x), self.dim, device=ref.device, dtype=dtype))

    def random_points(self, num: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``num x n`` random points of the domain (projected standard normals), on ``like``'s device and dtype.

        Used as starts by :class:`~lightning_amor.solvers.MultiStart`; override for bounded domains.
        """
        z = torch.randn(num, self.dim, generator=generator, dtype=like.dtype, device="cpu")
        return self.project_flat(z.to(like.device))

    def cache_key(self) -> Optional[str]:
        """A string that identifies this problem for on-disk caches of reference solutions.

        It holds the class path and settings (:meth:`extra_repr`), a digest of the source of the class and of
        its ancestors below :class:`Objective` (the oracle's code: a changed :meth:`solve` gives a new key), and a
        digest of every buffer and (frozen) parameter, submodules' included. ``None`` (the default when the
        objective has learnable parameters) disables caching, since the reference solutions change as the
        parameters learn.
        """
        if any(p.requires_grad for p in self.parameters()):
            return None
        code = code_digest(type(self), Objective)[:16]
        numbers = tensor_digest([*self.named_buffers(), *self.named_parameters()])[:16]
        return f"{type(self).__module__}.{type(self).__qualname__}({self.extra_repr()})#code={code}#tensors={numbers}"


def _first_tensor(x: Context) -> Tensor:
    return x if isinstance(x, Tensor) else next(iter(x.values()))
