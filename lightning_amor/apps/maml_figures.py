"""TensorBoard figures of meta-learning: the adaptation curve, query loss against inner step, with 95% intervals."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_amor.apps.maml import AdaptationSummary, MAMLModule


def adaptation_figure(summaries: dict[str, AdaptationSummary]) -> Any:
    """A matplotlib figure of the mean query loss against inner steps with a 95% band, one line per named curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, summary in summaries.items():
        steps = list(summary.steps)
        mean, half = summary.mean.double().numpy(), summary.half_width.double().numpy()
        ax.plot(steps, mean, marker="o", label=name)
        ax.fill_between(steps, mean - half, mean + half, alpha=0.25)
    ax.set_xlabel("inner gradient steps on the support set")
    ax.set_ylabel("query loss, held-out tasks")
    if all(bool((s.mean > 0).all()) for s in summaries.values()):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(summaries) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


class AdaptationCurves(pl.Callback):
    """Adds ``{val,test}/adaptation_curve`` to TensorBoard: the curve a :class:`~lightning_amor.apps.maml.MAMLModule`
    measured on the held-out tasks at the end of every ``every_n_validations``-th validation, and of every test.

    Args:
        every_n_validations: draw at every n-th validation (1: each).
    """

    def __init__(self, every_n_validations: int = 1) -> None:
        if every_n_validations < 1:
            raise ValueError(f"AdaptationCurves: every_n_validations must be at least 1, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self._validations = 0

    def _draw(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if not isinstance(module, MAMLModule):
            raise TypeError(f"AdaptationCurves works with a MAMLModule, got {type(module).__name__}")
        summary = module.adaptation.get(stage)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if summary is None or not trainer.is_global_zero or not hasattr(experiment, "add_figure"):
            return
        experiment.add_figure(f"{stage}/adaptation_curve", adaptation_figure({stage: summary}), summary.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the validation's curve (not during the sanity check)."""
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations == 0:
            self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the test's curve."""
        self._draw(trainer, pl_module, "test")


__all__ = ["AdaptationCurves", "adaptation_figure"]
