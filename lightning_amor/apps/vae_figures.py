"""The tutorial's VAE sample figure in TensorBoard: reconstructions of a few validation images by iteration.

:class:`VAEReconstructions` shows, one row per validation image, the image itself, the decoded mean
sigmoid(decoder(μ)) of the amortized posterior (for SA-VAE every inner iterate λ̂⁰ … λ̂ᴷ), of SVI iterates run
from the prior (λ = 0) at a few iteration counts, and of the module's ``refine`` solver run from the prediction.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_amor.apps.vae import SVI, image_grid
from lightning_amor.figures import ValidationFigureCallback, log_figure, new_figure
from lightning_amor.objective import Context
from lightning_amor.solvers import Solver


def as_images(x: Tensor) -> Tensor:
    """Images ``B x C x H x W`` from contexts ``B x C x H x W`` or flat square images ``B x D`` (D = H²)."""
    if x.dim() == 4:
        return x
    side = math.isqrt(x[0].numel())
    if x.dim() == 2 and side * side == x.shape[1]:
        return x.reshape(x.shape[0], 1, side, side)
    raise ValueError(
        f"VAEReconstructions shows image contexts, B x C x H x W or B x D with D a square number, got "
        f"{tuple(x.shape)}; remove the callback for this data"
    )


def default_iterations(steps: int) -> list[int]:
    """0 and roughly steps/8, steps/4, steps/2, steps (distinct, increasing), as the tutorial's 0/250/…/2000."""
    return sorted({0, *(max(1, round(steps * f)) for f in (0.125, 0.25, 0.5, 1.0) if steps > 0)})


class VAEReconstructions(ValidationFigureCallback):
    """Logs ``figures/vae_reconstructions``: validation images (first column) and their reconstructions by iteration.

    Columns: the data; the amortized posterior's reconstruction (for a semi-amortized model each iterate
    ``ŷ⁰ … ŷᴷ``); ``solver`` (SVI from the prior λ = 0) after each count of ``iterations``; and the module's
    ``refine`` solver run from the prediction (``ŷ + refine``) when it has one and the batch has no references.

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, ... validation.
        num_contexts: images shown, one row each (the first ones of the first validation batch).
        solver: the solver from scratch (default ``SVI(steps=300, lr=0.05)``).
        iterations: iteration counts of ``solver`` shown (default 0, steps/8, steps/4, steps/2, steps); each at
            most the solver's ``steps``.
        prefix: the tag prefix.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_contexts: int = 8,
        solver: Optional[Solver] = None,
        iterations: Optional[Sequence[int]] = None,
        prefix: str = "figures",
    ) -> None:
        super().__init__(every_n_validations, num_contexts, prefix)
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"VAEReconstructions: solver must be a lightning_amor.solvers.Solver, got {solver!r}")
        self.solver = solver if solver is not None else SVI(steps=300, lr=0.05)
        steps = _steps(self.solver)
        shown = default_iterations(steps) if iterations is None else sorted({int(k) for k in iterations})
        if not shown or shown[0] < 0 or (steps is not None and shown[-1] > steps):
            raise ValueError(
                f"VAEReconstructions: iterations must be non-empty counts between 0 and the solver's {steps} steps, "
                f"got {list(iterations or [])}"
            )
        self.iterations = shown

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module.objective, "decode_mean"):
            raise TypeError(
                f"VAEReconstructions decodes posteriors with an ELBOObjective's decode_mean; "
                f"{type(pl_module.objective).__name__} has none: remove the callback from this recipe"
            )

    def columns(
        self, pl_module: pl.LightningModule, x: Context, y_star: Optional[Tensor]
    ) -> list[tuple[str, Tensor]]:
        """``(label, images B x C x H x W)`` for every column of the figure, the data first."""
        objective = pl_module.objective
        images = as_images(x)
        output = pl_module.predict_batch(x)
        shown = [("data", images)]
        if len(output.iterates) > 1:
            shown += [(f"ŷ{_superscript(k)}", objective.decode_mean(y, x)) for k, y in enumerate(output.iterates)]
        else:
            shown.append(("amortized", objective.decode_mean(output.y, x)))
        recorded: dict[int, Tensor] = {}

        def record(k: int, y: Tensor) -> None:
            if k in self.iterations:
                recorded[k] = y.detach().clone()

        self.solver.solve(objective, x, callback=record)
        name = type(self.solver).__name__
        shown += [(f"{name} {k}", objective.decode_mean(recorded[k], x)) for k in self.iterations if k in recorded]
        refined = pl_module.reference_solutions(x, output.y.detach(), y_star)
        if refined is not None:
            shown.append(("ŷ + refine" if y_star is None else "y*", objective.decode_mean(refined, x)))
        return [(label, as_images(column.detach())) for label, column in shown]

    def draw(
        self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
        y_star: Optional[Tensor],
    ) -> None:
        columns = self.columns(pl_module, x, y_star)
        labels = [label for label, _ in columns]
        per_image = [torch.stack([images[i] for _, images in columns]) for i in range(columns[0][1].shape[0])]
        grid = image_grid(per_image, pad=1)  # one row per image, one column per label
        channels, height, width = grid.shape
        cell = 0.45 * max(1.0, columns[0][1].shape[-1] / 16)
        figure = new_figure(max(4.0, cell * len(labels) + 1.0), cell * len(per_image) + 1.0)
        ax = figure.subplots()
        picture = grid[0] if channels == 1 else grid.permute(1, 2, 0)
        ax.imshow(picture.numpy(), cmap="gray" if channels == 1 else None, vmin=0.0, vmax=1.0,
                  interpolation="nearest")
        step_w = width / len(labels)
        ax.set_xticks([(i + 0.5) * step_w for i in range(len(labels))], labels, rotation=45, ha="left", fontsize=7)
        ax.xaxis.tick_top()
        ax.set_yticks([])
        ax.set_title(f"reconstructions by iteration, step {trainer.global_step}", fontsize=9)
        log_figure(experiment, self.tag("vae_reconstructions"), figure, trainer.global_step)


def _steps(solver: Solver) -> Optional[int]:
    """The solver's number of steps when it states one (SVI keeps it on its Adam)."""
    steps = getattr(solver, "steps", None)
    if steps is None and hasattr(solver, "adam"):
        steps = getattr(solver.adam, "steps", None)
    return steps


def _superscript(k: int) -> str:
    return str(k).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
