"""The certificate against a solver's iterations from several starts, in TensorBoard: what a warm start saves.

:class:`ResidualCurves` is a Lightning callback that, every ``every_n_validations`` validations, runs a solver on the
first ``num_contexts`` validation contexts from zero (``objective.initial_point``) and from the amortizer's
prediction, records the problem's certificate ``objective.residual_flat`` of every iterate (a fixed point's
‖g(z) − z‖, OT's marginal error, a KKT residual, or the default stationarity residual), and logs
``figures/residual_curves``: the median and the 10–90% band of the residual against the iteration, on a log scale,
with the tolerance as a dashed line. Nothing in it knows an application.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.figures import ValidationFigureCallback, log_figure, new_figure
from lightning_amor.objective import Context, Objective, context_batch_size
from lightning_amor.solvers import Solver

RESIDUAL_FLOOR = 1e-12
"""Residuals are drawn no lower than this (an exact zero has no logarithm)."""


def residual_trace(solver: Solver, objective: Objective, x: Context, init: Optional[Tensor] = None) -> Tensor:
    """The certificate of every iterate of ``solver`` on contexts ``x`` from ``init`` (``None``: the solver's
    default start): ``K x B``, row k the residuals ``objective.residual_flat`` of the k-th iterate."""
    iterates: list[Tensor] = []
    solver.solve(objective, x, init=init, callback=lambda k, y: iterates.append(y.detach().clone()))
    return torch.stack([objective.residual_flat(y, x) for y in iterates]).float().cpu()


def residual_curves_figure(traces: dict[str, Tensor], tolerance: Optional[float] = None, title: str = "") -> Any:
    """Median (line) and 10–90% band (shaded) of ``K x B`` residual traces by label against the iteration, log y."""
    figure = new_figure(5.5, 3.8)
    ax = figure.subplots()
    for label, trace in traces.items():
        values = trace.double().clamp_min(RESIDUAL_FLOOR).numpy()
        steps = np.arange(values.shape[0])
        low, median, high = np.nanquantile(values, [0.1, 0.5, 0.9], axis=1)
        (line,) = ax.plot(steps, median, label=f"{label} (median)")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if tolerance is not None:
        ax.axhline(tolerance, color="black", linestyle="--", linewidth=1.2, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log")
    ax.set_xlabel("solver iteration")
    ax.set_ylabel("residual")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


class ResidualCurves(ValidationFigureCallback):
    """Logs the certificate against iterations of a solver from zero and from the prediction (see the module).

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, ... validation.
        num_contexts: validation contexts used (from the first validation batch).
        solver: the solver (default: the module's ``inference.solver``).
        tolerance: the dashed line (default: the module's ``inference`` tolerance).
        prefix: the tag prefix of the image.
    """

    def __init__(self, every_n_validations: int = 1, num_contexts: int = 64, solver: Optional[Solver] = None,
                 tolerance: Optional[float] = None, prefix: str = "figures") -> None:
        super().__init__(every_n_validations, num_contexts, prefix)
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"ResidualCurves: solver must be a lightning_amor.solvers.Solver, got {solver!r}")
        self.solver = solver
        self.tolerance = tolerance

    def draw(self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
             y_star: Optional[Tensor]) -> None:
        """Log ``figures/residual_curves`` for contexts ``x`` (``B`` of them) from zero and from the prediction."""
        solver = self.solver if self.solver is not None else pl_module.inference.solver
        tolerance = self.tolerance if self.tolerance is not None else pl_module.inference.tolerance_for(pl_module.dtype)
        prediction = pl_module(x).detach()
        traces = {"from zero": residual_trace(solver, pl_module.objective, x),
                  "from the prediction": residual_trace(solver, pl_module.objective, x, prediction)}
        step = trainer.global_step
        title = f"{type(solver).__name__}, {context_batch_size(x)} validation contexts, step {step}"
        log_figure(experiment, self.tag("residual_curves"), residual_curves_figure(traces, tolerance, title), step)
