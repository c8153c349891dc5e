"""Fixed points z = g(z; x) on ``B x n`` carriers: the problem, two batched solvers and the implicit gradient.

**The problem.** :class:`FixedPointObjective` turns "find z with z = g(z; x)" into the framework's terms: its value
is f(z; x) = ½‖g(z; x) − z‖², its certificate (:meth:`~lightning_amor.objective.Objective.residual`) the residual
r(z) = ‖g(z; x) − z‖ and its oracle (``solve``) a fixed-point solver. A subclass implements :meth:`step` (g), or
:meth:`fixed_point_map` when part of g can be computed once per batch of contexts (a DEQ's input injection).

**The solvers.** :class:`FixedPointIteration` (z ← (1 − β) z + β g(z), β the damping) and :class:`Anderson`
(Anderson acceleration, type II, with a memory of the last ``memory`` iterates) share one loop and one contract:

- *tolerance.* At iterate z_k the solver evaluates g(z_k) and the residual r_k = ‖g(z_k) − z_k‖ (Euclidean, per
  context). Context b has converged at z_k when ``r_k <= atol + rtol * ‖z_k‖``; the point returned is that z_k, so
  the certificate holds *at the returned point* (``Objective.residual`` of it is r_k). ``atol = 0`` makes the test
  purely relative, ``rtol = 0`` purely absolute; both may be set (either one large enough passes).
- *counting.* ``iterations`` is the number of updates z_k -> z_{k+1} a context used (k at its stop); every update
  costs one evaluation of g, plus one for the last residual. ``callback(k, z)`` sees the whole batch at every k.
- *per context.* A context stops on its own (converged, not finite) and is frozen; the others go on, so a batch
  gives the answers its contexts would give alone.
- *non-convergence.* A context that has not converged when the budget ``steps`` is spent stops with the reason
  ``max_steps``; one whose residual grows past ``divergence`` times its first is ``no_progress``; one whose
  iterate or residual is NaN or infinite is ``not_finite``. Such a context returns the iterate with the lowest
  residual it reached, with ``converged = False`` and its reason (:data:`~lightning_amor.solvers.STOP_REASONS`):
  never an unconverged point as if it had converged. :class:`FixedPointResult` holds the residual of every
  iterate (``residuals``, the trace) for a report or a figure.
- *fallback.* With ``fallback`` (another fixed-point solver, typically damped iteration, which converges for any
  averaged non-expansive map where Anderson may not), the contexts that did not converge are solved again by it
  from their best iterate; ``fell_back`` marks them, and their trace continues with the fallback's iterations.
- *bad input.* NaN or infinite contexts or initial points raise a :class:`ValueError` naming the rows.

**The implicit gradient.** At a fixed point z* = g(z*; θ) of a map with parameters θ, the implicit function theorem
gives dz*/dθ = (I − J)⁻¹ ∂g/∂θ with J = ∂g/∂z at z*. For an outer gradient v = ∂L/∂z*, the backward pass needs
w = (I − Jᵀ)⁻¹ v, the fixed point of w = v + Jᵀ w, solved here by a fixed-point solver on vector–Jacobian products
(one per iteration, no Jacobian is formed) and then ∂L/∂θ = (∂g/∂θ)ᵀ w, which autograd computes through one
application of g (:func:`implicit_fixed_point`). Memory is that of one application of g, whatever the number of
forward iterations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import STOP_REASONS, Callback, Solver, SolverResult
from lightning_amor.structure import Solution

FixedPointMap = Callable[[Tensor], Tensor]
"""g on flat iterates: ``B x n -> B x n`` (the contexts are fixed inside it)."""

__all__ = ["Anderson", "FixedPointIteration", "FixedPointMap", "FixedPointObjective", "FixedPointResult",
           "FixedPointSolver", "implicit_fixed_point"]

_CONVERGED, _MAX_STEPS, _NO_PROGRESS, _NOT_FINITE = (
    STOP_REASONS.index(r) for r in ("converged", "max_steps", "no_progress", "not_finite"))


@dataclass
class FixedPointResult(SolverResult):
    """A :class:`~lightning_amor.solvers.SolverResult` with what a fixed-point solve adds.

    Attributes:
        residuals: ``T x B`` residual ‖g(z_k) − z_k‖ of each context's iterate at every k = 0 .. T − 1 (a stopped
            context keeps the residual of the point it stopped at); the fallback's iterations follow the first
            solver's.
        fell_back: ``B`` bool, whether the context was handed to the fallback solver.
    """

    residuals: Optional[Tensor] = None
    fell_back: Optional[Tensor] = None

    @property
    def residual(self) -> Tensor:
        """``B`` residuals at the returned points."""
        return (2.0 * self.value).clamp_min(0.0).sqrt()

    def summary(self) -> str:
        """One line: how many contexts converged, the stop reasons counted, the residuals' range."""
        reasons = self.reasons()
        counts = {r: reasons.count(r) for r in STOP_REASONS if r in reasons}
        finite = self.residual[torch.isfinite(self.residual)]
        spread = f"{float(finite.min()):.3g}..{float(finite.max()):.3g}" if finite.numel() else "none finite"
        return (f"{int(self.converged.sum())}/{self.converged.numel()} converged, stop reasons {counts}, "
                f"final residuals {spread}, fell back {int(self.fell_back.sum()) if self.fell_back is not None else 0}")


class FixedPointObjective(Objective):
    """Find z with z = g(z; x): f(z; x) = ½‖g(z; x) − z‖², certificate ‖g(z; x) − z‖, oracle a fixed-point solver.

    Subclasses set ``dim`` (or a ``solution_shape``) and implement :meth:`step`; they may override
    :meth:`fixed_point_map` to compute the parts of g that do not depend on z once per batch.

    Args:
        solver: the oracle's solver (default ``Anderson()``); :meth:`solve` runs it from ``init`` (or zeros).
    """

    def __init__(self, solver: Optional[FixedPointSolver] = None) -> None:
        super().__init__()
        if solver is not None and not isinstance(solver, FixedPointSolver):
            raise TypeError(f"{type(self).__name__}: solver must be a FixedPointSolver (Anderson or "
                            f"FixedPointIteration), got {type(solver).__name__}")
        self.solver = solver if solver is not None else Anderson()

    def step(self, z: Solution, x: Context) -> Solution:
        """g(z; x): the same structure as ``z`` (``B x n`` for flat solutions). Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(z, x) returning g(z; x)")

    def fixed_point_map(self, x: Context) -> FixedPointMap:
        """g(·; x) on flat ``B x n`` iterates for a fixed batch of contexts ``x`` (default: :meth:`step`)."""
        return lambda z: self.flatten(self.step(self.view(z), x))

    def value(self, z: Solution, x: Context) -> Tensor:
        """½‖g(z; x) − z‖², ``B``."""
        flat = self.flatten(z)
        return 0.5 * ((self.fixed_point_map(x)(flat) - flat) ** 2).sum(-1)

    def residual(self, z: Solution, x: Context) -> Tensor:
        """‖g(z; x) − z‖, ``B``."""
        flat = self.flatten(z)
        return (self.fixed_point_map(x)(flat) - flat).norm(dim=-1)

    def solve(self, x: Context, init: Optional[Solution] = None) -> Solution:
        """Fixed points from ``init`` (zeros when ``None``) by :attr:`solver`: same structure as a solution."""
        start = None if init is None else self.flatten(init)
        return self.view(self.solver.solve(self, x, init=start).y)


def _rows(bad: Tensor) -> str:
    rows = bad.nonzero().flatten().tolist()
    return f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"


def _check_finite(x: Context, init: Optional[Tensor], who: str) -> None:
    tensors = {"contexts": x} if isinstance(x, Tensor) else {f"contexts[{k!r}]": v for k, v in x.items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
            raise ValueError(f"{who}: the {name} hold NaN or infinite numbers in rows {_rows(bad)}; a fixed point of "
                             f"g(z; x) is not defined there: clean or drop those contexts")
    if init is not None and not bool(torch.isfinite(init).all()):
        raise ValueError(f"{who}: the initial points hold NaN or infinite numbers in rows "
                         f"{_rows(~torch.isfinite(init).all(-1))}; start from finite points (or init=None for zeros)")


class FixedPointSolver(Solver):
    """The shared loop of the fixed-point solvers (see the module docstring for the contract).

    Args:
        steps: the most updates per context (the budget).
        atol: the absolute tolerance on ‖g(z) − z‖.
        rtol: the relative tolerance, times ‖z‖.
        damping: β in (0, 1]: the step mixes (1 − β) of the current point with β of the new one.
        divergence: a context whose residual exceeds this multiple of its first residual stops (``no_progress``).
        fallback: a solver for the contexts that do not converge, run from their best iterate (``None``: none).
    """

    def __init__(
        self, steps: int = 100, atol: float = 1e-4, rtol: float = 0.0, damping: float = 1.0,
        divergence: float = 1e6, fallback: Optional[FixedPointSolver] = None,
    ) -> None:
        name = type(self).__name__
        if int(steps) != steps or steps < 0:
            raise ValueError(f"{name}: steps must be a non-negative integer, got {steps}")
        if not (atol >= 0 and rtol >= 0) or atol + rtol <= 0 or not math.isfinite(atol + rtol):
            raise ValueError(f"{name}: atol and rtol must be finite, non-negative and not both zero (a residual is "
                             f"never exactly zero in floating point), got atol={atol}, rtol={rtol}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"{name}: damping must lie in (0, 1], got {damping}")
        if not divergence > 1.0:
            raise ValueError(f"{name}: divergence must be above 1, got {divergence}")
        if fallback is not None and not isinstance(fallback, FixedPointSolver):
            raise TypeError(f"{name}: fallback must be a FixedPointSolver, got {type(fallback).__name__}")
        self.steps = int(steps)
        self.atol = float(atol)
        self.rtol = float(rtol)
        self.damping = float(damping)
        self.divergence = float(divergence)
        self.fallback = fallback

    # --- the Solver interface ------------------------------------------------------------------------------------

    def _solve(self, objective: Objective, x: Context, init: Optional[Tensor],
               callback: Optional[Callback]) -> FixedPointResult:
        if not isinstance(objective, FixedPointObjective):
            raise TypeError(f"{type(self).__name__} solves a FixedPointObjective (z = g(z; x)), got "
                            f"{type(objective).__name__}; subclass FixedPointObjective and implement step(z, x)")
        _check_finite(x, init, type(self).__name__)
        start = self._start(objective, x, init)
        with torch.no_grad():
            return self.iterate(objective.fixed_point_map(x), start, callback)

    # --- the loop on any map ---------------------------------------------------------------------------------------

    def tolerance(self, z: Tensor) -> Tensor:
        """``B`` thresholds ``atol + rtol * ‖z‖`` on the residual of iterates ``z`` (``B x n``)."""
        return self.atol + self.rtol * z.norm(dim=-1)

    def iterate(self, g: FixedPointMap, z0: Tensor, callback: Optional[Callback] = None) -> FixedPointResult:
        """Solve z = g(z) for every row of ``z0`` (``B x n``) from ``z0``, then hand the unconverged rows to the
        fallback (if any). Runs under the caller's autograd mode (wrap it in ``torch.no_grad`` for a plain solve)."""
        if z0.dim() != 2:
            raise ValueError(f"{type(self).__name__}: iterates must be B x n, got shape {tuple(z0.shape)}")
        result = self._loop(g, z0, None, callback, 0)
        if self.fallback is None or bool(result.converged.all()):
            result.fell_back = torch.zeros_like(result.converged)
            return result
        redo = ~result.converged
        again = self.fallback._loop(g, result.y, redo, callback, int(result.residuals.shape[0]) - 1)
        result.y = torch.where(redo[:, None], again.y, result.y)
        result.value = torch.where(redo, again.value, result.value)
        result.iterations = result.iterations + torch.where(redo, again.iterations, 0)
        result.converged = torch.where(redo, again.converged, result.converged)
        result.stopped = torch.where(redo, again.stopped, result.stopped)
        result.residuals = torch.cat([result.residuals, again.residuals[1:]])
        result.fell_back = redo
        return result

    def _loop(self, g: FixedPointMap, z0: Tensor, active: Optional[Tensor], callback: Optional[Callback],
              offset: int) -> FixedPointResult:
        """The iterations from ``z0`` for the ``active`` rows (all when ``None``); the other rows stay put."""
        batch = z0.shape[0]
        device = z0.device
        active = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
        chosen = active.clone()
        z = z0
        gz = g(z)
        r = (gz - z).norm(dim=-1)
        first = r.clone()
        best_z, best_r = z.clone(), torch.where(torch.isfinite(r), r, torch.full_like(r, math.inf))
        iterations = torch.zeros(batch, dtype=torch.int64, device=device)
        stopped = torch.full((batch,), _MAX_STEPS, dtype=torch.int64, device=device)
        trace = [r.detach()]
        state = self._init_state(z)
        if callback is not None:
            callback(offset, z.detach())
        for k in range(self.steps + 1):
            finite = torch.isfinite(r) & torch.isfinite(z).all(-1)
            done = active & finite & (r <= self.tolerance(z))
            stopped = torch.where(done, _CONVERGED, stopped)
            bad = active & ~finite
            stopped = torch.where(bad, _NOT_FINITE, stopped)
            diverged = active & finite & ~done & (r > self.divergence * first)
            stopped = torch.where(diverged, _NO_PROGRESS, stopped)
            improved = finite & (r < best_r)
            best_z = torch.where(improved[:, None], z, best_z)
            best_r = torch.where(improved, r, best_r)
            active = active & ~done & ~bad & ~diverged
            if k == self.steps or not bool(active.any()):
                break
            z_next, state = self._update(z, gz, state)
            z = torch.where(active[:, None], z_next, z)
            iterations = iterations + active.to(torch.int64)
            gz_new = g(z)
            gz = torch.where(active[:, None], gz_new, gz)
            r = torch.where(active, (gz - z).norm(dim=-1), r)
            trace.append(r.detach())
            if callback is not None:
                callback(offset + k + 1, z.detach())
        converged = stopped == _CONVERGED
        # an unconverged context returns the best point it reached, never a worse one
        y = torch.where((chosen & ~converged)[:, None], best_z, z)
        residual = torch.where(chosen & ~converged, best_r, r)
        return FixedPointResult(
            y=y.detach(), value=(0.5 * residual**2).detach(), iterations=iterations, converged=converged & chosen,
            stopped=stopped, residuals=torch.stack(trace),
        )

    def _init_state(self, z: Tensor) -> object:
        return None

    def _update(self, z: Tensor, gz: Tensor, state: object) -> tuple[Tensor, object]:
        """The next iterate from z (``B x n``) and g(z), and the solver's new state."""
        raise NotImplementedError


class FixedPointIteration(FixedPointSolver):
    """Picard (Krasnosel'skii–Mann when damped) iteration z ← (1 − β) z + β g(z): converges linearly for a
    contraction, and for any non-expansive g when β < 1. Arguments as :class:`FixedPointSolver`."""

    def _update(self, z: Tensor, gz: Tensor, state: object) -> tuple[Tensor, object]:
        if self.damping == 1.0:
            return gz, state
        return (1.0 - self.damping) * z + self.damping * gz, state


class Anderson(FixedPointSolver):
    """Anderson acceleration (type II) of fixed-point iteration, batched, with a memory of ``memory`` iterates.

    With residuals F_i = g(z_i) − z_i of the last m + 1 iterates, the differences ΔF_i = F_{i+1} − F_i and
    ΔG_i = g(z_{i+1}) − g(z_i), the coefficients γ = argmin ‖F_k − ΔF γ‖² + λ‖γ‖² (ridge ``regularization`` λ,
    relative to the mean of ‖ΔF_i‖²) give z_{k+1} = β (g(z_k) − ΔG γ) + (1 − β)(z_k − ΔZ γ). A context whose
    least-squares system is singular or whose mixing is not finite takes the plain step instead.

    Args:
        memory: m, the past differences mixed (1 or more).
        regularization: λ, the relative ridge on the least-squares problem.
        steps, atol, rtol, damping, divergence, fallback: as :class:`FixedPointSolver`.
    """

    def __init__(
        self, steps: int = 100, atol: float = 1e-4, rtol: float = 0.0, memory: int = 5,
        regularization: float = 1e-8, damping: float = 1.0, divergence: float = 1e6,
        fallback: Optional[FixedPointSolver] = None,
    ) -> None:
        super().__init__(steps, atol, rtol, damping, divergence, fallback)
        if int(memory) != memory or memory < 1:
            raise ValueError(f"Anderson: memory must be a positive integer, got {memory}")
        if not regularization >= 0:
            raise ValueError(f"Anderson: regularization must be non-negative, got {regularization}")
        self.memory = int(memory)
        self.regularization = float(regularization)

    def _init_state(self, z: Tensor) -> object:
        return []  # the last memory + 1 pairs (z_i, g(z_i))

    def _update(self, z: Tensor, gz: Tensor, state: object) -> tuple[Tensor, object]:
        history = state + [(z, gz)]
        history = history[-(self.memory + 1):]
        plain = (1.0 - self.damping) * z + self.damping * gz
        if len(history) < 2:
            return plain, history
        zs = torch.stack([h[0] for h in history], 1)  # B x (m+1) x n
        gs = torch.stack([h[1] for h in history], 1)
        fs = gs - zs
        d_f, d_g, d_z = fs.diff(dim=1), gs.diff(dim=1), zs.diff(dim=1)  # B x m x n
        gram = d_f @ d_f.transpose(1, 2)  # B x m x m
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(z.dtype).tiny)
        eye = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
        ridge = (self.regularization * scale + torch.finfo(z.dtype).eps * scale)[:, None, None] * eye
        rhs = (d_f @ fs[:, -1, :, None])  # B x m x 1
        # a context whose history stopped moving (frozen once converged) has an all-zero, singular system: solve_ex
        # reports it instead of raising, and that context takes the plain step
        gamma, info = torch.linalg.solve_ex(gram + ridge, rhs)
        gamma = gamma[..., 0]  # B x m
        mixed_g = gz - (gamma[:, None, :] @ d_g)[:, 0]
        mixed_z = z - (gamma[:, None, :] @ d_z)[:, 0]
        step = self.damping * mixed_g + (1.0 - self.damping) * mixed_z
        ok = torch.isfinite(step).all(-1, keepdim=True) & (info == 0)[:, None]
        return torch.where(ok, step, plain), history


# --- the implicit gradient -------------------------------------------------------------------------------------------


def implicit_fixed_point(
    g: FixedPointMap, z_star: Tensor, solver: Optional[FixedPointSolver] = None,
    on_backward: Optional[Callable[[FixedPointResult], None]] = None,
) -> Tensor:
    """g(z*) with the implicit-function-theorem gradient: ``B x n``.

    The forward value is one application of g at the (detached) fixed point ``z_star`` (``B x n``), so its graph
    reaches g's parameters and inputs. Backward replaces the incoming gradient v with w = (I − Jᵀ)⁻¹ v (J = ∂g/∂z at
    z*), the fixed point of w = v + Jᵀ w solved by ``solver`` (default ``Anderson(steps=100, atol=1e-6)``, from
    w = v) on vector–Jacobian products; autograd then takes w through the graph of g. A backward solve that does not
    converge is passed to ``on_backward`` (or, without it, warned about with its summary): its gradient is the best
    iterate's, not an exact one.

    Args:
        g: the map ``B x n -> B x n`` (contexts and parameters inside), differentiable.
        z_star: ``B x n`` fixed points of g (from a solver run without a graph).
        solver: the solver of the backward linear fixed point.
        on_backward: called with the backward solve's :class:`FixedPointResult` (for metrics).
    """
    solver = solver if solver is not None else Anderson(steps=100, atol=1e-6)
    z_star = z_star.detach()
    out = g(z_star)
    if not out.requires_grad:
        return out

    def backward_hook(v: Tensor) -> Tensor:
        with torch.enable_grad():
            z = z_star.clone().requires_grad_(True)
            gz = g(z)

            def transposed(w: Tensor) -> Tensor:
                (jw,) = torch.autograd.grad(gz, z, w, retain_graph=True)
                return v + jw

            with torch.no_grad():
                result = solver.iterate(transposed, v.detach())
        if on_backward is not None:
            on_backward(result)
        elif not bool(result.converged.all()):
            warnings.warn(f"implicit_fixed_point: the backward solve w = v + Jᵀw did not converge "
                          f"({result.summary()}); the gradient is approximate. Is g a contraction at z*? Raise "
                          f"the solver's steps or its tolerance", RuntimeWarning, stacklevel=2)
        return result.y

    out.register_hook(backward_hook)
    return out

