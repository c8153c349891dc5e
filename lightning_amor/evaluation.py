"""One evaluation for every recipe: how much a trained amortizer saves against a classical solver, on held-out contexts.

:func:`evaluate` measures, on a batch of ``B`` held-out contexts (a data module's fixed test set, or given ones):

- **the prediction**: ŷ = model(x), its wall time for the whole batch (after warm-up, the median of repeats,
  device synchronised) and its objective f(ŷ; x). Predictions that are NaN or infinite (or whose f is) are
  counted, reported and left out of everything below; they are never averaged into a result.
- **the amortization gap** f(ŷ) − f(y_ref) per context, with its quantiles, where y_ref is the data module's
  cached oracle solution when there is one, else the module's ``refine`` solver run from ŷ (as
  :meth:`~lightning_amor.module.AmortizedModule.reference_solutions` does), else the evaluation's solver run from ŷ.
- **the wrong-basin share**: the share of contexts whose prediction lies farther than the problem's
  ``Objective.basin_threshold`` from the reference in the problem's own distance (``distance_flat``). It is only
  reported for oracle references (a solver run from ŷ stays in ŷ's basin by construction) and when the problem
  sets a threshold.
- **the speed-up at matched quality**: a classical solver run from scratch (``objective.initial_point``), the
  iteration and time at which its batch-mean objective first reaches mean f(ŷ), against the prediction's time;
  and per context, the iterations it needs to reach that context's own f(ŷ). A solver that never gets there is
  reported as "not reached within N iterations" and the speed-up as a lower bound, never as a made-up number.
- **the warm-start saving**: the same solver from scratch and from ŷ, the iterations (per context) and time (for
  the whole batch) until the problem's certificate ``objective.residual_flat(y, x) <= tolerance``.

Timing. Every solver run happens twice or more: once recording what is measured at every iterate (the
``callback(k, y)`` of :meth:`~lightning_amor.solvers.Solver.solve`; this run also warms the solver up), then
``repeats`` times with a callback that only reads the clock (after synchronising a CUDA device), with the same
seed, so the clock never includes the bookkeeping. The seconds at iteration k are the median over those runs.

The default solver is the recipe's own, ``module.inference.solver``: the one it refines predictions with and falls
back on (``lightning-amor solve``), with the step sizes the recipe tuned for the problem, i.e. what a user would run
instead of the amortizer. Another is given with ``solver=``. The default tolerance is the recipe's
``module.inference.tolerance``, the residual it accepts as solved.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor

from lightning_amor.objective import Context, Objective, context_batch_size, context_index
from lightning_amor.runtime import evaluation_mode, to_device
from lightning_amor.solvers import Solver

NOT_REACHED = -1
"""The iteration count of a context whose solver never reached the target."""

GAP_QUANTILES = (0.5, 0.9, 0.99)
"""The quantile levels of the amortization gap in the report."""


class EvaluationError(ValueError):
    """The evaluation cannot run: no usable prediction, a solver without an iteration budget, bad sizes."""


# --- solver runs --------------------------------------------------------------------------------------------------


@dataclass
class SolverCurve:
    """A solver's run on ``B`` contexts from one start, recorded at every iteration.

    Attributes:
        start: where the solver started (``scratch`` or ``prediction``).
        iterations: ``K`` iteration numbers 0, 1, ..., K − 1 (fewer than the budget when the solver stopped).
        seconds: ``K`` solver-only seconds to reach each iteration (median of the timed runs).
        objective: ``K x B`` values f(y_k; x).
        residual: ``K x B`` certificates ``objective.residual_flat(y_k, x)``.
    """

    start: str
    iterations: Tensor
    seconds: Tensor
    objective: Tensor
    residual: Tensor

    def seconds_at(self, iteration: int) -> float:
        """Solver seconds to reach ``iteration`` (one of :attr:`iterations`)."""
        index = int(torch.searchsorted(self.iterations, torch.tensor(iteration)))
        return float(self.seconds[index])

    @property
    def iterations_run(self) -> int:
        """The last recorded iteration."""
        return int(self.iterations[-1])


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators seeded with ``seed`` inside the block and put back afterwards, so that a solver's fresh
    noise is the same in the recorded and the timed runs and the caller's random numbers are left alone."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def record_solver(
    solver: Solver, objective: Objective, x: Context, init: Optional[Tensor], start: str, device: torch.device,
    seed: int = 0, repeats: int = 3,
) -> SolverCurve:
    """Run ``solver`` on contexts ``x`` (``B``, on ``device``) from ``init`` (``B x n``; ``None``: from scratch) and
    record f and the certificate of every iterate, then time ``repeats`` runs that only read the clock.

    Raises:
        EvaluationError: ``repeats`` is below 1.
    """
    if repeats < 1:
        raise EvaluationError(f"repeats must be at least 1, got {repeats}")
    values: list[Tensor] = []
    residuals: list[Tensor] = []

    def measure(k: int, y: Tensor) -> None:
        with torch.no_grad():
            values.append(objective(y, x).detach())
        residuals.append(objective.residual_flat(y, x))

    with _seeded(seed, device):
        solver.solve(objective, x, init=init, callback=measure)
    timings = [_clock(solver, objective, x, init, seed, device) for _ in range(repeats)]
    count = min(len(values), *(len(t) for t in timings))  # a stochastic solver may stop at another iteration
    seconds = torch.stack([t[:count] for t in timings]).median(0).values
    return SolverCurve(
        start=start,
        iterations=torch.arange(count),
        seconds=seconds,
        objective=torch.stack(values[:count]).float().cpu(),
        residual=torch.stack(residuals[:count]).float().cpu(),
    )


def _clock(solver: Solver, objective: Objective, x: Context, init: Optional[Tensor], seed: int,
           device: torch.device) -> Tensor:
    """Seconds from the solver's start to each iteration, read by a callback that does nothing else: ``K``."""
    stamps: list[float] = []

    def stamp(k: int, y: Tensor) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    with _seeded(seed, device):
        synchronize(device)
        begin = time.perf_counter()
        solver.solve(objective, x, init=init, callback=stamp)
    return torch.tensor(stamps, dtype=torch.float64) - begin


def first_reached(values: Tensor, target: Union[Tensor, float]) -> Tensor:
    """The first iteration at which each context's ``values`` (``K x B``, iteration k in row k) is at most its
    ``target`` (a number or ``B``): ``B`` int64, :data:`NOT_REACHED` where it never is (NaN never reaches)."""
    hit = values <= (target if isinstance(target, Tensor) else torch.tensor(float(target)))
    first = hit.to(torch.int64).argmax(0)
    return torch.where(hit.any(0), first, torch.full_like(first, NOT_REACHED))


def with_budget(solver: Solver, iterations: Optional[int]) -> Solver:
    """A copy of ``solver`` that runs at most ``iterations`` iterations (its ``steps``; a solver that wraps one
    solver, as ``SVI`` wraps Adam, has it set on the wrapped one); ``None``: the solver as it is.

    Raises:
        EvaluationError: the solver has no ``steps`` to set, or ``iterations`` is below 1.
    """
    if iterations is None:
        return solver
    if iterations < 1:
        raise EvaluationError(f"the solver's iteration budget must be at least 1, got {iterations}")
    clone = copy.deepcopy(solver)
    target: Any = clone
    while not hasattr(target, "steps"):
        inner = [value for value in vars(target).values() if isinstance(value, Solver)]
        if len(inner) != 1:
            raise EvaluationError(
                f"{type(solver).__name__} has no `steps` to set an iteration budget on; pass a solver with a `steps` "
                "argument (e.g. lightning_amor.solvers.Adam), or leave the budget to the solver"
            )
        target = inner[0]
    target.steps = int(iterations)
    return clone


# --- the report -----------------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured on ``B`` held-out contexts with finite predictions.

    Attributes:
        name: what was evaluated (a recipe or checkpoint name), for titles.
        model: the model's description (amortizer on objective).
        device: where it ran.
        contexts: ``B``, the contexts evaluated (finite predictions).
        nonfinite: predictions left out because they (or their f) are NaN or infinite.
        prediction_seconds: the prediction's wall time for the batch of ``B + nonfinite`` contexts (median).
        reference: how the references were obtained.
        oracle_references: whether they are the oracle's (global) solutions, not a solver's run from ŷ.
        solver: the classical solver's description.
        tolerance: the certificate's tolerance for the warm-start saving.
        f_pred: ``B`` values f(ŷ; x).
        f_ref: ``B`` values f(y_ref; x).
        distance: ``B`` distances ``objective.distance_flat(ŷ, y_ref)``.
        basin_threshold: the problem's ``basin_threshold`` when the wrong-basin share is meaningful, else ``None``.
        scratch: the solver from ``objective.initial_point``.
        warm: the solver from ŷ.
    """

    name: str
    model: str
    device: str
    contexts: int
    nonfinite: int
    prediction_seconds: float
    reference: str
    oracle_references: bool
    solver: str
    tolerance: float
    f_pred: Tensor
    f_ref: Tensor
    distance: Tensor
    basin_threshold: Optional[float]
    scratch: SolverCurve
    warm: SolverCurve

    # --- derived measurements ---

    @property
    def target(self) -> float:
        """The amortized quality: mean f(ŷ) over the contexts."""
        return float(self.f_pred.mean())

    @property
    def gap(self) -> Tensor:
        """``B`` amortization gaps f(ŷ) − f(y_ref)."""
        return self.f_pred - self.f_ref

    def gap_quantiles(self) -> dict[str, float]:
        """Mean, the :data:`GAP_QUANTILES` and the largest amortization gap."""
        gap = self.gap.double()
        out = {"mean": float(gap.mean())}
        out.update({f"p{round(100 * q)}": float(torch.quantile(gap, q)) for q in GAP_QUANTILES})
        out["max"] = float(gap.max())
        return out

    @property
    def wrong_basin_share(self) -> Optional[float]:
        """Share of contexts farther than :attr:`basin_threshold` from the reference, or ``None`` (no threshold)."""
        if self.basin_threshold is None:
            return None
        return float((self.distance > self.basin_threshold).double().mean())

    @property
    def matched_iteration(self) -> Optional[int]:
        """The first iteration at which the solver from scratch reaches mean f(ŷ) (``None``: not reached)."""
        reached = int(first_reached(self.scratch.objective.mean(1, keepdim=True), self.target)[0])
        return None if reached == NOT_REACHED else reached

    @property
    def matched_seconds(self) -> Optional[float]:
        """The solver's seconds to :attr:`matched_iteration` (``None``: not reached)."""
        k = self.matched_iteration
        return None if k is None else self.scratch.seconds_at(k)

    @property
    def speedup(self) -> float:
        """Solver seconds to the amortized quality / prediction seconds; when not reached, the solver's seconds for
        every iteration it ran over the prediction's: a lower bound (see :attr:`matched_iteration`)."""
        seconds = self.matched_seconds
        if seconds is None:
            seconds = float(self.scratch.seconds[-1])
        return seconds / self.prediction_seconds

    @property
    def per_context_matched(self) -> Tensor:
        """``B`` iterations the solver from scratch needs to reach each context's own f(ŷ) (:data:`NOT_REACHED`)."""
        return first_reached(self.scratch.objective, self.f_pred)

    def certified(self, curve: SolverCurve) -> Tensor:
        """``B`` iterations at which ``curve`` first certifies each context (residual ≤ tolerance), or
        :data:`NOT_REACHED`."""
        return first_reached(curve.residual, self.tolerance)

    def batch_certified(self, curve: SolverCurve) -> Optional[int]:
        """The iteration at which every context of ``curve`` is certified (``None``: some never are)."""
        per_context = self.certified(curve)
        if bool((per_context == NOT_REACHED).any()):
            return None
        return int(per_context.max())

    # --- output ---

    def summary(self) -> dict[str, Any]:
        """Every number of the report (JSON-serialisable; ``None`` where a target was not reached)."""
        matched = self.per_context_matched
        out: dict[str, Any] = {
            "name": self.name, "model": self.model, "device": self.device, "contexts": self.contexts,
            "nonfinite_predictions": self.nonfinite, "prediction_ms": 1000 * self.prediction_seconds,
            "reference": self.reference, "solver": self.solver, "tolerance": self.tolerance,
            "mean_f_prediction": self.target, "mean_f_reference": float(self.f_ref.mean()),
            "gap": self.gap_quantiles(), "distance_median": float(self.distance.median()),
            "basin_threshold": self.basin_threshold, "wrong_basin_share": self.wrong_basin_share,
            "scratch_iterations_run": self.scratch.iterations_run,
            "matched_iteration": self.matched_iteration,
            "matched_ms": None if self.matched_seconds is None else 1000 * self.matched_seconds,
            "speedup": self.speedup, "speedup_is_lower_bound": self.matched_iteration is None,
            "per_context_matched": _iteration_stats(matched),
        }
        for curve in (self.scratch, self.warm):
            batch = self.batch_certified(curve)
            out[f"certified_from_{curve.start}"] = {
                **_iteration_stats(self.certified(curve)), "iterations_run": curve.iterations_run,
                "all_certified_iteration": batch,
                "all_certified_ms": None if batch is None else 1000 * curve.seconds_at(batch),
            }
        return out

    def table(self) -> str:
        """The report as a Markdown table of quantity | value, with "not reached" where a target was not."""
        s = self.summary()
        rows = [
            ("contexts evaluated", f"{self.contexts}" + (
                f" (**{self.nonfinite} NaN/inf predictions left out**)" if self.nonfinite else " (no NaN prediction)"
            )),
            (f"prediction time for the batch ({self.device})", _ms(self.prediction_seconds)),
            ("reference", self.reference),
            ("mean f(ŷ) / mean f(y_ref)", f"{_num(self.target)} / {_num(s['mean_f_reference'])}"),
            ("amortization gap f(ŷ) − f(y_ref): mean, p50, p90, p99, max",
             ", ".join(_num(s["gap"][k]) for k in ("mean", "p50", "p90", "p99", "max"))),
            ("wrong-basin share", _share(self)),
            ("solver", f"`{self.solver}`"),
        ]
        k, budget = self.matched_iteration, self.scratch.iterations_run
        if k is None:
            rows += [
                ("solver from scratch to mean f(ŷ)", f"not reached within {budget} iterations "
                 f"({_ms(float(self.scratch.seconds[-1]))})"),
                ("speed-up at matched quality", f"> {self.speedup:,.1f}× (lower bound: the solver never got there)"),
            ]
        else:
            rows += [
                ("solver from scratch to mean f(ŷ)", f"{k} iterations, {_ms(self.matched_seconds)}"),
                ("speed-up at matched quality", f"{self.speedup:,.1f}×"),
            ]
        rows.append(("per context: iterations to its own f(ŷ) (median, p90, reached)",
                     _stats_text(s["per_context_matched"], budget)))
        for curve, label in ((self.scratch, "from scratch"), (self.warm, "from ŷ (warm start)")):
            c = s[f"certified_from_{curve.start}"]
            batch = c["all_certified_iteration"]
            whole = (f"all by iteration {batch}, {_ms(c['all_certified_ms'] / 1000)}" if batch is not None else
                     f"not all within {c['iterations_run']} iterations")
            rows.append((f"residual ≤ {self.tolerance:g} {label}: iterations (median, p90, reached); whole batch",
                         f"{_stats_text(c, c['iterations_run'])}; {whole}"))
        lines = ["| quantity | value |", "|---|---|"] + [f"| {q} | {v} |" for q, v in rows]
        return "\n".join(lines)

    def section(self, title: str, command: Optional[str] = None, machine: Optional[str] = None) -> str:
        """A ``title`` section of a results file: the command, the machine, the table and what it means."""
        lines = [title, ""]
        if command:
            lines.append(f"Command: `{command}`  ")
        if machine:
            lines.append(f"Machine: {machine}  ")
        lines += [
            f"Model: {self.model}; {self.contexts + self.nonfinite} held-out contexts.",
            "",
            self.table(),
            "",
            "Matched quality := the first iteration at which the solver's batch-mean f, run from "
            "`objective.initial_point`, is at most the prediction's mean f(ŷ); its time is the median of clean runs "
            "that only read the clock (device synchronised), the prediction's the median of repeated calls after "
            "warm-up. The certificate is `objective.residual_flat` (the problem's residual, by default "
            "‖y − P(y − ∇f(y))‖).",
        ]
        return "\n".join(lines) + "\n"


def _iteration_stats(per_context: Tensor) -> dict[str, Any]:
    reached = per_context[per_context != NOT_REACHED].double()
    return {
        "reached": int(reached.numel()),
        "of": int(per_context.numel()),
        "median": float(reached.median()) if reached.numel() else None,
        "p90": float(torch.quantile(reached, 0.9)) if reached.numel() else None,
    }


def _stats_text(stats: dict[str, Any], budget: int) -> str:
    if not stats["reached"]:
        return f"none reached within {budget} iterations"
    return f"{stats['median']:.0f}, {stats['p90']:.0f}, {stats['reached']}/{stats['of']}"


def _share(report: EvaluationReport) -> str:
    share = report.wrong_basin_share
    if share is None:
        return "not measured (the objective sets no basin_threshold)" if report.oracle_references else (
            "not measured (needs oracle references: a solver run from ŷ stays in ŷ's basin)")
    return f"{100 * share:.2f}% farther than {report.basin_threshold:.4g} from y_ref"


def _num(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.4g} ms"


# --- the evaluation -------------------------------------------------------------------------------------------------


def held_out(data: Any, objective: Objective, size: Optional[int] = None) -> tuple[Context, Optional[Tensor]]:
    """The first ``size`` contexts of a data module's fixed test set (all of it when ``None``) and, when the
    objective's references can be solved once, their cached oracle solutions ``size x n`` (else ``None``).

    Raises:
        EvaluationError: ``size`` is not between 1 and the test set's size.
    """
    total = data.test_size
    size = total if size is None else size
    if not 1 <= size <= total:
        raise EvaluationError(f"asked for {size} held-out contexts, but the test set holds {total}; pass a number "
                              f"from 1 to {total}, or raise data.init_args.test_size")
    data.attach(objective)
    fixed = data.fixed_set("test", total, with_targets=objective.references_fixed)
    keep = slice(0, size)
    y_star = fixed.get("y_star")
    return context_index(fixed["x"], keep), (y_star[keep] if y_star is not None else None)


def evaluate(
    module: Any,
    data: Any,
    references: Optional[Tensor] = None,
    *,
    size: Optional[int] = None,
    solver: Optional[Solver] = None,
    max_iterations: Optional[int] = None,
    tolerance: Optional[float] = None,
    repeats: int = 3,
    warmup: int = 3,
    prediction_repeats: Optional[int] = None,
    seed: int = 0,
    name: Optional[str] = None,
) -> EvaluationReport:
    """Evaluate a trained :class:`~lightning_amor.module.AmortizedModule` against a classical solver.

    Args:
        module: the model, on the device to evaluate on (it is evaluated in eval mode and left as it was).
        data: a :class:`~datamodules.context.ContextDataModule` (its fixed test set) or a batch of contexts.
        references: ``B x n`` reference solutions of given contexts, taken as global minimizers (for the
            wrong-basin share); with a data module they come from its cache.
        size: evaluate the first ``size`` contexts of the data module's test set (default: all of it).
        solver: the classical solver (default: the recipe's ``module.inference.solver``).
        max_iterations: the solver's iteration budget (default: its own ``steps``).
        tolerance: the certificate tolerance of the warm-start saving (default: ``module.inference.tolerance``).
        repeats: timed runs of each solver run (the median is reported).
        warmup: untimed predictions before timing.
        prediction_repeats: timed predictions (default: ``repeats``; a prediction is short, so more are cheap).
        seed: the seed of the solvers' random numbers (the same in every run; the caller's generators are kept).
        name: what is evaluated, for titles (default: the model class).

    Returns:
        An :class:`EvaluationReport`.

    Raises:
        EvaluationError: every prediction is NaN or infinite, bad sizes or budgets.
    """
    prediction_repeats = repeats if prediction_repeats is None else prediction_repeats
    if min(repeats, prediction_repeats) < 1 or warmup < 0:
        raise EvaluationError(f"repeats must be at least 1 and warmup at least 0, got {repeats}, "
                              f"{prediction_repeats} (predictions) and {warmup}")
    objective = module.objective
    given = isinstance(data, (Tensor, dict))
    if given:
        x, y_star = data, references
    else:
        x, y_star = held_out(data, objective, size)
    device = module.device
    x = to_device(x, device)
    y_star = y_star.to(device) if y_star is not None else None
    solver = with_budget(solver if solver is not None else module.inference.solver, max_iterations)
    tolerance = float(module.inference.tolerance_for(module.dtype) if tolerance is None else tolerance)
    total = context_batch_size(x)

    with evaluation_mode(module):
        y, prediction_seconds = _timed_prediction(module, x, warmup, prediction_repeats)
        with torch.no_grad():
            f_pred = objective(y, x)
        finite = torch.isfinite(y).all(-1) & torch.isfinite(f_pred)
        count = int(finite.sum())
        if count == 0:
            raise EvaluationError(
                f"all {total} predictions (or their objective values) are NaN or infinite: there is nothing to "
                "evaluate; check the checkpoint (was training stable?) and the contexts"
            )
        if count < total:
            index = finite.nonzero().flatten()
            x, y, f_pred = context_index(x, index), y[index], f_pred[index]
            y_star = y_star[index] if y_star is not None else None
        y_ref, reference, oracle = _references(module, solver, x, y, y_star, seed, given)
        with torch.no_grad():
            f_ref = objective(y_ref, x)
            distance = objective.distance_flat(y, y_ref)
        scratch = record_solver(solver, objective, x, None, "scratch", device, seed, repeats)
        warm = record_solver(solver, objective, x, y, "prediction", device, seed, repeats)

    threshold = getattr(objective, "basin_threshold", None)
    return EvaluationReport(
        name=name or type(module).__name__,
        model=f"{type(module.amortizer).__name__} on {type(objective).__name__}",
        device=str(device),
        contexts=count,
        nonfinite=total - count,
        prediction_seconds=prediction_seconds,
        reference=reference,
        oracle_references=oracle,
        solver=repr(solver),
        tolerance=tolerance,
        f_pred=f_pred.detach().float().cpu(),
        f_ref=f_ref.detach().float().cpu(),
        distance=distance.detach().float().cpu(),
        basin_threshold=threshold if oracle else None,
        scratch=scratch,
        warm=warm,
    )


def _timed_prediction(module: Any, x: Context, warmup: int, repeats: int) -> tuple[Tensor, float]:
    """The prediction ``B x n`` and the median in seconds of ``repeats`` of the module's synchronised
    :meth:`~lightning_amor.module.AmortizedModule.timed_prediction` after ``warmup`` calls."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            y, elapsed_ms = module.timed_prediction(x)
            if i >= warmup:
                times.append(elapsed_ms / 1000.0)
    return y.detach(), statistics.median(times)


def _references(module: Any, solver: Solver, x: Context, y: Tensor, y_star: Optional[Tensor],
                seed: int, given: bool) -> tuple[Tensor, str, bool]:
    """The references ``B x n`` of the evaluated contexts, a sentence on where they come from, and whether they are
    global minimizers (the oracle's, or given as such)."""
    if y_star is not None:
        return y_star, ("the caller's references" if given else
                        "the oracle's solutions (`Objective.solve`), cached by the data module"), True
    if module.refine is not None:
        with _seeded(seed, y.device):
            refined = module.reference_solutions(x, y, None)
        return refined, f"`{module.refine!r}` run from ŷ (the recipe's `refine`)", False
    if module.objective.has_oracle:
        return module.objective.solve_flat(x), "the oracle's solutions (`Objective.solve`)", True
    with _seeded(seed, y.device):
        refined = solver.solve(module.objective, x, init=y).y
    return refined, f"`{solver!r}` run from ŷ (no oracle, no `refine`)", False
