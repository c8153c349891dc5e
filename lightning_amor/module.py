"""AmortizedModule: amortizer + objective + loss as a LightningModule."""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from lightning_amor.amortizers import AmortizedOutput, Amortizer
from lightning_amor.inference import (
    CALIBRATION_KEY,
    Calibration,
    Fallback,
    context_features,
    context_features_fit,
    stationarity_residual,
)
from lightning_amor.losses import AmortizationLoss, ObjectiveLoss
from lightning_amor.metrics import AmortizationMetrics
from lightning_amor.objective import Context, Objective, context_batch_size
from lightning_amor.solvers import Solver

NONFINITE_MODES = ("raise", "skip")


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


class AmortizedModule(LightningModule):
    """Trains an amortizer ŷ_θ(x) to solve min_y f(y; x) for contexts x ~ p(x).

    Args:
        objective: the problem f(y; x); its parameters (if any) are trained too.
        amortizer: a :class:`~lightning_amor.amortizers.FullyAmortized` or ``SemiAmortized`` model.
        loss: the training loss (default: the objective, L_obj).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI style), Adam by default.
        lr_scheduler: an optional callable ``optimizer -> LRScheduler``, stepped every training step.
        nonfinite: what to do when the loss of some context, or a gradient, is NaN or infinite: ``raise``
            stops training with the step and the offending context indices (or parameter names); ``skip``
            leaves the parameters and the optimizer state unchanged for that step (which still counts
            towards ``max_steps``). Under DDP the decision is the same on every rank.
        refine: a solver run from each prediction during validation and test when the batch has no
            reference solutions (objectives with learnable parameters): the gap and distance are then
            measured against the refined solution, i.e. the amortization gap.
        inference: the amortize-then-refine policy of :mod:`lightning_amor.inference` (tolerance, solver,
            out-of-distribution threshold) used by ``lightning-amor solve``; default ``Fallback()``. Every
            validation also calibrates it: the residuals of the predictions on the validation set (and the
            statistics of its contexts) are kept as
            ``calibration`` (a :class:`~lightning_amor.inference.Calibration`) and saved with checkpoints.

    Logged: ``train/loss``, ``train/objective``; on the validation and test sets
    ``{val,test}/objective`` (mean f(ŷ)), ``/gap`` (mean f(ŷ) − f(y*)), ``/distance`` (mean d(ŷ, y*)),
    ``/violation`` (constrained problems) and ``/inference_ms`` (prediction time per batch).
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
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"AmortizedModule: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if _built_from_config():
            # LightningCLI hands over the recipe as plain config, which load_from_checkpoint re-instantiates.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
                self.save_hyperparameters()
        else:
            # Objects built in Python would be pickled into the checkpoint, which torch's safe loader refuses:
            # pass them again to load_from_checkpoint(path, objective=..., amortizer=..., ...).
            self.save_hyperparameters(
                ignore=["objective", "amortizer", "loss", "optimizer", "lr_scheduler", "inference"]
            )
        self.objective = objective
        self.amortizer = amortizer
        self.loss = loss if loss is not None else ObjectiveLoss()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.nonfinite = nonfinite
        self.refine = refine
        self.inference = inference if inference is not None else Fallback()
        self.calibration: Optional[Calibration] = None
        self.val_residuals = CatMetric(nan_strategy="disable")  # this validation's prediction residuals
        self.val_contexts = CatMetric(nan_strategy="disable")  # and its contexts' features (if small enough)
        self.val_metrics = AmortizationMetrics()
        self.test_metrics = AmortizationMetrics()
        self.skipped_steps = 0
        self._skip_update = False
        self._rng_states: Optional[tuple[Tensor, Optional[Tensor]]] = None  # kept during validation

    @property
    def needs_target(self) -> bool:
        """Whether training batches must carry reference solutions y*."""
        return self.loss.needs_target

    def forward(self, x: Context) -> Tensor:
        """Predicted solutions ``B x n`` for contexts ``x``."""
        return self.amortizer(x, self.objective).y

    def predict_batch(self, x: Context) -> AmortizedOutput:
        """The amortizer's full output (prediction and iterates) for contexts ``x``."""
        return self.amortizer(x, self.objective)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        x, y_star = unpack_batch(batch)
        output = self.amortizer(x, self.objective)
        per_context = self.loss(output, x, self.objective, y_star)
        if per_context.shape != (context_batch_size(x),):
            raise ValueError(
                f"{type(self.loss).__name__} must return one loss per context, shape ({context_batch_size(x)},), "
                f"got {tuple(per_context.shape)}"
            )
        finite = torch.isfinite(per_context)
        all_finite = bool(finite.all())
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must take the same decision, or the others wait forever in the gradient all-reduce.
            all_finite = self.trainer.strategy.reduce_boolean_decision(all_finite, all=True)
        if not all_finite:
            bad = (~finite).nonzero().flatten().tolist()
            where = f"batch indices {bad[:20]}{' ...' if len(bad) > 20 else ''}" if bad else "on another rank"
            message = (
                f"non-finite loss at global step {self.global_step} (batch {batch_idx}, epoch {self.current_epoch}, "
                f"rank {self.global_rank}) for {len(bad)} of {len(finite)} contexts, {where}"
            )
            if self.nonfinite == "raise":
                raise NonFiniteLossError(
                    message + "; check the objective at these contexts, lower the learning rate, or set "
                    "`model.init_args.nonfinite: skip` to skip such steps"
                )
            self.skipped_steps += 1
            self._skip_update = True
            self.print(f"skipping the update of this step: {message}")
            # A zero loss on every parameter keeps DDP's gradient all-reduce in step on every rank;
            # optimizer_step then leaves the parameters and the optimizer state untouched.
            return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)
        loss = per_context.mean()
        if self._logging_step():
            batch_size = context_batch_size(x)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            if not isinstance(self.loss, ObjectiveLoss):
                with torch.no_grad():
                    self.log("train/objective", self.objective(output.y, x).mean(), batch_size=batch_size)
        return loss

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

    def _evaluate(self, batch: Any, metrics: AmortizationMetrics) -> tuple[Context, Tensor]:
        """Update ``metrics`` with one evaluation batch; returns its contexts and the predictions ``B x n``."""
        x, y_star = unpack_batch(batch)
        y, elapsed_ms = self.timed_prediction(x)
        y_star = self.reference_solutions(x, y, y_star)
        f_pred = self.objective(y, x)
        f_star = self.objective(y_star, x) if y_star is not None else None
        distance = self.objective.distance(y, y_star) if y_star is not None else None
        metrics.update(f_pred, f_star, distance, self.objective.violation(y, x), elapsed_ms)
        return x, y

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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._evaluate(batch, self.val_metrics)
        self.val_residuals.update(stationarity_residual(self.objective, y, x))  # of the prediction just made
        if context_features_fit(x):
            self.val_contexts.update(context_features(x))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = unpack_batch(batch)
        return self(x)

    def _log_metrics(self, prefix: str, metrics: AmortizationMetrics) -> None:
        values = metrics.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        if self.val_residuals.update_count > 0:
            residuals = self.val_residuals.compute()  # every rank's, under DDP
            features = self.val_contexts.compute() if self.val_contexts.update_count > 0 else None
            if not self.trainer.sanity_checking and bool(torch.isfinite(residuals).any()):
                self.calibration = Calibration.from_residuals(residuals, step=self.global_step, features=features)
        self.val_residuals.reset()
        self.val_contexts.reset()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()  # forward and backward; a non-finite loss may have asked to skip
        if self._skip_update:
            self._skip_update = False
            return None
        if self._gradients_checked() and not self._gradients_finite():
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
            self.skipped_steps += 1
            self.print(f"skipping the update of this step: {message}")
            return None
        return super().optimizer_step(epoch, batch_idx, optimizer, lambda: result)

    def _gradients_checked(self) -> bool:
        # fp16 mixed precision produces inf gradients on purpose; its GradScaler skips those steps itself.
        return self._trainer is None or str(self.trainer.precision) not in ("16-mixed", "16")

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (one device sync; identical on all ranks after DDP's all-reduce)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # A NaN or inf anywhere makes the total norm non-finite; the fused norm costs one kernel per dtype/device.
        return not grads or bool(torch.nn.utils.get_total_norm(grads, foreach=True).isfinite())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the calibration of the latest validation (read back by :meth:`on_load_checkpoint`)."""
        if self.calibration is not None:
            checkpoint[CALIBRATION_KEY] = self.calibration.to_dict()

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
