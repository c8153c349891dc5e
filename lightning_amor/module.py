"""AmortizedModule: amortizer + objective + loss as a LightningModule."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric

from lightning_amor.amortizers import AmortizedOutput, Amortizer
from lightning_amor.calibration import CALIBRATION_KEY, Calibration, context_features, context_features_fit
from lightning_amor.fallback import Fallback
from lightning_amor.losses import AmortizationLoss, ObjectiveLoss
from lightning_amor.metrics import AmortizationMetrics
from lightning_amor.objective import Context, Objective, context_batch_size
from lightning_amor.solvers import Solver
from lightning_amor.structure import Solution

NONFINITE_MODES = ("raise", "skip")
GAP_NOISE = 1e-3
"""A mean validation gap below ``-(GAP_NOISE · max(|f(ŷ)|, |f(y*)|) + GAP_NOISE_FLOOR)`` is more than solver and
rounding noise: the cached references are wrong (see ``AmortizedModule._warn_if_oracle_beaten``)."""
GAP_NOISE_FLOOR = 1e-6
"""The absolute part of the noise allowed on a mean gap, for objectives whose minimum is near zero."""
INNER_RISE_STEPS = 3
"""Logging steps averaged before a rise of f over the inner steps is warned about."""
INNER_RISE_TOLERANCE = 1e-3
"""The relative rise of the mean f over the inner steps that is warned about (below it: noise)."""
SKIPPED_STEPS_KEY = "skipped_steps"
"""The checkpoint entry holding the count of skipped steps and the steps of the recent ones."""


class NonFiniteLossError(FloatingPointError):
    """The loss of some contexts was NaN or infinite."""


class BadCheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, not a Lightning checkpoint, or of another model."""


def state_dict_mismatch(model: dict[str, Tensor], saved: dict[str, Any], strict: bool = True) -> list[str]:
    """Lines naming what keeps ``saved`` (a checkpoint's ``state_dict``) from loading into ``model``'s.

    Shapes must always match; with ``strict`` the names must too. An empty list: it loads.
    """

    def shape(value: Any) -> str:
        return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__

    lines = [
        f"  {name}: {shape(saved[name])} in the checkpoint, {shape(value)} in the model"
        for name, value in model.items()
        if name in saved and isinstance(saved[name], Tensor) and saved[name].shape != value.shape
    ]
    if strict:
        lines += [f"  {name}: {shape(value)} in the model, missing from the checkpoint"
                  for name, value in model.items() if name not in saved]
        lines += [f"  {name}: {shape(value)} in the checkpoint, not in the model"
                  for name, value in saved.items() if name not in model]
    return lines


def _built_from_config() -> bool:
    """Whether LightningCLI (or load_from_checkpoint) is instantiating the module from a plain config."""
    try:
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: store nothing that cannot be loaded safely
        return False
    return _given_hyperparameters.get() is not None


def unpack_batch(batch: Any) -> tuple[Context, Optional[Tensor]]:
    """Split a batch into contexts x and optional reference solutions y* (``B x n``).

    A batch is a dict ``{"x": contexts, "y_star": solutions}`` (``y_star`` optional) or bare contexts.
    """
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y_star")
    return batch, None


@dataclass(frozen=True)
class Evaluated:
    """One evaluation batch, as :meth:`AmortizedModule.evaluation_metrics` sees it.

    Attributes:
        x: the contexts (batch ``B``).
        y: the predictions, as the objective's hooks see solutions (its structured view; ``B x n`` when it
            declares no structure).
        y_star: the reference solutions (cached, or refined by ``refine``) in the same form, or ``None``.
        value: f(ŷ; x), ``B``.
        reference_value: f(y*; x), ``B``, or ``None``.
    """

    x: Context
    y: Solution
    y_star: Optional[Solution]
    value: Tensor
    reference_value: Optional[Tensor]


CORE_METRICS = ("objective", "gap", "distance", "violation", "inference_ms")
"""The names the core logs under ``val/`` and ``test/``; an application's own metrics must use other names."""


@contextmanager
def frozen(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block, ``parameters`` are constants to autograd: what is computed there gives them no gradient.

    Their ``requires_grad`` flags are put back on exit, so a loss computed afterwards still trains them (a
    stop-gradient for one loss, where a ``detach`` of every use inside an objective or amortizer is impractical).
    """
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AmortizedModule(LightningModule):
    """Trains an amortizer ŷ_θ(x) to solve min_y f(y; x) for contexts x ~ p(x).

    With one optimizer (the default), one loss trains every parameter, the objective's learnable ones (a VAE's
    decoder) included. With ``objective_optimizer`` the module has two components, each with its own loss,
    optimizer and scheduler: the amortizer (θ, trained by ``loss`` with the objective's parameters held constant,
    so the amortizer's loss never moves them) and the objective (φ, trained by :meth:`objective_loss`, by default
    the same loss at the amortizer's prediction held constant; an actor–critic overrides it with a TD loss).
    Both losses are summed and back-propagated once (one gradient all-reduce under DDP), then both optimizers
    step; ``global_step`` still counts training steps, and checkpoints hold both optimizers' states. Lightning's
    manual optimization runs this case, so the trainer's ``gradient_clip_val`` and ``accumulate_grad_batches``
    are not available with it.

    Args:
        objective: the problem f(y; x); its parameters (if any) are trained too.
        amortizer: a :class:`~lightning_amor.amortizers.FullyAmortized` or ``SemiAmortized`` model.
        loss: the training loss of the amortizer (default: the objective, L_obj).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI style), Adam by default; with
            ``objective_optimizer`` it optimizes every parameter but the objective's, otherwise all of them.
        lr_scheduler: an optional callable ``optimizer -> LRScheduler`` for ``optimizer``, stepped every training
            step.
        nonfinite: what to do when the loss of some context (of either component), or a gradient, is NaN or
            infinite: ``raise`` stops training with the step and the offending context indices (or parameter
            names); ``skip`` leaves every parameter and optimizer state unchanged for that step (which still
            counts towards ``max_steps``; schedulers step as on any other step). Under DDP the decision is the
            same on every rank. Skipped steps are counted (logged as ``train/skipped_steps``, kept by checkpoints),
            and too many of them stop training (``max_skipped_share``).
        max_skipped_share: with ``nonfinite: skip``, training stops with :class:`NonFiniteLossError` as soon as
            more than this share of the last ``skip_window`` steps were skipped (so a run that skips almost every
            step cannot end as if it had trained). It is decided as soon as the count is exceeded, before the
            window has filled: 11 skips in the first 11 steps already exceed 10% of 100 steps. The count is the same
            on every DDP rank, so every rank stops together. ``1.0`` never stops.
        skip_window: the number of recent training steps over which ``max_skipped_share`` is counted.
        refine: a solver run from each prediction during validation and test when the batch has no
            reference solutions (objectives with learnable parameters): the gap and distance are then
            measured against the refined solution, i.e. the amortization gap.
        inference: the amortize-then-refine policy of :mod:`lightning_amor.fallback` (tolerance, solver,
            out-of-distribution threshold) used by ``lightning-amor solve``; default ``Fallback()``. Every
            validation also calibrates it: the residuals of the predictions on the validation set (and the
            statistics of its contexts) are kept as
            ``calibration`` (a :class:`~lightning_amor.calibration.Calibration`) and saved with checkpoints.
        objective_optimizer: a callable ``params -> Optimizer`` for the objective's learnable parameters (a
            critic, a decoder): makes the objective a separately trained component, as described above. In a
            recipe: ``model.init_args.objective_optimizer: {class_path: torch.optim.Adam, init_args: {lr: ...}}``.
        objective_lr_scheduler: an optional callable ``optimizer -> LRScheduler`` for ``objective_optimizer``,
            stepped every training step.

    Logged: ``train/loss`` (the amortizer's loss), ``train/objective``, ``train/objective_loss`` (with
    ``objective_optimizer``), ``train/skipped_steps`` (with ``nonfinite: skip``), ``train/inner_f_before`` and
    ``train/inner_f_after`` (a semi-amortized model's mean f at its first and last iterate; a warning, once, when
    the inner steps raise f on average); on the validation and test sets ``{val,test}/objective`` (mean f(ŷ)), ``/gap``
    (mean f(ŷ) − f(y*)), ``/distance`` (mean d(ŷ, y*)), ``/violation`` (constrained problems),
    ``/inference_ms`` (prediction time per batch), and the means of an application's own
    :meth:`evaluation_metrics`.
    """

    def __init__(
        self,
        objective: Objective,
        amortizer: Amortizer,
        loss: Optional[AmortizationLoss] = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        nonfinite: str = "raise",
        refine: Optional[Solver] = None,
        inference: Optional[Fallback] = None,
        objective_optimizer: Optional[OptimizerCallable] = None,
        objective_lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_skipped_share: float = 0.1,
        skip_window: int = 100,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"AmortizedModule: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if not 0.0 <= max_skipped_share <= 1.0:
            raise ValueError(f"AmortizedModule: max_skipped_share must be in [0, 1], got {max_skipped_share}")
        if skip_window < 1:
            raise ValueError(f"AmortizedModule: skip_window must be at least 1 step, got {skip_window}")
        if objective_lr_scheduler is not None and objective_optimizer is None:
            raise ValueError(
                "AmortizedModule: objective_lr_scheduler schedules objective_optimizer, which is not set; set "
                "model.init_args.objective_optimizer too, or use lr_scheduler for the single optimizer"
            )
        if objective_optimizer is not None and not any(p.requires_grad for p in objective.parameters()):
            raise ValueError(
                f"AmortizedModule: objective_optimizer is set but {type(objective).__name__} has no learnable "
                f"parameters to optimize; remove objective_optimizer, or give the objective its learnable part "
                f"(a critic, a decoder) as a submodule"
            )
        if _built_from_config():
            # LightningCLI hands over the recipe as plain config, which load_from_checkpoint re-instantiates.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
                self.save_hyperparameters()
        else:
            # Objects built in Python would be pickled into the checkpoint, which torch's safe loader refuses:
            # pass them again to load_from_checkpoint(path, objective=..., amortizer=..., ...).
            self.save_hyperparameters(ignore=[
                "objective", "amortizer", "loss", "optimizer", "lr_scheduler", "inference", "objective_optimizer",
                "objective_lr_scheduler",
            ])
        self.objective = objective
        self.amortizer = amortizer
        self.loss = loss if loss is not None else ObjectiveLoss()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.objective_optimizer = objective_optimizer
        self.objective_lr_scheduler = objective_lr_scheduler
        # Lightning 2 steps several optimizers only under manual optimization; one optimizer keeps the automatic
        # loop (and its gradient clipping and accumulation).
        self.automatic_optimization = objective_optimizer is None
        self.nonfinite = nonfinite
        self.refine = refine
        self.inference = inference if inference is not None else Fallback()
        self.calibration: Optional[Calibration] = None
        self.val_residuals = CatMetric(nan_strategy="disable")  # this validation's prediction residuals
        self.val_contexts = CatMetric(nan_strategy="disable")  # and its contexts' features (if small enough)
        self.val_metrics = AmortizationMetrics()
        self.test_metrics = AmortizationMetrics()
        # means of the application's evaluation_metrics, created on first use: {stage: {name: MeanMetric}}
        self.evaluation_means = nn.ModuleDict({"val": nn.ModuleDict(), "test": nn.ModuleDict()})
        self.max_skipped_share = max_skipped_share
        self.skip_window = skip_window
        self.skipped_steps = 0
        self._recent_skips: list[int] = []  # the global steps of the skips within the last skip_window steps
        self._skip_update = False
        self._inner_f_sums = [0.0, 0.0, 0]  # Σ mean f before, Σ after the inner steps, logging steps counted
        self._inner_rise_warned = False
        self._oracle_beaten_warned = False
        self._rng_states: Optional[tuple[Tensor, Optional[Tensor]]] = None  # kept during validation

    @property
    def needs_target(self) -> bool:
        """Whether training batches must carry reference solutions y*."""
        return self.loss.needs_target

    @property
    def separate_objective(self) -> bool:
        """Whether the objective's parameters are a separate component (``objective_optimizer`` is set)."""
        return self.objective_optimizer is not None

    def forward(self, x: Context) -> Tensor:
        """Predicted solutions ``B x n`` for contexts ``x``."""
        return self.amortizer(x, self.objective).y

    def predict_batch(self, x: Context) -> AmortizedOutput:
        """The amortizer's full output (prediction and iterates) for contexts ``x``."""
        return self.amortizer(x, self.objective)

    def amortizer_parameters(self) -> list[nn.Parameter]:
        """The parameters ``optimizer`` trains when the objective is a separate component: all but the
        objective's (the amortizer's, and a loss's if it has any)."""
        owned = {id(p) for p in self.objective.parameters()}
        return [p for p in self.parameters() if id(p) not in owned]

    def objective_loss(self, x: Context, y_star: Optional[Tensor], output: AmortizedOutput) -> Tensor:
        """The loss that trains the objective's learnable parameters with ``objective_optimizer``: ``B`` values.

        Called in every training step after the amortizer's loss, with the amortizer's parameters held constant
        and its ``output`` (``B x n`` prediction and iterates) detached, so this loss never moves the amortizer.
        The default is the amortizer's own ``loss`` at that prediction (a VAE's decoder keeps learning from
        −ELBO). Override it for another loss computed from the batch, e.g. an actor–critic's TD loss on
        transitions carried in a dict context ``x``.

        Args:
            x: the training contexts (batch ``B``).
            y_star: the batch's reference solutions ``B x n``, or ``None``.
            output: the amortizer's output for ``x``, detached.
        """
        return self.loss(output, x, self.objective, y_star)

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """An application's own metrics of one validation or test batch: ``{name: B values}`` (none here).

        Override it to log more than the core metrics: each name is averaged over every context of the
        validation (or test) set, across DDP ranks too, and logged as ``val/<name>`` and ``test/<name>``. Return
        the same names for every batch of a run (e.g. depending only on the configuration), so that every rank
        averages the same ones; a name holds no ``.`` and is not one of :data:`CORE_METRICS`. Called without
        gradients.

        Args:
            evaluated: the batch's contexts, predictions, reference solutions and their objective values.
        """
        return {}

    def _per_context(self, values: Tensor, x: Context, who: str) -> Tensor:
        """Check that a loss gave one value per context, ``B``."""
        batch = context_batch_size(x)
        if not isinstance(values, Tensor) or values.shape != (batch,):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"{who} must return one loss per context, shape ({batch},), got {got}")
        return values

    def _finite_or_skip(self, losses: dict[str, Tensor], batch_idx: int) -> bool:
        """Whether every per-context loss is finite; if not, raise (``nonfinite: raise``) or count a skipped step.

        Under DDP every rank reaches the same answer (one all-reduce of a flag).
        """
        finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all(0)
        all_finite = bool(finite.all())
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must take the same decision, or the others wait forever in the gradient all-reduce.
            all_finite = self.trainer.strategy.reduce_boolean_decision(all_finite, all=True)
        if all_finite:
            return True
        bad = (~finite).nonzero().flatten().tolist()
        where = f"batch indices {bad[:20]}{' ...' if len(bad) > 20 else ''}" if bad else "on another rank"
        which = [name for name, v in losses.items() if not bool(torch.isfinite(v).all())] or list(losses)
        message = (
            f"non-finite {' and '.join(which)} at global step {self.global_step} (batch {batch_idx}, epoch "
            f"{self.current_epoch}, rank {self.global_rank}) for {len(bad)} of {len(finite)} contexts, {where}"
        )
        if self.nonfinite == "raise":
            raise NonFiniteLossError(
                message + "; check the objective at these contexts, lower the learning rate, or set "
                "`model.init_args.nonfinite: skip` to skip such steps"
            )
        self._count_skip(message)
        return False

    def _count_skip(self, message: str) -> None:
        """Count a skipped step; stop when more than ``max_skipped_share`` of the last ``skip_window`` were skipped."""
        self.skipped_steps += 1
        step = self.global_step
        self._recent_skips = [s for s in self._recent_skips if s > step - self.skip_window] + [step]
        self.print(f"skipping the update of this step: {message}")
        if len(self._recent_skips) > self.max_skipped_share * self.skip_window:
            raise NonFiniteLossError(
                f"{len(self._recent_skips)} of the last {self.skip_window} training steps were skipped for non-finite "
                f"losses or gradients (more than max_skipped_share={self.max_skipped_share}), so the model is not "
                f"learning; the latest: {message}. Fix the objective or the data at these contexts, lower the "
                f"learning rate, or raise `model.init_args.max_skipped_share`"
            )

    def _zero_loss(self) -> Tensor:
        # A zero loss on every parameter keeps DDP's gradient all-reduce in step on every rank; nothing then steps.
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """One training step: the loss of the batch (one optimizer), or both components' updates (two)."""
        if not self.automatic_optimization:
            return self._component_training_step(batch, batch_idx)
        x, y_star = unpack_batch(batch)
        output = self.amortizer(x, self.objective)
        per_context = self._per_context(self.loss(output, x, self.objective, y_star), x, type(self.loss).__name__)
        if not self._finite_or_skip({"loss": per_context}, batch_idx):
            self._skip_update = True  # optimizer_step then leaves the parameters and the optimizer state untouched
            self._log_skipped_steps(x)
            return self._zero_loss()
        loss = per_context.mean()
        self._log_training(loss, output, x)
        return loss

    def _log_skipped_steps(self, x: Context) -> None:
        if self.nonfinite == "skip" and self._logging_step():
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=context_batch_size(x))

    def _log_training(self, loss: Tensor, output: AmortizedOutput, x: Context) -> None:
        self._log_skipped_steps(x)
        if not self._logging_step():
            return
        batch_size = context_batch_size(x)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if not isinstance(self.loss, ObjectiveLoss):
            with torch.no_grad():
                self.log("train/objective", self.objective(output.y, x).mean(), batch_size=batch_size)
        if len(output.iterates) > 1:
            self._log_inner_steps(output, x)

    def _log_inner_steps(self, output: AmortizedOutput, x: Context) -> None:
        """Log the mean f at the first and the last inner iterate; warn once when, averaged over the logging steps
        so far (at least :data:`INNER_RISE_STEPS`), the inner steps raise f by more than :data:`INNER_RISE_TOLERANCE`
        of its size (a stochastic objective's noise is no rise)."""
        batch_size = context_batch_size(x)
        # A stochastic objective draws random numbers: logging must not change the ones training draws next.
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            before = self.objective(output.iterates[0], x).mean()
            after = self.objective(output.iterates[-1], x).mean()
        self.log("train/inner_f_before", before, batch_size=batch_size)
        self.log("train/inner_f_after", after, batch_size=batch_size)
        if self._inner_rise_warned:
            return
        sums = self._inner_f_sums
        sums[0], sums[1], sums[2] = sums[0] + float(before), sums[1] + float(after), sums[2] + 1
        if sums[2] >= INNER_RISE_STEPS and sums[1] - sums[0] > INNER_RISE_TOLERANCE * abs(sums[0]):
            self._inner_rise_warned = True
            warnings.warn(
                f"the inner steps of {type(self.amortizer).__name__} raised f on average over the first {sums[2]} "
                f"logging steps (mean f from {sums[0] / sums[2]:.4g} to {sums[1] / sums[2]:.4g}): their step size is "
                f"too large for this objective; use GradientStep(lr='auto') (a step of 1/L from the curvature) or a "
                f"smaller lr",
                UserWarning,
                stacklevel=2,
            )

    def _component_training_step(self, batch: Any, batch_idx: int) -> None:
        """Amortizer and objective as two components: each loss trains only its own parameters, each optimizer
        steps its own; a skipped step (non-finite loss or gradient) steps neither."""
        amortizer_optimizer, objective_optimizer = self.optimizers()
        x, y_star = unpack_batch(batch)
        with frozen(self.objective.parameters()):
            output = self.amortizer(x, self.objective)
            amortizer_loss = self._per_context(
                self.loss(output, x, self.objective, y_star), x, type(self.loss).__name__
            )
        detached = AmortizedOutput(y=output.y.detach(), iterates=[y.detach() for y in output.iterates])
        with frozen(self.amortizer_parameters()):
            objective_loss = self._per_context(
                self.objective_loss(x, y_star, detached), x, f"{type(self).__name__}.objective_loss"
            )
        amortizer_optimizer.zero_grad()
        objective_optimizer.zero_grad()
        if self._finite_or_skip({"loss": amortizer_loss, "objective_loss": objective_loss}, batch_idx):
            loss = amortizer_loss.mean()
            self.manual_backward(loss + objective_loss.mean())
            if self._gradients_checked() and not self._gradients_finite():
                self._nonfinite_gradients(batch_idx, self.current_epoch)
            else:
                for optimizer in (amortizer_optimizer, objective_optimizer):
                    # the strategy's step (precision plugin included) without Lightning's count of optimizer steps
                    self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)
            self._log_training(loss, output, x)
            if self._logging_step():
                self.log("train/objective_loss", objective_loss.mean(), batch_size=context_batch_size(x))
        else:
            self._log_skipped_steps(x)
        # A skipped step runs no backward: under manual optimization DDP's reducer waits for none.
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        self._count_training_step()

    def _count_training_step(self) -> None:
        """Count one training step in ``global_step`` (so ``max_steps`` and checkpoints count training steps).

        Under manual optimization Lightning counts each optimizer step, which would count a two-optimizer step
        twice and a skipped step not at all; the optimizers step uncounted and this counts the step once.
        """
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _logging_step(self) -> bool:
        """Whether the logger writes this step's training scalars (every ``log_every_n_steps``): logging and the
        extra objective evaluation are skipped on the other steps, where Lightning would discard them anyway."""
        if self._trainer is None:
            return True
        every = self.trainer.log_every_n_steps
        return every <= 1 or (self.global_step + 1) % every == 0 or self.global_step == 0

    def timed_prediction(self, x: Context) -> tuple[Tensor, float]:
        """The prediction ``B x n`` for contexts ``x`` and its wall time in milliseconds (device synchronised)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        y = self.amortizer(x, self.objective).y
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return y, 1000.0 * (time.perf_counter() - start)

    def reference_solutions(self, x: Context, y: Tensor, y_star: Optional[Tensor]) -> Optional[Tensor]:
        """The batch's reference solutions ``B x n``, or with ``refine`` and none cached, the solver run from ``y``."""
        if y_star is None and self.refine is not None:
            return self.refine.solve(self.objective, x, init=y.detach()).y
        return y_star

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Any]:
        """Update the ``stage`` (``val`` or ``test``) metrics with one batch; returns its contexts ``x``, the
        predictions ``y`` and the reference solutions ``y_star`` (``B x n``, or ``None``)."""
        x, y_star = unpack_batch(batch)
        y, elapsed_ms = self.timed_prediction(x)
        y_star = self.reference_solutions(x, y, y_star)
        f_pred = self.objective(y, x)
        f_star = self.objective(y_star, x) if y_star is not None else None
        distance = self.objective.distance_flat(y, y_star) if y_star is not None else None
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(f_pred, f_star, distance, self.objective.violation_flat(y, x), elapsed_ms)
        view = self.objective.view
        evaluated = Evaluated(x, view(y), None if y_star is None else view(y_star), f_pred, f_star)
        self._update_evaluation_means(stage, self.evaluation_metrics(evaluated), context_batch_size(x))
        return {"x": x, "y": y, "y_star": y_star}

    def _update_evaluation_means(self, stage: str, values: dict[str, Tensor], batch: int) -> None:
        means = self.evaluation_means[stage]
        if len(means) and set(values) != set(means.keys()):
            raise ValueError(
                f"{type(self).__name__}.evaluation_metrics returned the metrics {sorted(values)} for this batch but "
                f"{sorted(means.keys())} for an earlier one; return the same names for every batch (every rank "
                f"must average the same metrics)"
            )
        for name, value in values.items():
            if not name or "." in name or name in CORE_METRICS:
                raise ValueError(
                    f"{type(self).__name__}.evaluation_metrics: the metric name {name!r} is not allowed; use a "
                    f"non-empty name without '.' that is not one of the core metrics {CORE_METRICS}"
                )
            if not isinstance(value, Tensor) or value.shape != (batch,):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{type(self).__name__}.evaluation_metrics: {name!r} must hold one value per context, shape "
                    f"({batch},), got {got}"
                )
            if name not in means:
                means[name] = MeanMetric(nan_strategy="disable").to(self.device)
            means[name].update(value.detach())

    def on_validation_start(self) -> None:
        """Keep the random generators' states: validation (a refining solver's fresh noise, say) must not change
        the random numbers training draws next, so a run trains the same however often it validates."""
        cuda = self.device.type == "cuda"
        self._rng_states = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)

    def on_validation_end(self) -> None:
        """Put back the random generators' states kept by :meth:`on_validation_start`."""
        states, self._rng_states = self._rng_states, None
        if states is not None:
            torch.set_rng_state(states[0])
            if states[1] is not None:
                torch.cuda.set_rng_state(states[1], self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Evaluate one validation batch; returns ``{"x", "y", "y_star"}`` (for ``on_validation_batch_end``)."""
        out = self._evaluate(batch, "val")
        x, y = out["x"], out["y"]
        self.val_residuals.update(self.objective.residual_flat(y, x))  # of the prediction just made
        if context_features_fit(x):
            self.val_contexts.update(context_features(x))
        return out

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Evaluate one test batch; returns ``{"x", "y", "y_star"}`` (for ``on_test_batch_end``)."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted solutions ``B x n`` for a batch's contexts."""
        x, _ = unpack_batch(batch)
        return self(x)

    def _log_metrics(
        self, prefix: str, metrics: AmortizationMetrics, values: Optional[dict[str, Tensor]] = None
    ) -> None:
        values = metrics.compute() if values is None else values
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False)
        metrics.reset()
        for name, mean in self.evaluation_means[prefix].items():
            self.log(f"{prefix}/{name}", mean.compute())  # already every rank's mean
            mean.reset()

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics and calibrate the inference policy on this validation's residuals."""
        values = self.val_metrics.compute()
        self._warn_if_oracle_beaten(values)
        self._log_metrics("val", self.val_metrics, values)
        if self.val_residuals.update_count > 0:
            residuals = self.val_residuals.compute()  # every rank's, under DDP
            features = self.val_contexts.compute() if self.val_contexts.update_count > 0 else None
            if not self.trainer.sanity_checking and bool(torch.isfinite(residuals).any()):
                self.calibration = Calibration.from_residuals(residuals, step=self.global_step, features=features)
        self.val_residuals.reset()
        self.val_contexts.reset()

    def _warn_if_oracle_beaten(self, values: dict[str, Tensor]) -> None:
        """Warn (once) when the mean validation gap against cached references is below zero beyond noise
        (:data:`GAP_NOISE` of the larger of |mean f(ŷ)| and |mean f(y*)|, plus :data:`GAP_NOISE_FLOOR`): the
        predictions then "beat" the oracle, so its references are wrong or stale."""
        cache_file = getattr(self.trainer.datamodule, "cache_file", None) if self._trainer is not None else None
        if "gap" not in values or cache_file is None or self._oracle_beaten_warned:
            return
        gap, f_pred = float(values["gap"]), float(values["objective"])
        noise = GAP_NOISE * max(abs(f_pred), abs(f_pred - gap)) + GAP_NOISE_FLOOR
        path = cache_file("val") if gap < -noise else None
        if path is not None and self.trainer.is_global_zero:
            self._oracle_beaten_warned = True
            warnings.warn(
                f"val/gap is {gap:.4g}, below zero beyond numerical noise ({-noise:.2g}): the predictions beat the "
                f"oracle {type(self.objective).__name__}.solve, so its reference solutions are wrong or stale; check "
                f"the oracle, then delete the cache file {path} to solve them again",
                UserWarning, stacklevel=2,
            )

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_metrics("test", self.test_metrics)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The automatic loop's step, which a non-finite loss or gradient skips (see ``nonfinite``)."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()  # forward and backward; a non-finite loss may have asked to skip
        if self._skip_update:
            self._skip_update = False
            return None
        if self._gradients_checked() and not self._gradients_finite():
            self._nonfinite_gradients(batch_idx, epoch)
            return None
        return super().optimizer_step(epoch, batch_idx, optimizer, lambda: result)

    def _nonfinite_gradients(self, batch_idx: int, epoch: int) -> None:
        """Raise for non-finite gradients (``nonfinite: raise``) or count the step as skipped."""
        bad = [n for n, p in self.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
        message = (
            f"non-finite gradient at global step {self.global_step} (batch {batch_idx}, epoch {epoch}) in "
            f"{len(bad)} parameter tensors: {bad[:10]}{' ...' if len(bad) > 10 else ''}"
        )
        if self.nonfinite == "raise":
            raise NonFiniteLossError(
                message + "; the loss was finite, so look for a non-differentiable point of the objective "
                "(e.g. sqrt or arccos at the boundary), lower the learning rate, or set "
                "`model.init_args.nonfinite: skip`"
            )
        self._count_skip(message)

    def _gradients_checked(self) -> bool:
        # fp16 mixed precision produces inf gradients on purpose; its GradScaler skips those steps itself.
        return self._trainer is None or str(self.trainer.precision) not in ("16-mixed", "16")

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (one device sync; identical on all ranks after DDP's all-reduce)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # A NaN or inf anywhere makes the total norm non-finite; the fused norm costs one kernel per dtype/device.
        return not grads or bool(torch.nn.utils.get_total_norm(grads, foreach=True).isfinite())

    def configure_optimizers(self) -> Any:
        """One optimizer over every parameter, or with ``objective_optimizer`` one per component (amortizer
        first); each with its scheduler, stepped every training step."""
        if self.objective_optimizer is None:
            optimizer = self.optimizer(self.parameters())
            return optimizer if self.lr_scheduler is None else _with_scheduler(optimizer, self.lr_scheduler)
        return [
            _with_scheduler(self.optimizer(self.amortizer_parameters()), self.lr_scheduler),
            _with_scheduler(self.objective_optimizer(self.objective.parameters()), self.objective_lr_scheduler),
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the calibration of the latest validation and the skipped steps (read back by
        :meth:`on_load_checkpoint`)."""
        if self.calibration is not None:
            checkpoint[CALIBRATION_KEY] = self.calibration.to_dict()
        checkpoint[SKIPPED_STEPS_KEY] = {"count": self.skipped_steps, "recent": list(self._recent_skips)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights are loaded: a checkpoint of another model is an error naming the file and every
        parameter whose name or shape differs (Lightning calls this before ``load_state_dict``). Names are compared
        when a Trainer loads with ``strict_loading``; ``load_from_checkpoint(strict=False)`` checks shapes only."""
        strict = self._trainer is not None and self.strict_loading
        problems = state_dict_mismatch(self.state_dict(), checkpoint.get("state_dict", {}), strict)
        if problems:
            path = self._trainer.ckpt_path if self._trainer is not None else None
            shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise BadCheckpointError(
                f"the checkpoint {path or '(loaded directly)'} does not fit this {type(self).__name__}: it was saved "
                f"from another model (another recipe, or other sizes); {len(problems)} parameter(s) differ:\n"
                + "\n".join(shown)
                + "\nUse the recipe and overrides the checkpoint was trained with, or start without --ckpt_path."
            )
        saved = checkpoint.get(CALIBRATION_KEY)  # absent from checkpoints of older versions
        self.calibration = Calibration.from_dict(saved, checkpoint.get("global_step")) if saved else None
        skipped = checkpoint.get(SKIPPED_STEPS_KEY, {})  # absent from checkpoints of older versions
        self.skipped_steps = int(skipped.get("count", 0))
        self._recent_skips = [int(step) for step in skipped.get("recent", [])]


def _with_scheduler(optimizer: torch.optim.Optimizer, scheduler: Optional[LRSchedulerCallable]) -> dict[str, Any]:
    """The configuration Lightning reads: an optimizer and its optional scheduler, stepped every training step."""
    if scheduler is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": "step"}}


def _no_closure() -> None:
    """The closure of an optimizer step whose gradients are already computed."""
