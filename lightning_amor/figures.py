"""Figures in TensorBoard: the amortization gap per context and a classical solver's curves against the amortized level.

:class:`AmortizationFigures` is a Lightning callback that, every ``every_n_validations`` validations, takes the first
``num_contexts`` contexts of the first validation batch and logs to the trainer's TensorBoard logger:

- ``val/gap_per_context`` (a histogram) and ``figures/gap_histogram`` (an image): f(ŷ) − f(y*) per context;
- ``figures/solver_curves`` (an image): the mean objective of a classical solver run from scratch, against its
  iterations and against wall-clock seconds, with the amortized level mean f(ŷ) (and mean f(y*)) as horizontal lines,
  like the tutorial's Figures 4.1–4.3.

The plotting helpers (:func:`curve_figure`, :func:`histogram_figure`) know nothing of amortization, so other
applications reuse them (residual-vs-iteration curves of Sinkhorn or a DEQ, control trajectories). Without a
TensorBoard logger the callbacks do nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import matplotlib
import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from lightning_amor.module import AmortizedModule, unpack_batch
from lightning_amor.objective import Context, Objective, context_batch_size, context_index
from lightning_amor.solvers import Adam, Solver

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]

SPREADS = ("std", "lines", "none")


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


# --- plotting helpers (no application knowledge) -----------------------------------------------------------------

def curve_figure(
    x: ArrayLike,
    curves: Mapping[str, ArrayLike],
    levels: Optional[Mapping[str, float]] = None,
    xlabel: str = "iteration",
    ylabel: str = "objective",
    title: Optional[str] = None,
    spread: str = "std",
    logx: bool = False,
    logy: bool = False,
    ax: Optional[Axes] = None,
) -> Figure:
    """Curves against a shared x-axis, with horizontal reference levels.

    Args:
        x: ``K`` x-values (iterations, seconds, time steps).
        curves: label -> ``K`` values, or ``K x B`` values of B runs (contexts) drawn as their mean with
            ``spread``.
        levels: label -> a value drawn as a dashed horizontal line (e.g. the amortized level mean f(ŷ)).
        xlabel, ylabel, title: the axes' labels and title.
        spread: for ``K x B`` curves: ``std`` (mean ± one standard deviation, shaded), ``lines`` (every run as a
            thin line, e.g. trajectories), ``none`` (the mean only).
        logx, logy: logarithmic axes (e.g. residuals).
        ax: draw into these axes (a panel of a larger figure) instead of a new figure.

    Returns:
        The figure that holds the axes (close it after logging, or use :func:`log_figure`).

    Raises:
        ValueError: For an unknown ``spread`` or a curve whose length differs from ``x``.
    """
    if spread not in SPREADS:
        raise ValueError(f"curve_figure: spread must be one of {SPREADS}, got {spread!r}")
    if ax is None:
        ax = new_figure(5.0, 3.6).subplots()
    xs = _numpy(x)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(curves.items()):
        ys = _numpy(values)
        if ys.shape[0] != xs.shape[0] or ys.ndim not in (1, 2):
            raise ValueError(
                f"curve_figure: curve {label!r} has shape {ys.shape}; expected ({xs.shape[0]},) or "
                f"({xs.shape[0]}, B) to match the {xs.shape[0]} x-values"
            )
        color = colors[i % len(colors)]
        if ys.ndim == 1:
            ax.plot(xs, ys, color=color, label=label)
        elif spread == "lines":
            ax.plot(xs, ys, color=color, alpha=0.35, linewidth=0.8)
            ax.plot(xs, ys.mean(1), color=color, linewidth=2.0, label=f"{label} (mean)")
        else:
            mean = ys.mean(1)
            ax.plot(xs, mean, color=color, label=label)
            if spread == "std":
                std = ys.std(1)
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    styles = ("--", ":", "-.")
    for i, (label, value) in enumerate((levels or {}).items()):
        ax.axhline(float(value), color="black", linestyle=styles[i % len(styles)], linewidth=1.2, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


def histogram_figure(
    values: ArrayLike, xlabel: str = "value", title: Optional[str] = None, bins: int = 30, ax: Optional[Axes] = None,
) -> Figure:
    """A histogram of ``N`` values with their mean and median marked.

    Args:
        values: ``N`` numbers (non-finite ones are counted in the title, not drawn).
        xlabel, title: the axis label and title.
        bins: the number of bins.
        ax: draw into these axes instead of a new figure.

    Returns:
        The figure that holds the axes.
    """
    if ax is None:
        ax = new_figure(5.0, 3.6).subplots()
    data = _numpy(values).reshape(-1)
    finite = data[np.isfinite(data)]
    ax.hist(finite, bins=bins, color="tab:blue", alpha=0.8)
    if finite.size:
        ax.axvline(float(finite.mean()), color="black", linestyle="--", label=f"mean {finite.mean():.4g}")
        ax.axvline(float(np.median(finite)), color="tab:red", linestyle=":", label=f"median {np.median(finite):.4g}")
        ax.legend(fontsize=8)
    dropped = data.size - finite.size
    heading = f"{title or ''}{' ' if title else ''}({finite.size} values{f', {dropped} non-finite' if dropped else ''})"
    ax.set_title(heading, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return ax.figure


# --- TensorBoard plumbing ---------------------------------------------------------------------------------------

def tensorboard_experiment(trainer: pl.Trainer) -> Any:
    """The ``SummaryWriter`` of the trainer's first :class:`TensorBoardLogger` on global rank 0, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure of ``width x height`` inches outside pyplot (no GUI backend, nothing to leak: it is
    rendered by the Agg canvas when logged and freed with its last reference)."""
    return Figure(figsize=(width, height), layout="constrained")


def log_figure(experiment: Any, tag: str, figure: Figure, step: int) -> None:
    """Log a matplotlib figure as an image under ``tag`` (``add_figure`` renders it with Agg, then closes it)."""
    experiment.add_figure(tag, figure, global_step=step, close=True)


class ValidationFigureCallback(Callback):
    """Base of the figure callbacks: keeps the first validation batch's first ``num_contexts`` contexts (all of
    them when the batch is smaller; with their y* when the batch has them) and calls :meth:`draw` at the end of
    every ``every_n_validations``-th validation (sanity checks excluded) on rank 0 when the trainer has a
    TensorBoard logger. Subclasses implement :meth:`draw`. The random generators' states are restored after
    drawing, so a run trains the same with or without figures.

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, (2N+1)-th, ... validation.
        num_contexts: how many validation contexts the figures use.
        prefix: the tag prefix of the images.
    """

    def __init__(self, every_n_validations: int = 1, num_contexts: int = 64, prefix: str = "figures") -> None:
        if every_n_validations < 1:
            raise ValueError(
                f"{type(self).__name__}: every_n_validations must be at least 1, got {every_n_validations}"
            )
        if num_contexts < 1:
            raise ValueError(f"{type(self).__name__}: num_contexts must be at least 1, got {num_contexts}")
        self.every_n_validations = every_n_validations
        self.num_contexts = num_contexts
        self.prefix = prefix
        self.validations = 0
        self._batch: Optional[tuple[Context, Optional[Tensor]]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and tensorboard_experiment(trainer) is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, AmortizedModule):
            raise TypeError(
                f"{type(self).__name__} draws figures of an AmortizedModule, got {type(pl_module).__name__}"
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._batch is not None or dataloader_idx != 0 or not self._active(trainer):
            return
        x, y_star = unpack_batch(batch)
        keep = slice(0, min(self.num_contexts, context_batch_size(x)))
        self._batch = (context_index(x, keep), y_star[keep] if y_star is not None else None)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self.validations % self.every_n_validations == 0
        self.validations += 1
        batch, self._batch = self._batch, None
        experiment = tensorboard_experiment(trainer)
        if not due or batch is None or experiment is None:
            return
        # Drawing must not change training: whatever random numbers the figures draw (a solver's fresh noise, say)
        # come from a copy of the generators' state, which is put back afterwards.
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            self.draw(experiment, trainer, pl_module, *batch)

    def draw(
        self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
        y_star: Optional[Tensor],
    ) -> None:
        """Log this callback's figures for contexts ``x`` (``B`` contexts) and their ``B x n`` references (or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw(...)")

    def tag(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


# --- solver trajectories ----------------------------------------------------------------------------------------

@dataclass
class SolverTrace:
    """A solver's run from scratch, recorded by the ``Solver.solve`` callback.

    Attributes:
        iterations: ``K`` iteration numbers at which the iterate was recorded.
        seconds: ``K`` wall-clock seconds since the solver started (device synchronised).
        values: ``K x B`` objective values f(y_k; x) of the recorded iterates.
    """

    iterations: Tensor
    seconds: Tensor
    values: Tensor


def trace_solver(
    solver: Solver, objective: Objective, x: Context, init: Optional[Tensor] = None, record_every: int = 1,
) -> SolverTrace:
    """Run ``solver`` on contexts ``x`` (``B`` of them) and record f of every ``record_every``-th iterate.

    The iterates are copied during the run and evaluated afterwards, so the recorded seconds time the solver
    (plus the copies), not the evaluation.
    """
    if record_every < 1:
        raise ValueError(f"trace_solver: record_every must be at least 1, got {record_every}")
    iterates: list[tuple[int, float, Tensor]] = []
    cuda = None

    def record(k: int, y: Tensor) -> None:
        if k % record_every == 0:
            if cuda is not None:
                torch.cuda.synchronize(cuda)
            iterates.append((k, time.perf_counter() - start, y.detach().clone()))

    first = x if isinstance(x, Tensor) else next(iter(x.values()))
    cuda = first.device if first.device.type == "cuda" else None
    start = time.perf_counter()
    solver.solve(objective, x, init=init, callback=record)
    values = torch.stack([objective(y, x).detach() for _, _, y in iterates]) if iterates else torch.empty(0, 0)
    return SolverTrace(
        iterations=torch.tensor([k for k, _, _ in iterates]),
        seconds=torch.tensor([s for _, s, _ in iterates], dtype=torch.float64),
        values=values.float().cpu(),
    )


class AmortizationFigures(ValidationFigureCallback):
    """Logs the per-context amortization gap and a classical solver's curves against the amortized level.

    Every ``every_n_validations`` validations, on the first ``num_contexts`` validation contexts x:

    - ``val/gap_per_context``: a TensorBoard histogram of f(ŷ; x) − f(y*; x), with y* from the batch or, for
      objectives without cached references, ``module.reference_solutions`` (the module's ``refine`` solver run
      from ŷ); and ``figures/gap_histogram``, the same values as a matplotlib histogram;
    - ``figures/solver_curves``: ``solver`` run from ``objective.initial_point(x)``, its mean ± std objective
      over the contexts against iterations (left) and seconds (right), with dashed lines at the amortized level
      mean f(ŷ) and, when known, mean f(y*) (the tutorial's Figures 4.1–4.3).

    Args:
        every_n_validations: draw at the 1st, (N+1)-th, ... validation.
        num_contexts: validation contexts used (from the first validation batch).
        solver: the classical solver of the curves (default ``Adam(steps=100, lr=0.01)``); ``None`` values in
            a recipe mean the default.
        record_every: record every k-th iterate of the solver (bounds the evaluations for long runs).
        curves: draw the solver curves (``False``: the gap only).
        prefix: the tag prefix of the images.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_contexts: int = 64,
        solver: Optional[Solver] = None,
        record_every: int = 1,
        curves: bool = True,
        prefix: str = "figures",
    ) -> None:
        super().__init__(every_n_validations, num_contexts, prefix)
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"AmortizationFigures: solver must be a lightning_amor.solvers.Solver, got {solver!r}")
        if record_every < 1:
            raise ValueError(f"AmortizationFigures: record_every must be at least 1, got {record_every}")
        self.solver = solver if solver is not None else Adam(steps=100, lr=0.01)
        self.record_every = record_every
        self.curves = curves

    def gaps(self, pl_module: pl.LightningModule, x: Context, y_star: Optional[Tensor]) -> tuple[Tensor, ...]:
        """``(f(ŷ), f(y*) or None, prediction ms)`` for contexts ``x``: ``B`` values each, from the module."""
        y, elapsed_ms = pl_module.timed_prediction(x)
        y_star = pl_module.reference_solutions(x, y, y_star)
        f_pred = pl_module.objective(y, x)
        f_star = pl_module.objective(y_star, x) if y_star is not None else None
        return f_pred, f_star, elapsed_ms

    def draw(
        self, experiment: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Context,
        y_star: Optional[Tensor],
    ) -> None:
        step = trainer.global_step
        f_pred, f_star, elapsed_ms = self.gaps(pl_module, x, y_star)
        if f_star is not None:
            gap = (f_pred - f_star).detach().float().cpu()
            experiment.add_histogram("val/gap_per_context", gap, global_step=step)
            log_figure(experiment, self.tag("gap_histogram"),
                       histogram_figure(gap, xlabel="f(ŷ) − f(y*)", title=f"amortization gap, step {step}"), step)
        if not self.curves:
            return
        trace = trace_solver(self.solver, pl_module.objective, x, record_every=self.record_every)
        levels = {"amortized, mean f(ŷ)": float(f_pred.mean())}
        if f_star is not None:
            source = "reference" if y_star is not None else "refined from ŷ"
            levels[f"{source}, mean f(y*)"] = float(f_star.mean())
        name = type(self.solver).__name__
        figure = new_figure(10.0, 3.8)
        left, right = figure.subplots(1, 2)
        curve_figure(trace.iterations, {name: trace.values}, levels, xlabel=f"{name} iteration", ax=left)
        curve_figure(trace.seconds, {name: trace.values}, levels, xlabel="seconds", ax=right)
        right.plot([elapsed_ms / 1000.0], [float(f_pred.mean())], "k*", markersize=10,
                   label=f"amortized: {elapsed_ms:.3g} ms")
        right.legend(fontsize=8)
        figure.suptitle(f"{name} from scratch vs the amortized model ({context_batch_size(x)} contexts, step {step})",
                        fontsize=10)
        log_figure(experiment, self.tag("solver_curves"), figure, step)
