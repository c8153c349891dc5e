"""Gradient-based meta-learning (MAML, first-order MAML, iMAML) as semi-amortized optimization over network weights.

A task T (a sinusoid to regress, a few-shot classification problem) is a context x: its support set
``(support_x, support_y)`` and its query set ``(query_x, query_y)``. The solution is the weights w of a network,
declared as a structured solution (:func:`~lightning_amor.structure.module_structure`) and evaluated per task with
:func:`~lightning_amor.structure.batched_functional_call`. In the tutorial's terms:

* the inner objective is the support loss, f(w; T) = L_support(w) (:class:`TaskLoss`);
* MAML (Finn et al. 2017) is a :class:`~lightning_amor.SemiAmortized` model whose initial iterate is a learned
  constant ŵ⁰ = θ (:class:`NetworkInit`, the meta-learned initial weights), refined by K gradient steps of size α on
  f; ``gradient: unroll`` is second-order MAML, ``first_order`` drops the Hessian of every step (FOMAML), and
  ``implicit`` with a shrinkage λ > 0 is iMAML (Rajeswaran et al. 2019): the proximal problem
  min_w f(w; T) + (λ/2)‖w − θ‖² solved by the inner steps (or, with
  :class:`~lightning_amor.tolerance_solve.ToleranceSemiAmortized`, to a stated tolerance per task, whose convergence
  the module logs) and differentiated by conjugate gradients on Hessian-vector products
  (:mod:`lightning_amor.implicit`);
* the outer loss is *not* f: it is the adapted weights' loss on the query set, L(θ) = E_T L_query(ŵ^K_θ(T))
  (:class:`QueryLoss`, an :class:`~lightning_amor.losses.AmortizationLoss`, which receives the whole task);
* a fully amortized contrast maps the support set to weights in one pass (:class:`SupportSetHypernetwork`, a
  hypernetwork used through :class:`~lightning_amor.FullyAmortized`);
* Finn et al.'s pre-trained-then-fine-tuned baseline is the same model with K = 0 inner steps in training (θ
  regresses every task's query set at once), fine-tuned at evaluation like the others.

:class:`MAMLModule` logs the adaptation curve: the query loss (and accuracy, for classification) of the held-out
tasks after 0, 1, 5, 10 plain gradient steps on the support set from the model's initial weights, with 95%
confidence intervals, as scalars; :class:`~lightning_amor.apps.maml_figures.AdaptationCurves` draws it in
TensorBoard (loss against inner step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from lightning_amor.amortizers import Amortizer, SemiAmortized
from lightning_amor.autograd_utils import gradients_enabled, usable_context
from lightning_amor.losses import AmortizationLoss
from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.objective import Context, Objective, ObjectiveShapeError
from lightning_amor.structure import Solution, batched_functional_call, module_structure, parameters_vector
from lightning_amor.tolerance_solve import ToleranceSemiAmortized

TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")
"""The entries of a task batch (a dict context)."""

TaskLossKind = Literal["mse", "cross_entropy"]


class TaskBatchError(ValueError):
    """A batch of tasks that is not one: missing entries, mismatched shapes, or NaN / infinite numbers."""


def check_task_batch(x: Context, loss: TaskLossKind = "mse", finite: bool = True) -> None:
    """Refuse a malformed batch of tasks with one message saying what is wrong and how to fix it.

    A batch is a dict with ``support_x`` (``B x K x d``), ``support_y`` (``B x K x t`` real targets for ``mse``,
    ``B x K`` integer labels for ``cross_entropy``), ``query_x`` (``B x Q x d``) and ``query_y`` (as
    ``support_y`` with Q); the support and query sets of a task share d (and t).

    Args:
        x: the batch.
        loss: the task loss the targets are for.
        finite: also refuse NaN or infinite numbers (one device synchronisation per entry).

    Raises:
        TaskBatchError: naming the entry, the shapes and the tasks at fault.
    """
    if not isinstance(x, dict) or set(x) != set(TASK_KEYS):
        got = sorted(x) if isinstance(x, dict) else f"a {type(x).__name__}"
        raise TaskBatchError(
            f"a task batch is a dict with exactly the entries {list(TASK_KEYS)}, got {got}; draw tasks with "
            f"datamodules.sinusoid.SinusoidTasks or datamodules.few_shot_digits.FewShotDigits, or build the dict"
        )
    sx, sy, qx, qy = (x[k] for k in TASK_KEYS)
    labels = loss == "cross_entropy"
    target_dims = 2 if labels else 3
    for name, t, dims in (("support_x", sx, 3), ("query_x", qx, 3), ("support_y", sy, target_dims),
                          ("query_y", qy, target_dims)):
        if t.dim() != dims:
            shape = "B x K" if dims == 2 else "B x K x features"
            raise TaskBatchError(f"the task batch's {name!r} must be {shape} ({dims} dimensions), got shape "
                                 f"{tuple(t.shape)}")
    if labels and (sy.is_floating_point() or qy.is_floating_point()):
        raise TaskBatchError("a classification task batch needs integer class labels in 'support_y' and 'query_y', "
                             f"got {sy.dtype} and {qy.dtype}")
    batch = sx.shape[0]
    if any(t.shape[0] != batch for t in (sy, qx, qy)):
        raise TaskBatchError(
            f"every entry of a task batch must hold the same number of tasks, got support_x {tuple(sx.shape)}, "
            f"support_y {tuple(sy.shape)}, query_x {tuple(qx.shape)}, query_y {tuple(qy.shape)}"
        )
    for side, inputs, targets in (("support", sx, sy), ("query", qx, qy)):
        if targets.shape[1] != inputs.shape[1]:
            raise TaskBatchError(
                f"the {side} set has {inputs.shape[1]} inputs but {targets.shape[1]} targets per task ({side}_x "
                f"{tuple(inputs.shape)}, {side}_y {tuple(targets.shape)}); give one target per input"
            )
    if sx.shape[2] != qx.shape[2] or (not labels and sy.shape[2] != qy.shape[2]):
        raise TaskBatchError(
            f"the support and query sets of a task must have the same input and target sizes, got support_x "
            f"{tuple(sx.shape)} / query_x {tuple(qx.shape)} and support_y {tuple(sy.shape)} / query_y "
            f"{tuple(qy.shape)}"
        )
    if not finite:
        return
    for name in TASK_KEYS:
        t = x[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(batch, -1))).any(-1).nonzero().flatten().tolist()
            raise TaskBatchError(
                f"the task batch's {name!r} holds NaN or infinite numbers in {len(bad)} task(s) {bad[:10]}; fix or "
                f"drop those tasks (the data module's sample, or the data it reads)"
            )


class TaskLoss(Objective):
    """f(w; T): the loss of a network with weights w on the support set of task T.

    The solution of one task is the network's weights, a structured solution named as ``net.named_parameters()``
    (``B x *param_shape`` each, flat ``B x n`` for the framework). ``net`` itself is a frozen template: its weights
    are never trained, they only give the layout and the from-scratch start of a solver
    (:meth:`initial_point`).

    Args:
        net: the task network, ``K x d -> K x t`` for one task (e.g. :class:`~lightning_amor.MLP`).
        loss: ``mse`` (mean over points and outputs of the squared error, as Finn et al.) or ``cross_entropy``
            (mean over points, integer labels, ``t`` classes).
    """

    def __init__(self, net: nn.Module, loss: TaskLossKind = "mse") -> None:
        super().__init__()
        if loss not in ("mse", "cross_entropy"):
            raise ValueError(f"TaskLoss: loss must be 'mse' or 'cross_entropy', got {loss!r}")
        self.net = net.requires_grad_(False)
        self.loss = loss
        self.set_structure(module_structure(self.net))

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, dim={self.dim}"

    @property
    def classification(self) -> bool:
        """Whether the tasks are classification problems (``cross_entropy``)."""
        return self.loss == "cross_entropy"

    def predictions(self, weights: Solution, inputs: Tensor) -> Tensor:
        """Each task's network on its inputs: weights ``B x *param_shape`` by name (or flat ``B x n``), inputs
        ``B x K x d`` -> ``B x K x t``."""
        if isinstance(weights, Tensor):
            weights = self.view(weights)
        return batched_functional_call(self.net, weights, inputs)

    def task_loss(self, weights: Solution, inputs: Tensor, targets: Tensor) -> Tensor:
        """The mean loss of each task's network on ``B x K x d`` inputs and their targets: ``B``."""
        out = self.predictions(weights, inputs)
        if self.classification:
            if out.shape[:2] != targets.shape:
                raise ObjectiveShapeError(f"TaskLoss: the network gives outputs {tuple(out.shape)} for labels "
                                          f"{tuple(targets.shape)}; give one integer label per input")
            return F.cross_entropy(out.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)
        if out.shape != targets.shape:
            raise ObjectiveShapeError(f"TaskLoss: the network maps the inputs to outputs of shape {tuple(out.shape)}, "
                                      f"but the targets have shape {tuple(targets.shape)}; match the network's "
                                      f"output size to the targets'")
        return ((out - targets) ** 2).mean((1, 2))

    def value(self, weights: Solution, x: Context) -> Tensor:
        """The support loss, ``B`` (shapes are checked, without a device synchronisation)."""
        check_task_batch(x, self.loss, finite=False)
        return self.task_loss(weights, x["support_x"], x["support_y"])

    def query_loss(self, y: Tensor, x: Context) -> Tensor:
        """The query loss of flat ``B x n`` weights (MAML's outer loss): ``B``."""
        return self.task_loss(self.view(y), x["query_x"], x["query_y"])

    def query_accuracy(self, y: Tensor, x: Context) -> Tensor:
        """The share of query points classified right by flat ``B x n`` weights: ``B`` (classification only)."""
        if not self.classification:
            raise ValueError("TaskLoss.query_accuracy: accuracy is defined for loss='cross_entropy' only")
        out = self.predictions(self.view(y), x["query_x"])
        return (out.argmax(-1) == x["query_y"]).to(out.dtype).mean(1)

    def initial_point(self, x: Context) -> Tensor:
        """The template network's weights for every task, ``B x n``: a solver's start "from scratch" (zero weights
        would leave every hidden unit alike)."""
        start = parameters_vector(self.net)
        return start.expand(x["support_x"].shape[0], -1).to(x["support_x"].dtype).clone()


def _task_objective(objective: Objective, who: str) -> TaskLoss:
    if not isinstance(objective, TaskLoss):
        raise TypeError(f"{who} works on a TaskLoss (tasks with support and query sets), got "
                        f"{type(objective).__name__}")
    return objective


class QueryLoss(AmortizationLoss):
    """MAML's outer loss: the query-set loss of the adapted weights, L_query(ŵ(T)), ``B``.

    The inner steps descend f = the support loss (the objective); this loss scores where they end on the task's
    other points, so the framework's "objective loss" here is not f itself. The task batch is checked first
    (:func:`check_task_batch`): a NaN target or mismatched support and query sets is one clear error.
    """

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Optional[Tensor]) -> Tensor:
        """The query loss of ``B x n`` weights, ``B``."""
        tasks = _task_objective(objective, "QueryLoss")
        check_task_batch(x, tasks.loss)
        return tasks.query_loss(y, x)


class NetworkInit(nn.Module):
    """MAML's meta-learned initial weights: a learned ``n`` vector θ broadcast to every task (``B x n``), started
    at a freshly initialised network's weights (zero weights would make every hidden unit the same).

    Args:
        net: a network of the same architecture as the :class:`TaskLoss`'s (only its initial weights are read).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.shapes = module_structure(net)
        self.value = nn.Parameter(parameters_vector(net).clone())

    def forward(self, x: Context) -> Tensor:
        """Any task batch of ``B`` tasks -> ``B x n``."""
        batch = x["support_x"].shape[0] if isinstance(x, dict) else x.shape[0]
        return self.value.expand(batch, -1)


class SupportSetHypernetwork(nn.Module):
    """A fully amortized contrast: the support set mapped to the task network's weights in one pass.

    Every support pair (input, target; a label one-hot) is embedded by an MLP, the embeddings averaged over the
    task's K points (a permutation-invariant set encoding), and a second MLP maps the average to the ``n``
    weights. The output layer starts near zero with the template network's weights as its bias, so the untrained
    hypernetwork predicts a sensible network for every task.

    Args:
        net: the task network (its weights give ``n`` and the starting bias).
        in_features: d, the size of a task input.
        targets: t, the size of a real target, or the number of classes for labels.
        labels: whether targets are integer class labels (one-hot encoded).
        hidden: the width of both MLPs.
    """

    def __init__(self, net: nn.Module, in_features: int, targets: int, labels: bool = False,
                 hidden: int = 128) -> None:
        super().__init__()
        if in_features < 1 or targets < 1 or hidden < 1:
            raise ValueError(f"SupportSetHypernetwork: sizes must be positive, got in_features={in_features}, "
                             f"targets={targets}, hidden={hidden}")
        self.labels, self.targets = labels, targets
        self.embed = nn.Sequential(nn.Linear(in_features + targets, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU())
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        template = parameters_vector(net)
        self.out = nn.Linear(hidden, template.numel())
        with torch.no_grad():
            self.out.weight.mul_(0.01)
            self.out.bias.copy_(template)

    def forward(self, x: Context) -> Tensor:
        """A task batch -> ``B x n`` weights."""
        targets = x["support_y"]
        if self.labels:
            targets = F.one_hot(targets.long(), self.targets).to(x["support_x"].dtype)
        pairs = torch.cat([x["support_x"], targets], dim=-1)
        return self.out(self.head(self.embed(pairs).mean(1)))


class MAMLModule(AmortizedModule):
    """An :class:`~lightning_amor.AmortizedModule` for meta-learning: query loss by default, adaptation curves.

    Logged on the validation and test sets, besides the core metrics (``objective`` = mean support loss of the
    adapted weights, ``gap`` against ``refine``): ``query`` (the query loss of the model's own prediction),
    ``query_step{t}`` for every t of ``adapt_steps`` (the query loss after t gradient steps of size ``adapt_lr``
    on the support loss from the model's initial weights: the meta-learned θ of MAML / iMAML / the baseline, the
    hypernetwork's prediction), ``query_ci95_step{t}`` (the half-width of its 95% confidence interval over the
    tasks), and for classification ``accuracy`` and ``accuracy_step{t}``. The latest curve of each stage is kept in
    :attr:`adaptation` (an :class:`AdaptationSummary`), which the figure callback
    :class:`~lightning_amor.apps.maml_figures.AdaptationCurves` draws in TensorBoard.

    Args:
        objective: the :class:`TaskLoss`.
        amortizer: MAML / FOMAML / iMAML (:class:`~lightning_amor.SemiAmortized` over a :class:`NetworkInit`)
            or the fully amortized :class:`SupportSetHypernetwork`.
        loss: the outer loss (default :class:`QueryLoss`).
        adapt_steps: the inner steps at which the adaptation curve is measured.
        adapt_lr: the step size of the curve's gradient steps (Finn et al.'s 0.01 for sinusoids).
        **kwargs: the other arguments of :class:`~lightning_amor.AmortizedModule` (optimizer, refine, ...).
    """

    def __init__(
        self,
        objective: TaskLoss,
        amortizer: Amortizer,
        loss: Optional[AmortizationLoss] = None,
        adapt_steps: Sequence[int] = (0, 1, 5, 10),
        adapt_lr: float = 0.01,
        **kwargs: Any,
    ) -> None:
        _task_objective(objective, "MAMLModule")
        steps = sorted({int(s) for s in adapt_steps})
        if not steps or steps[0] < 0 or len(steps) != len(adapt_steps):
            raise ValueError(f"MAMLModule: adapt_steps must be distinct non-negative integers, got {list(adapt_steps)}")
        if not adapt_lr > 0:
            raise ValueError(f"MAMLModule: adapt_lr must be positive, got {adapt_lr}")
        init = getattr(amortizer, "init", None)
        if isinstance(init, NetworkInit) and init.shapes != module_structure(objective.net):
            raise ValueError(
                "MAMLModule: the NetworkInit's network has the parameters "
                f"{ {k: list(v) for k, v in init.shapes.items()} } but the TaskLoss's has "
                f"{ {k: list(v) for k, v in module_structure(objective.net).items()} }; give both the same network"
            )
        super().__init__(objective, amortizer, loss=loss if loss is not None else QueryLoss(), **kwargs)
        self.adapt_steps = steps
        self.adapt_lr = float(adapt_lr)
        # every held-out task's query loss at each step of the curve (gathered over DDP ranks)
        self.curve_values = nn.ModuleDict({"val": CatMetric(nan_strategy="disable"),
                                           "test": CatMetric(nan_strategy="disable")})
        self.adaptation: dict[str, AdaptationSummary] = {}  # the latest curve of each stage, for figure callbacks

    def initial_weights(self, x: Context) -> Tensor:
        """The model's weights before any adaptation, ``B x n``: θ of a semi-amortized model, the prediction of a
        fully amortized one."""
        if isinstance(self.amortizer, SemiAmortized):
            return self.objective.project_flat(self.objective.flatten(self.amortizer.init(x)))
        return self.amortizer(x, self.objective).y

    def adaptation_curve(self, x: Context, steps: Optional[Sequence[int]] = None) -> dict[int, Tensor]:
        """Weights after t plain gradient steps (size ``adapt_lr``) on the support loss from
        :meth:`initial_weights`, for every t of ``steps`` (default ``adapt_steps``): ``{t: B x n}``, detached."""
        steps = self.adapt_steps if steps is None else sorted(steps)
        with gradients_enabled():
            x = usable_context(x)
            y = self.initial_weights(x).detach()
            out = {0: y} if 0 in steps else {}
            for t in range(1, max(steps) + 1):
                point = y.detach().requires_grad_()  # a new leaf: the weights kept in `out` stay constants
                (grad,) = torch.autograd.grad(self.objective(point, x).sum(), point)
                y = (point - self.adapt_lr * grad).detach()
                if t in steps:
                    out[t] = y
        return out

    def inner_report(self, batch_size: int) -> Optional[dict[str, Tensor]]:
        """The per-task convergence of the last inner solve of a :class:`~lightning_amor.tolerance_solve.
        ToleranceSemiAmortized` amortizer over ``batch_size`` tasks: ``inner_converged`` (1 where the task met the
        tolerance, else 0) and ``inner_residual_ratio`` (‖∇F(ŵ)‖ / ‖∇F(θ)‖), each ``B``; ``None`` for other models."""
        report = getattr(self.amortizer, "last_report", None)
        if not isinstance(self.amortizer, ToleranceSemiAmortized) or report is None:
            return None
        if report.converged.shape[0] != batch_size:
            return None
        return {"inner_converged": report.converged.float(), "inner_residual_ratio": report.ratio.float()}

    def training_step(self, batch: Context, batch_idx: int) -> Optional[Tensor]:
        """The core's training step, then (iMAML to tolerance) ``train/inner_converged`` (share of the batch's
        tasks whose proximal problem met the tolerance), ``train/inner_residual_ratio`` (median ratio),
        ``train/inner_residual_ratio_max`` and ``train/inner_solver_steps`` (mean iterations)."""
        loss = super().training_step(batch, batch_idx)
        report = getattr(self.amortizer, "last_report", None)
        if isinstance(self.amortizer, ToleranceSemiAmortized) and report is not None and self._logging_step():
            batch_size = report.converged.shape[0]
            ratio = report.ratio.float()
            self.log("train/inner_converged", report.converged.float().mean(), batch_size=batch_size)
            self.log("train/inner_residual_ratio", ratio.median(), batch_size=batch_size)
            self.log("train/inner_residual_ratio_max", ratio.max(), batch_size=batch_size)
            self.log("train/inner_solver_steps", report.steps.float().mean(), batch_size=batch_size)
        return loss

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """The query loss (and accuracy) of the prediction and along the adaptation curve: each ``B``; for iMAML
        to tolerance also :meth:`inner_report`'s per-task convergence."""
        x = evaluated.x
        check_task_batch(x, self.objective.loss)
        flat = self.objective.flatten(evaluated.y)
        metrics = {"query": self.objective.query_loss(flat, x)}
        inner = self.inner_report(flat.shape[0])
        if inner is not None:
            metrics.update(inner)
        curve = self.adaptation_curve(x)
        losses = []
        for t, y in curve.items():
            metrics[f"query_step{t}"] = self.objective.query_loss(y, x)
            losses.append(metrics[f"query_step{t}"])
        if self.objective.classification:
            metrics["accuracy"] = self.objective.query_accuracy(flat, x)
            for t, y in curve.items():
                metrics[f"accuracy_step{t}"] = self.objective.query_accuracy(y, x)
        if self._trainer is not None:  # kept for the curve's confidence intervals at the epoch's end
            stage = "test" if self.trainer.testing else "val"
            self.curve_values[stage].update(torch.stack(losses, dim=1).detach())
        return metrics

    def _curve_summary(self, stage: str) -> Optional[tuple[Tensor, Tensor]]:
        """Mean and 95% half-width over the tasks of the query loss at each step of the curve, or ``None``."""
        values = self.curve_values[stage]
        if values.update_count == 0:
            return None
        table = values.compute().reshape(-1, len(self.adapt_steps)).double()
        values.reset()
        return mean_ci95(table)

    def _log_curve(self, stage: str) -> None:
        summary = self._curve_summary(stage)
        if summary is None:
            return
        mean, half = summary
        for t, h in zip(self.adapt_steps, half.tolist(), strict=True):
            self.log(f"{stage}/query_ci95_step{t}", h)
        self.adaptation[stage] = AdaptationSummary(tuple(self.adapt_steps), mean.cpu(), half.cpu(), self.global_step)

    def on_validation_epoch_end(self) -> None:
        """Log the metrics, the curve's intervals and its figure."""
        super().on_validation_epoch_end()
        self._log_curve("val")

    def on_test_epoch_end(self) -> None:
        """Log the test metrics, the curve's intervals and its figure."""
        super().on_test_epoch_end()
        self._log_curve("test")


@dataclass(frozen=True)
class AdaptationSummary:
    """The adaptation curve of one validation or test: the held-out tasks' mean query loss after each number of
    inner steps, and the half-widths of its 95% confidence intervals.

    Attributes:
        steps: the inner steps t (``S``).
        mean: ``S`` mean query losses.
        half_width: ``S`` half-widths (1.96 standard errors over the tasks).
        global_step: the training step it was measured at.
    """

    steps: tuple[int, ...]
    mean: Tensor
    half_width: Tensor
    global_step: int


def mean_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """Column means of ``N x S`` per-task values and the half-widths of their normal 95% confidence intervals
    (1.96 standard errors): each ``S``."""
    count = values.shape[0]
    std = values.std(0, unbiased=True) if count > 1 else torch.zeros_like(values[0])
    return values.mean(0), 1.96 * std / math.sqrt(count)
