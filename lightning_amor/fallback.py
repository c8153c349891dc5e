"""Amortize-then-refine inference (tutorial ch. 5): a prediction, a certificate, and a solver where it falls short.

For a batch of contexts, :class:`Fallback` predicts ŷ(x) with a trained
:class:`~lightning_amor.module.AmortizedModule` and certifies each prediction
(:func:`~lightning_amor.certificates.certify`) by its objective value f(ŷ; x), the problem's certificate
residual (by default the projected-gradient fixed-point residual ``‖ŷ − P(ŷ − ∇f(ŷ; x))‖``) and its constraint
violation.

A context out of distribution is not trusted: its prediction's residual exceeds a quantile of the residuals the
model reaches on its validation contexts (:class:`~lightning_amor.calibration.Calibration`) times a margin, or the
context itself lies far from the validation contexts (a Mahalanobis distance above the same quantile of theirs,
times the margin). It falls back to a solver from scratch (the objective's oracle, or a solver from
:meth:`~lightning_amor.objective.Objective.initial_point`). Of the others, a prediction whose residual is at most
the tolerance is accepted as it is, and the rest are refined by the solver started from the prediction. Every
result is certified again. Nothing in a batch is dropped: a context with non-finite values, or one on which the
model, the objective or a solver raises, is reported by its index with the reason, and the rest of the batch is
solved.

A context's answer never depends on the other contexts of its batch. Every call of the model, the certificate, the
context distance and the solvers gets exactly ``batch_size`` rows (a smaller set is padded with copies of one of its
contexts): BLAS picks its kernels, and so its summation orders, by the shape of a product, so a float32 network's
prediction for a context would differ in its last bits between batches of 1, 3 or 9 rows, and a float32 solver
stopped by rounding turns such differences into answers 1e-4 apart. The solvers decide per row (see
:mod:`lightning_amor.solvers`), so fixed shapes make every context's arithmetic the same, alone or in any batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_amor.calibration import Calibration, context_features
from lightning_amor.certificates import certify, nonfinite_rows
from lightning_amor.objective import Context, context_batch_size, context_index
from lightning_amor.runtime import context_device, evaluation_mode, to_device
from lightning_amor.solvers import LBFGS, Solver

if TYPE_CHECKING:
    from lightning_amor.module import AmortizedModule

__all__ = ["DEFAULT_TOLERANCES", "ORACLE_ITERATIONS", "STATUSES", "Fallback", "InferenceResult", "default_tolerance"]

STATUSES = ("amortized", "refined", "fell_back", "failed")
"""What happened to a context: its prediction was accepted, refined from the prediction, solved from scratch
(the prediction was not trusted), or no solution could be produced (see the reason)."""

ORACLE_ITERATIONS = -1
"""The iteration count reported for a solution of the objective's oracle, which does not count its iterations."""

DEFAULT_TOLERANCES = {torch.float64: 1e-4, torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.3}
"""The residual tolerance of a :class:`Fallback` without one, by the dtype of the model: one that dtype can reach.

A line search on f in precision ε stops once f's decrease falls below f's rounding error, at a gradient norm of
about √(ε L |f|): about √ε on a problem of unit scale (3.5e-4 in float32), so 1e-4 is often out of float32's reach
and the solver would stop short of it on rounding. Each value is about 3√ε of its dtype, and at least 1e-4."""

DEFAULT_SOLVER_TOL = 1e-5
"""The gradient tolerance of the default solver (L-BFGS) of a :class:`Fallback` without a tolerance: a tenth of the
float64 default, below which float32 stops on rounding (``no_progress``) instead, at no extra cost."""


def default_tolerance(dtype: torch.dtype) -> float:
    """The residual tolerance a :class:`Fallback` uses, without one of its own, for a model of ``dtype``
    (:data:`DEFAULT_TOLERANCES`; ``max(1e-4, 3√ε)`` for another floating-point dtype)."""
    if dtype in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype]
    if not dtype.is_floating_point:
        return DEFAULT_TOLERANCES[torch.get_default_dtype()]
    return max(1e-4, 3.0 * math.sqrt(torch.finfo(dtype).eps))


@dataclass
class InferenceResult:
    """Solutions and their certificates for a batch of ``B`` contexts (every context, in the input's order).

    Attributes:
        y: ``B x n`` solutions (NaN rows for failed contexts).
        value: ``B`` objective values f(y; x).
        residual: ``B`` certificate residuals (the problem's :meth:`~lightning_amor.objective.Objective.residual`;
            by default the projected-gradient residual ``‖y − P(y − ∇f(y))‖``, ``‖∇f‖`` on R^n).
        violation: ``B`` constraint violations (0 for domains without constraints).
        feasible: ``B`` bool, violation at most the policy's ``feasibility_tolerance``.
        converged: ``B`` bool, feasible with a residual at most the tolerance.
        ood_score: ``B`` residuals of the amortized predictions, the out-of-distribution score.
        context_distance: ``B`` Mahalanobis distances of the contexts to the calibration contexts (NaN without
            context statistics).
        ood: ``B`` bool, the score or the distance exceeded its threshold (or the prediction was not finite).
        refined: ``B`` bool, a solver was run from the prediction.
        fell_back: ``B`` bool, the context was solved from scratch, not trusting the prediction.
        iterations: ``B`` int64 solver iterations (0 without a solver, −1 for the objective's oracle).
        status: per context one of :data:`STATUSES`.
        reason: per context why it failed or what fell short ("" when nothing did).
        tolerance: the residual tolerance used.
        threshold: the out-of-distribution threshold on the residual (``None``: no calibration, no detection).
        distance_threshold: the out-of-distribution threshold on the context distance (``None``: none used).
    """

    y: Tensor
    value: Tensor
    residual: Tensor
    violation: Tensor
    feasible: Tensor
    converged: Tensor
    ood_score: Tensor
    context_distance: Tensor
    ood: Tensor
    refined: Tensor
    fell_back: Tensor
    iterations: Tensor
    status: list[str]
    reason: list[str]
    tolerance: float
    threshold: Optional[float] = None
    distance_threshold: Optional[float] = None

    COLUMNS = ("value", "residual", "violation", "feasible", "converged", "ood_score", "context_distance", "ood",
               "refined",
               "fell_back", "iterations", "status", "reason")
    """The certificate's columns, in the order the CLI writes them (after the solution's ``y_0 .. y_{n-1}``)."""

    def __len__(self) -> int:
        return len(self.status)

    def counts(self) -> dict[str, int]:
        """How many contexts ended with each of :data:`STATUSES`."""
        return {name: self.status.count(name) for name in STATUSES}

    def failures(self) -> list[tuple[int, str]]:
        """``(index, reason)`` of every failed context."""
        return [(i, r) for i, (s, r) in enumerate(zip(self.status, self.reason, strict=True)) if s == "failed"]

    def columns(self) -> dict[str, Union[Tensor, list[str]]]:
        """The solution columns ``y_0 .. y_{n-1}`` (each ``B``) and the certificate columns, by name."""
        out: dict[str, Union[Tensor, list[str]]] = {f"y_{j}": self.y[:, j] for j in range(self.y.shape[1])}
        out.update({name: getattr(self, name) for name in self.COLUMNS})
        return out

    def summary(self) -> str:
        """A few lines: how many contexts were accepted, refined, fell back and failed, and why those failed."""
        counts = self.counts()
        threshold = "none (not calibrated)" if self.threshold is None else f"{self.threshold:.4g}"
        distance = "" if self.distance_threshold is None else f", on the context distance {self.distance_threshold:.4g}"
        lines = [
            f"{len(self)} contexts; tolerance {self.tolerance:g}; out-of-distribution threshold on the residual "
            f"{threshold}{distance}",
            f"  amortized (prediction accepted):        {counts['amortized']}",
            f"  refined (solver from the prediction):   {counts['refined']}",
            f"  fell back (solver from scratch, OOD):   {counts['fell_back']}",
            f"  failed:                                 {counts['failed']}",
            f"  residual within tolerance and feasible: {int(self.converged.sum())} of {len(self)}",
        ]
        failures = self.failures()
        lines += [f"  context {index} failed: {reason}" for index, reason in failures[:50]]
        if len(failures) > 50:
            lines.append(f"  ... and {len(failures) - 50} more failed contexts (see the reason column)")
        return "\n".join(lines)


class Fallback:
    """Amortize, certify, then refine or fall back: the inference policy of an
    :class:`~lightning_amor.module.AmortizedModule` (its ``inference`` argument, so recipes configure it).

    Per context: a context *out of distribution* falls back to a solver from scratch, not trusting the
    prediction. It is out of distribution when its features' Mahalanobis distance to the calibration (validation)
    contexts exceeds ``ood_margin ×`` the ``ood_quantile`` of their own distances, or when its prediction's
    residual exceeds ``max(ood_margin × q, tolerance)``, q the ``ood_quantile`` of the calibration residuals
    (:class:`Calibration`). Of the others, a prediction with a residual at most ``tolerance`` (and feasible) is
    accepted and the rest are refined by ``solver`` started from the prediction. Without a calibration nothing is
    flagged.

    Args:
        solver: refines predictions (and solves from scratch when the objective has no oracle and
            ``from_scratch_solver`` is not given); default L-BFGS, 200 steps, gradient tolerance ``tolerance / 10``
            (``1e-5`` without a tolerance).
        tolerance: the largest accepted residual ``‖y − P(y − ∇f(y))‖``; default (``None``): one the model's dtype
            can reach, :func:`default_tolerance` (1e-3 in float32, 1e-4 in float64).
        ood_quantile: the quantile level of the validation residuals (and context distances) that sets the
            out-of-distribution thresholds.
        ood_margin: the factor (≥ 1) on those quantiles: scores up to it count as in distribution.
        refine: run the solver from predictions whose residual exceeds the tolerance (``False``: report them).
        fallback: solve out-of-distribution contexts from scratch (``False``: treat them like the others).
        from_scratch_solver: the solver for contexts that fall back, started from ``objective.initial_point``;
            default: the objective's oracle when it has one, else ``solver``.
        feasibility_tolerance: the largest constraint violation counted as feasible.
        batch_size: contexts per call of the model and the solvers. Every call gets exactly this many rows
            (fewer are padded with copies), so that no context's answer depends on the others in its batch.
    """

    def __init__(
        self,
        solver: Optional[Solver] = None,
        tolerance: Optional[float] = None,
        ood_quantile: float = 0.99,
        ood_margin: float = 3.0,
        refine: bool = True,
        fallback: bool = True,
        from_scratch_solver: Optional[Solver] = None,
        feasibility_tolerance: float = 1e-6,
        batch_size: int = 1024,
    ) -> None:
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"Fallback: tolerance must be positive, got {tolerance}")
        if not 0.0 < ood_quantile <= 1.0:
            raise ValueError(f"Fallback: ood_quantile must lie in (0, 1], got {ood_quantile}")
        if not ood_margin >= 1.0:
            raise ValueError(f"Fallback: ood_margin must be at least 1, got {ood_margin}")
        if not feasibility_tolerance >= 0:
            raise ValueError(f"Fallback: feasibility_tolerance must be non-negative, got {feasibility_tolerance}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"Fallback: batch_size must be a positive integer, got {batch_size}")
        for name, value in (("solver", solver), ("from_scratch_solver", from_scratch_solver)):
            if value is not None and not isinstance(value, Solver):
                raise TypeError(f"Fallback: {name} must be a Solver (e.g. lightning_amor.solvers.LBFGS), got "
                                f"{type(value).__name__}")
        self.tolerance = None if tolerance is None else float(tolerance)
        solver_tol = DEFAULT_SOLVER_TOL if self.tolerance is None else self.tolerance / 10
        self.solver = solver if solver is not None else LBFGS(steps=200, tol=solver_tol)
        self.ood_quantile = float(ood_quantile)
        self.ood_margin = float(ood_margin)
        self.refine = bool(refine)
        self.fallback = bool(fallback)
        self.from_scratch_solver = from_scratch_solver
        self.feasibility_tolerance = float(feasibility_tolerance)
        self.batch_size = int(batch_size)
        self._default_solver = solver is None

    def replace(self, **changes: Any) -> Fallback:
        """A copy with some arguments changed (validated as in the constructor); a default solver follows a new
        ``tolerance``."""
        args = {name: getattr(self, name) for name in (
            "tolerance", "ood_quantile", "ood_margin", "refine", "fallback", "from_scratch_solver",
            "feasibility_tolerance", "batch_size")}
        args["solver"] = None if self._default_solver else self.solver
        unknown = set(changes) - set(args)
        if unknown:
            raise TypeError(f"Fallback.replace: unknown argument(s) {sorted(unknown)}; known: {sorted(args)}")
        args.update(changes)
        return type(self)(**args)

    def __repr__(self) -> str:
        tolerance = "None (by the dtype)" if self.tolerance is None else f"{self.tolerance:g}"
        return (f"Fallback(solver={self.solver!r}, tolerance={tolerance}, ood_quantile={self.ood_quantile:g}, "
                f"ood_margin={self.ood_margin:g}, refine={self.refine}, fallback={self.fallback}, "
                f"from_scratch_solver={self.from_scratch_solver!r})")

    def tolerance_for(self, dtype: torch.dtype) -> float:
        """The residual tolerance for a model of ``dtype``: the policy's own, or :func:`default_tolerance`."""
        return default_tolerance(dtype) if self.tolerance is None else self.tolerance

    def threshold(self, calibration: Optional[Calibration], dtype: Optional[torch.dtype] = None) -> Optional[float]:
        """The out-of-distribution threshold on the prediction's residual, ``max(ood_margin × q, tolerance)`` with
        q the ``ood_quantile`` of the calibration residuals, or ``None`` without calibration; the tolerance is
        that for a model of ``dtype`` (default: torch's default dtype)."""
        if calibration is None:
            return None
        tolerance = self.tolerance_for(dtype if dtype is not None else torch.get_default_dtype())
        return max(self.ood_margin * calibration.quantile(self.ood_quantile), tolerance)

    def distance_threshold(self, calibration: Optional[Calibration]) -> Optional[float]:
        """The out-of-distribution threshold on the context's distance to the calibration contexts,
        ``ood_margin ×`` their ``ood_quantile``, or ``None`` without context statistics."""
        if calibration is None or not calibration.has_contexts:
            return None
        return self.ood_margin * calibration.distance_quantile(self.ood_quantile)

    def __call__(
        self,
        module: AmortizedModule,
        x: Context,
        calibration: Optional[Calibration] = None,
        threshold: Optional[float] = None,
    ) -> InferenceResult:
        """Solve a batch of ``B`` contexts (a ``B x ...`` tensor or a dict of them) with ``module``.

        Args:
            module: the trained model (put in eval mode for the call).
            x: the contexts; they are moved to the module's device.
            calibration: the validation residuals and contexts that set the thresholds (default:
                ``module.calibration``).
            threshold: the out-of-distribution threshold on the residual itself, overriding ``calibration``'s
                (which still sets the threshold on the context distance).

        Returns:
            An :class:`InferenceResult` with a row for every context, in order.
        """
        calibration = calibration if calibration is not None else getattr(module, "calibration", None)
        tolerance = self.tolerance_for(module.dtype)
        distance_threshold = self.distance_threshold(calibration) if self.fallback else None
        if threshold is None:
            if calibration is not None and not calibration.matches_weights:
                warnings.warn(
                    f"the calibration was measured at step {calibration.step}, not on the weights in use; "
                    "recalibrate with lightning_amor.calibration.calibrate(module, validation_contexts)",
                    stacklevel=2,
                )
            threshold = self.threshold(calibration, module.dtype) if self.fallback else None
        size = context_batch_size(x)
        chunks = []
        with evaluation_mode(module):
            for start in range(0, size, self.batch_size):
                part = to_device(context_index(x, slice(start, start + self.batch_size)), module.device)
                chunks.append(self._solve_chunk(module, part, tolerance, threshold, calibration, distance_threshold))
        return _concat(chunks, tolerance, self.feasibility_tolerance, threshold, distance_threshold,
                       module.objective.dim)

    # --- one chunk --------------------------------------------------------------------------------------------

    def _solve_chunk(
        self,
        module: AmortizedModule,
        x: Context,
        tolerance: float,
        threshold: Optional[float],
        calibration: Optional[Calibration],
        distance_threshold: Optional[float],
    ) -> _Rows:
        objective = module.objective
        size = context_batch_size(x)
        rows = _Rows.empty(size, objective.dim, x)
        for index, reason in nonfinite_rows(x).items():
            rows.fail(index, reason)
        valid = [i for i in range(size) if not rows.failed[i]]

        # 1. predict, certify, and measure the contexts' distance (in the same fixed-shape call)
        def predict(part: Context) -> tuple[Tensor, ...]:
            with torch.no_grad():
                y = module(part).detach()
            value, residual, violation = certify(objective, y, part)
            distance = torch.full_like(value, math.nan)
            if distance_threshold is not None:
                distance = calibration.distance(context_features(part)).to(value.device, value.dtype)
            return y, value, residual, violation, distance

        done, out, failures = _isolated(predict, x, valid, block=self.batch_size)
        for index, err in failures.items():
            rows.fail(index, f"the model or the objective raised on this context: {err}")
        if not done:
            return rows
        y0, value0, residual0, violation0, distance = out
        done_t = torch.tensor(done, device=y0.device)
        finite = torch.isfinite(y0).all(-1) & torch.isfinite(value0) & torch.isfinite(residual0)
        feasible = violation0 <= self.feasibility_tolerance
        score = torch.where(finite, residual0, torch.full_like(residual0, math.inf))
        ood = ~finite if threshold is None else (score > threshold) | ~finite
        if distance_threshold is not None:
            rows.context_distance[done_t] = distance.to(rows.context_distance.dtype)
            ood = ood | (distance > distance_threshold)
        accepted = finite & feasible & (residual0 <= tolerance) & ~ood
        rows.set(done_t, y0, value0, residual0, violation0)
        rows.ood_score[done_t] = score.to(rows.ood_score.dtype)
        rows.ood[done_t] = ood
        # one transfer to the host for the per-context bookkeeping (not one sync per context)
        for index, ok, is_finite, res, is_feasible in zip(
            done, accepted.tolist(), finite.tolist(), residual0.tolist(), feasible.tolist(), strict=True
        ):
            rows.status[index] = "amortized"
            if not ok:
                rows.reason[index] = _shortfall(is_finite, res, is_feasible, tolerance)

        # 2. contexts far outside the calibration contexts (the prediction is not trusted): solved from scratch
        fall_back = ood if self.fallback else torch.zeros_like(accepted)
        if bool(fall_back.any()):
            self._run_solver(module, x, rows, [done[k] for k in fall_back.nonzero().flatten().tolist()], None,
                             tolerance)
        if not self.fallback:
            for k in (~accepted & ~finite).nonzero().flatten().tolist():
                rows.fail(done[k], "the prediction is not finite and fallback is off")

        # 3. the other contexts whose residual exceeds the tolerance: refined from the prediction
        refine = ~accepted & finite & ~fall_back
        if self.refine and bool(refine.any()):
            picked = refine.nonzero().flatten().tolist()
            self._run_solver(module, x, rows, [done[k] for k in picked], y0[picked], tolerance)
        return rows

    def _run_solver(
        self,
        module: AmortizedModule,
        x: Context,
        rows: _Rows,
        indices: list[int],
        init: Optional[Tensor],
        tolerance: float,
    ) -> None:
        """Solve the contexts ``indices`` of ``x`` (from ``init``, ``len(indices) x n``, or from scratch), certify
        the solutions and record them; a failure is recorded by index with its reason."""
        objective = module.objective
        from_scratch = init is None
        starts = {} if from_scratch else dict(zip(indices, init, strict=True))

        def solve(part: Context, picked: Sequence[int]) -> tuple[Tensor, ...]:
            if from_scratch and self.from_scratch_solver is None and objective.has_oracle:
                y = objective.solve_flat(part).detach()
                iterations = torch.full((y.shape[0],), ORACLE_ITERATIONS, dtype=torch.int64, device=y.device)
            else:
                solver = self.from_scratch_solver if from_scratch and self.from_scratch_solver else self.solver
                start = None if from_scratch else torch.stack([starts[i] for i in picked])
                result = solver.solve(objective, part, init=start)
                y, iterations = result.y.detach(), result.iterations
            return (y, iterations, *certify(objective, y, part))

        done, out, failures = _isolated(solve, x, indices, pass_indices=True, block=self.batch_size)
        what = "the solver from scratch" if from_scratch else "the solver started from the prediction"
        for index, err in failures.items():
            rows.fail(index, f"{what} raised: {err}")
        if not done:
            return
        y, iterations, value, residual, violation = out
        done_t = torch.tensor(done, device=y.device)
        finite = torch.isfinite(y).all(-1) & torch.isfinite(value) & torch.isfinite(residual)
        rows.set(done_t, y, value, residual, violation)
        rows.iterations[done_t] = iterations.to(rows.iterations.device, torch.int64)
        flag = rows.fell_back if from_scratch else rows.refined
        flag[done_t] = True
        for index, is_finite, res, viol in zip(
            done, finite.tolist(), residual.tolist(), violation.tolist(), strict=True
        ):
            if not is_finite:
                rows.fail(index, f"{what} returned a non-finite solution or value")
                continue
            rows.status[index] = "fell_back" if from_scratch else "refined"
            feasible = viol <= self.feasibility_tolerance
            good = feasible and res <= tolerance
            rows.reason[index] = "" if good else f"after {what}: " + _shortfall(True, res, feasible, tolerance)


def _shortfall(finite: bool, residual: float, feasible: bool, tolerance: float) -> str:
    if not finite:
        return "the prediction is not finite"
    parts = []
    if residual > tolerance:
        parts.append(f"residual {residual:.3g} above the tolerance {tolerance:g}")
    if not feasible:
        parts.append("infeasible (constraint violation above the feasibility tolerance)")
    return " and ".join(parts)


# --- bookkeeping -----------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """The mutable per-context state of one chunk."""

    y: Tensor
    value: Tensor
    residual: Tensor
    violation: Tensor
    ood_score: Tensor
    context_distance: Tensor
    ood: Tensor
    refined: Tensor
    fell_back: Tensor
    iterations: Tensor
    failed: list[bool]
    status: list[str] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, size: int, dim: int, x: Context) -> _Rows:
        ref = x if isinstance(x, Tensor) else next(iter(x.values()))
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        nan = torch.full((size,), math.nan, dtype=dtype, device=ref.device)
        false = torch.zeros(size, dtype=torch.bool, device=ref.device)
        return cls(
            y=torch.full((size, dim), math.nan, dtype=dtype, device=ref.device), value=nan.clone(),
            residual=nan.clone(), violation=nan.clone(), ood_score=nan.clone(),
            context_distance=nan.clone(), ood=false.clone(),
            refined=false.clone(), fell_back=false.clone(),
            iterations=torch.zeros(size, dtype=torch.int64, device=ref.device),
            failed=[False] * size, status=["failed"] * size, reason=[""] * size,
        )

    def set(self, index: Tensor, y: Tensor, value: Tensor, residual: Tensor, violation: Tensor) -> None:
        if y.dtype != self.y.dtype:  # the first results fix the dtype (a float64 model on float32 contexts)
            self.y, self.value, self.residual, self.violation, self.ood_score, self.context_distance = (
                t.to(y.dtype) for t in (self.y, self.value, self.residual, self.violation, self.ood_score,
                                        self.context_distance))
        self.y[index] = y.to(self.y.device)
        self.value[index] = value.to(self.value)
        self.residual[index] = residual.to(self.residual)
        self.violation[index] = violation.to(self.violation)

    def fail(self, index: int, reason: str) -> None:
        self.failed[index] = True
        self.status[index] = "failed"
        self.reason[index] = reason
        self.y[index] = math.nan
        for t in (self.value, self.residual, self.violation):
            t[index] = math.nan


def _concat(
    chunks: list[_Rows],
    tolerance: float,
    feasibility_tolerance: float,
    threshold: Optional[float],
    distance_threshold: Optional[float],
    dim: int,
) -> InferenceResult:
    def cat(name: str) -> Tensor:
        parts = [getattr(c, name) for c in chunks]
        if not parts:
            return torch.zeros((0, dim) if name == "y" else (0,))
        dtype = torch.promote_types(parts[0].dtype, parts[-1].dtype) if parts[0].is_floating_point() else None
        return torch.cat([p.to(dtype) if dtype else p for p in parts])

    violation, residual = cat("violation"), cat("residual")
    status = [s for c in chunks for s in c.status]
    feasible = violation <= feasibility_tolerance
    return InferenceResult(
        y=cat("y"), value=cat("value"), residual=residual, violation=violation, feasible=feasible,
        converged=feasible & (residual <= tolerance), ood_score=cat("ood_score"),
        context_distance=cat("context_distance"), ood=cat("ood"),
        refined=cat("refined"), fell_back=cat("fell_back"), iterations=cat("iterations"), status=status,
        reason=[r for c in chunks for r in c.reason], tolerance=tolerance, threshold=threshold,
        distance_threshold=distance_threshold,
    )


def _isolated(
    fn: Callable[..., tuple[Tensor, ...]],
    x: Context,
    indices: Sequence[int],
    pass_indices: bool = False,
    block: Optional[int] = None,
) -> tuple[list[int], tuple[Tensor, ...], dict[int, str]]:
    """Run ``fn`` on the contexts ``indices`` of ``x`` as one batch; if it raises, split the batch in halves until
    every context that raises on its own is found. Returns the indices that succeeded (in order), ``fn``'s
    outputs for them (concatenated) and ``{index: error}`` for the others.

    With ``block``, every call of ``fn`` gets exactly ``block`` rows (at most ``block`` indices are ever given):
    the picked ones, then copies of the first, whose outputs are dropped."""
    done: list[int] = []
    outputs: list[tuple[Tensor, ...]] = []
    failures: dict[int, str] = {}

    def attempt(picked: list[int]) -> None:
        if not picked:
            return
        padded = picked + picked[:1] * (block - len(picked)) if block is not None else picked
        part = context_index(x, torch.tensor(padded, device=context_device(x)))
        try:
            out = fn(part, padded) if pass_indices else fn(part)
            out = tuple(o[:len(picked)] for o in out)
        except Exception as err:  # noqa: BLE001 - any error of user code is reported for the contexts it hit
            if len(picked) == 1:
                failures[picked[0]] = f"{type(err).__name__}: {err}"
                return
            half = len(picked) // 2
            attempt(picked[:half])
            attempt(picked[half:])
            return
        done.extend(picked)
        outputs.append(out)

    attempt(list(indices))
    if not outputs:
        return [], (), failures
    order = sorted(range(len(done)), key=done.__getitem__)
    joined = tuple(torch.cat([o[j] for o in outputs]) for j in range(len(outputs[0])))
    perm = torch.tensor(order, device=joined[0].device)
    return sorted(done), tuple(t[perm.to(t.device)] for t in joined), failures
