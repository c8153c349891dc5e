"""TensorBoard figures of Meta OT: Sinkhorn's marginal error against its iterations from three starts.

:class:`SinkhornWarmStartFigures` runs :class:`~lightning_amor.apps.sinkhorn.Sinkhorn` on validation problems from
zero (the cold start), from the Gaussian potential (:func:`~lightning_amor.apps.meta_ot.gaussian_potential`, a
training-free baseline) and from the model's predicted potential, and logs the mean and spread of log10 of the marginal
error against the iteration (log scale), with the tolerance as a line: the protocol of the Meta OT paper, at every
``every_n_validations``-th validation.
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.apps.meta_ot import entropic_objective, gaussian_potential
from lightning_amor.apps.sinkhorn import Sinkhorn
from lightning_amor.figures import ValidationFigureCallback, curve_figure, log_figure
from lightning_amor.objective import Context

STARTS = ("cold (f = 0)", "Gaussian", "predicted")


def warm_start_traces(module: Any, x: Tensor, solver: Sinkhorn) -> dict[str, Tensor]:
    """The ``(K + 1) x B`` marginal errors of ``solver`` on problems ``x`` (``B x 2 x n``) from each of
    :data:`STARTS` (a problem that stopped keeps its last error), by start."""
    objective = entropic_objective(module.objective, "warm_start_traces")
    starts = {STARTS[0]: None, STARTS[1]: gaussian_potential(x, objective.side), STARTS[2]: module(x).detach()}
    traces = {}
    for name, init in starts.items():
        solver.solve(objective, x, init)
        traces[name] = solver.last_errors.float().cpu()
    return traces


class SinkhornWarmStartFigures(ValidationFigureCallback):
    """Logs ``{prefix}/sinkhorn_warm_start``: Sinkhorn's marginal error against iterations from the three
    :data:`STARTS` on the first ``num_contexts`` validation problems (the mean of log10 of the error ± one
    standard deviation over the problems; a problem that stopped keeps its last error).

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, ... validation.
        num_contexts: validation problems used.
        steps: Sinkhorn's iterations at most.
        tol: the marginal error at which a problem stops (drawn as a line).
        prefix: the tag prefix.
    """

    def __init__(self, every_n_validations: int = 1, num_contexts: int = 64, steps: int = 500,
                 tol: float = 1e-3, prefix: str = "figures") -> None:
        super().__init__(every_n_validations, num_contexts, prefix)
        self.solver = Sinkhorn(steps=steps, tol=tol)

    def draw(self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
             y_star: Optional[Tensor]) -> None:
        traces = warm_start_traces(pl_module, x, self.solver)
        length = max(t.shape[0] for t in traces.values())
        padded = {name: torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) for name, t in traces.items()}
        figure = curve_figure(
            torch.arange(length), {name: t.clamp_min(1e-12).log10() for name, t in padded.items()},
            {f"tolerance {self.solver.tol:g}": float(torch.tensor(self.solver.tol).log10())},
            xlabel="Sinkhorn iteration", ylabel="log10 marginal error", spread="std",
            title=f"marginal error from three starts ({x.shape[0]} problems, step {trainer.global_step})",
        )
        log_figure(experiment, self.tag("sinkhorn_warm_start"), figure, trainer.global_step)
