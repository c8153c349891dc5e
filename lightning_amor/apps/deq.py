"""Deep equilibrium models (DEQ) with a learned initializer of the fixed point (HyperDEQ-style, Bai et al. 2022).

A DEQ classifier defines its features as the fixed point z*(x) of one layer and reads its class from them:

    z* = g_φ(z*, x) = tanh(W z* + U x + b),   logits = head(z*),

with ‖W‖₂ ≤ ``contraction`` < 1 (W = γ V / max(1, σ_max(V))), so g is a contraction in z (tanh is 1-Lipschitz) and
z* exists, is unique, and fixed-point iteration converges to it from anywhere. In the framework's terms
(:class:`~lightning_amor.fixed_point.FixedPointObjective`): the problem is "find z with z = g_φ(z, x)", f is
½‖g_φ(z, x) − z‖², the certificate ‖g_φ(z, x) − z‖ and the oracle a fixed-point solver (Anderson). Two components
learn (``AmortizedModule(objective_optimizer=...)``, docs/components.md):

- the objective's parameters φ (U, b, V and the head) learn the task: the cross-entropy of head(z*) against the
  label carried by the context, differentiated through z* by the implicit function theorem
  (:func:`~lightning_amor.fixed_point.implicit_fixed_point`), so no solver iteration is kept in memory;
- the amortizer is the initializer ẑ_θ(x) (an MLP on the image, :class:`KeyedMLP`, or one that also reads the
  DEQ's injection U x + b and predicts only the rest of the pre-activation, :class:`InjectionInitializer`): it
  learns to predict z* by regression onto the solver's fixed point (:class:`SolvedRegressionLoss`, optionally plus
  the residual f(ẑ)), with φ held constant. The solver then starts from ẑ_θ(x) instead of zero, in training and at
  inference.

Optionally (``DEQModule(equilibrium_weight=λ)``) the DEQ's task loss also pulls its fixed point towards the
initializer's prediction, λ‖z* − stopgrad(ẑ)‖² (joint training as in HyperDEQ), so that φ learns equilibria that
are easier to predict.

Contexts are ``{"image": B x 64, "label": B}`` (:class:`datamodules.digits_classes.DigitsClasses`). The task's
accuracy must not depend on where the solver starts: :class:`DEQModule` reports the accuracy and the solver's
iterations from the learned start and from zero side by side.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput, Amortizer
from lightning_amor.fallback import Fallback
from lightning_amor.fixed_point import (
    FixedPointMap,
    FixedPointObjective,
    FixedPointResult,
    FixedPointSolver,
    implicit_fixed_point,
)
from lightning_amor.losses import AmortizationLoss
from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective, ObjectiveShapeError
from lightning_amor.solvers import Solver


def _entry(x: Context, key: str, who: str) -> Tensor:
    if not isinstance(x, dict) or key not in x:
        got = sorted(x) if isinstance(x, dict) else type(x).__name__
        raise ObjectiveShapeError(f"{who} expects dict contexts with the key {key!r} (e.g. from "
                                  f"datamodules.digits_classes.DigitsClasses), got {got}")
    return x[key]


class DEQClassifier(FixedPointObjective):
    """A DEQ layer z = tanh(W z + U x + b) with a linear classifier head, as a fixed-point problem.

    Solutions are the features z, ``B x hidden``; contexts ``{"image": B x input_dim, "label": B}`` (images may be
    ``B x ...`` with ``input_dim`` numbers each).

    Args:
        input_dim: numbers per image (64 for the 8×8 digits).
        hidden: n, the size of z.
        classes: the classes of the head.
        contraction: γ in (0, 1), the bound on ‖W‖₂ and so on g's Lipschitz constant in z.
        solver: the fixed-point solver of the oracle and of training (default ``Anderson()``).
        seed: the seed of the initial weights (so that a recipe always starts from the same φ).
    """

    def __init__(
        self, input_dim: int = 64, hidden: int = 64, classes: int = 10, contraction: float = 0.9,
        solver: Optional[FixedPointSolver] = None, seed: int = 0,
    ) -> None:
        super().__init__(solver)
        if min(input_dim, hidden, classes) < 1:
            raise ValueError(f"DEQClassifier: input_dim, hidden and classes must be positive, got {input_dim}, "
                             f"{hidden}, {classes}")
        if not 0.0 < contraction < 1.0:
            raise ValueError(f"DEQClassifier: contraction must lie in (0, 1) for the fixed point to exist and be "
                             f"unique, got {contraction}")
        self.dim = hidden
        self.input_dim, self.classes, self.contraction = input_dim, classes, float(contraction)
        generator = torch.Generator().manual_seed(seed)
        self.injection = nn.Linear(input_dim, hidden)
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            for layer in (self.injection, self.head):
                bound = layer.in_features**-0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=generator))
        self.recurrent = nn.Parameter(torch.randn(hidden, hidden, generator=generator) / hidden**0.5)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden={self.dim}, classes={self.classes}, contraction={self.contraction}"

    def weight(self) -> Tensor:
        """W = γ V / max(1, σ_max(V)), ``n x n``: ‖W‖₂ ≤ γ."""
        # σ_max = u₁ᵀ V v₁ with the singular vectors taken as constants: its value and its gradient u₁ v₁ᵀ are exact,
        # and unlike torch's differentiable SVD it gives the same bits with and without autograd, so a certificate
        # computed with gradients on matches the solver's to the last digit
        with torch.no_grad():
            left, _, right = torch.linalg.svd(self.recurrent)
        norm = left[:, 0] @ self.recurrent @ right[0]
        return self.contraction * self.recurrent / norm.clamp_min(1.0)

    def image(self, x: Context) -> Tensor:
        """The images of the contexts as ``B x input_dim``."""
        image = _entry(x, "image", "DEQClassifier")
        image = image.reshape(image.shape[0], -1)
        if image.shape[1] != self.input_dim:
            raise ObjectiveShapeError(f"DEQClassifier: images have {image.shape[1]} numbers each, but input_dim is "
                                      f"{self.input_dim}; set model.init_args.objective.init_args.input_dim")
        return image.to(self.recurrent.dtype)

    def fixed_point_map(self, x: Context) -> FixedPointMap:
        """g(·, x) with W and the injection U x + b computed once: ``B x n -> B x n``."""
        weight = self.weight()
        injected = self.injection(self.image(x))
        return lambda z: torch.tanh(z @ weight.T + injected)

    def step(self, z: Tensor, x: Context) -> Tensor:
        """g(z, x) = tanh(W z + U x + b), ``B x n``."""
        return self.fixed_point_map(x)(z)

    def logits(self, z: Tensor) -> Tensor:
        """Class scores of features ``B x n``: ``B x classes``."""
        return self.head(z)

    def labels(self, x: Context) -> Tensor:
        """The contexts' labels, ``B`` int64."""
        labels = _entry(x, "label", "DEQClassifier")
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ObjectiveShapeError(f"DEQClassifier: labels must be a B vector of class indices, got dtype "
                                      f"{labels.dtype} and shape {tuple(labels.shape)}")
        return labels.long()


class KeyedMLP(nn.Module):
    """An :class:`~lightning_amor.MLP` applied to one entry of dict contexts: ``x[key]`` (``B x ...``, flattened)
    -> ``B x out_features``; the initializer ẑ_θ(x) of a DEQ.

    Args:
        in_features, out_features, hidden: as :class:`~lightning_amor.MLP`.
        key: the context entry it reads.
        squash: end with tanh, for targets in (−1, 1) such as the fixed point of a tanh layer.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (128,), key: str = "image",
                 squash: bool = False) -> None:
        super().__init__()
        self.key = key
        self.squash = squash
        self.net = MLP(in_features, out_features, hidden=list(hidden))

    def forward(self, x: Context) -> Tensor:
        """``B x out_features``."""
        value = _entry(x, self.key, "KeyedMLP")
        out = self.net(value.reshape(value.shape[0], -1))
        return torch.tanh(out) if self.squash else out


class InjectionInitializer(Amortizer):
    """ẑ_θ(x) = tanh(a + net([x, a])) with a = U x + b the DEQ's own injection: an initializer that predicts only
    the recurrent part W z* of the fixed point's pre-activation (z* = tanh(W z* + a)).

    The injection is what every solve computes once before its first evaluation of g (it is not an evaluation of
    g: W is never applied), so the start costs no g-evaluation. φ is held constant in the initializer's own loss
    (the module freezes it), so a carries no gradient to U or b from there.

    Args:
        input_dim: numbers per image (the DEQ's ``input_dim``).
        hidden_dim: n, the DEQ's ``hidden``.
        hidden: widths of the MLP's hidden layers; the MLP maps ``B x (input_dim + n)`` to ``B x n``.
        key: the context entry holding the image.
        activation: the MLP's activation (:class:`~lightning_amor.nets.MLP`'s names; a smooth one such as ``silu``
            suits the smooth map x ↦ z*(x)).
    """

    def __init__(self, input_dim: int, hidden_dim: int, hidden: Sequence[int] = (256, 256), key: str = "image",
                 activation: str = "relu") -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.key = input_dim, hidden_dim, key
        self.net = MLP(input_dim + hidden_dim, hidden_dim, hidden=list(hidden), activation=activation)

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """``B x n``, in (−1, 1)."""
        if not isinstance(objective, DEQClassifier):
            raise TypeError(f"InjectionInitializer needs a DEQClassifier objective, got {type(objective).__name__}")
        if (objective.input_dim, objective.dim) != (self.input_dim, self.hidden_dim):
            raise ObjectiveShapeError(
                f"InjectionInitializer was built for input_dim={self.input_dim}, hidden_dim={self.hidden_dim} but the "
                f"DEQ has input_dim={objective.input_dim}, hidden={objective.dim}; set them equal")
        image = objective.image({"image": _entry(x, self.key, "InjectionInitializer")})  # flattened, input_dim checked
        injected = objective.injection(image)
        y = torch.tanh(injected + self.net(torch.cat([image, injected], dim=-1)))
        return AmortizedOutput(y=y, iterates=[y])


class SolvedRegressionLoss(AmortizationLoss):
    """‖ẑ − z*‖² + w · f(ẑ): regression onto the solver's answer from the prediction, plus a residual term.

    z* is the objective's solver (``objective.solver``) run from the detached prediction ẑ, without a graph (the
    targets change as the objective learns, so none are cached). The last solve is kept (:attr:`last`) so the
    module's task loss can reuse it in the same step instead of solving again.

    Args:
        residual_weight: w, the weight of f(ẑ) = ½‖g(ẑ) − ẑ‖² (0: pure regression).
    """

    def __init__(self, residual_weight: float = 0.0) -> None:
        super().__init__()
        if not residual_weight >= 0:
            raise ValueError(f"SolvedRegressionLoss: residual_weight must be non-negative, got {residual_weight}")
        self.residual_weight = float(residual_weight)
        self.last: Optional[tuple[Tensor, FixedPointResult]] = None

    def iterate_loss(self, y: Tensor, x: Context, objective: Objective, y_star: Optional[Tensor]) -> Tensor:
        """``B`` losses of the prediction ``y`` (``B x n``)."""
        if not isinstance(objective, FixedPointObjective):
            raise TypeError(f"SolvedRegressionLoss needs a FixedPointObjective, got {type(objective).__name__}")
        start = y.detach()
        result = objective.solver.solve(objective, x, init=start)
        self.last = (start, result)
        loss = ((y - result.y) ** 2).sum(-1)
        if self.residual_weight:
            loss = loss + self.residual_weight * objective(y, x)
        return loss


class DEQModule(AmortizedModule):
    """A DEQ classifier (the objective, trained by its task loss) and its learned initializer (the amortizer).

    Training (two components: set ``objective_optimizer``): the initializer learns by ``loss`` (default
    :class:`SolvedRegressionLoss`); the DEQ by :meth:`objective_loss`, the cross-entropy at the fixed point solved
    from the initializer's prediction, with the implicit gradient (plus ``equilibrium_weight`` · ‖z* − ẑ‖²). Logged
    every logging step: ``train/objective_loss``, ``train/forward_iterations``, ``train/forward_unconverged`` and
    ``train/backward_unconverged`` (contexts of the batch whose solve did not converge; a warning with the residual
    trace is given the first time), and with ``equilibrium_weight`` > 0 ``train/equilibrium_distance`` (mean
    ‖z* − ẑ‖).

    Validation and test (``refine``: the fixed-point solver run from the prediction, which gives the reference z*):
    ``accuracy`` (of head(z*) from the learned start), ``cold_accuracy`` (from z = 0), ``initializer_accuracy``
    (of head(ẑ) without any solve), ``iterations`` and ``cold_iterations`` (the solver's updates from each start),
    ``converged`` and ``cold_converged`` (shares of contexts certified), ``residual`` (‖g(ẑ) − ẑ‖ of the prediction).

    Args:
        objective: the :class:`DEQClassifier`; its ``solver`` is also the default ``refine`` and the default
            ``inference`` policy's solver (``Fallback(tolerance=solver.atol, solver=solver)``).
        amortizer: the initializer (a ``FullyAmortized`` :class:`KeyedMLP` or an :class:`InjectionInitializer`).
        backward_solver: the solver of the implicit gradient's linear fixed point (default
            ``Anderson(steps=100, atol=1e-6)``).
        equilibrium_weight: λ ≥ 0, the weight of ‖z* − stopgrad(ẑ)‖² added to the DEQ's task loss (joint training,
            HyperDEQ-style: φ learns equilibria that the initializer can predict; the gradient reaches φ through z*
            implicitly, the initializer is untouched by it). 0 (default): the task loss alone.
        loss, refine, inference, objective_optimizer, **kwargs: as :class:`~lightning_amor.AmortizedModule` (its
            other arguments pass through).
    """

    def __init__(
        self,
        objective: DEQClassifier,
        amortizer: Amortizer,
        loss: Optional[AmortizationLoss] = None,
        refine: Optional[Solver] = None,
        inference: Optional[Fallback] = None,
        objective_optimizer: Optional[OptimizerCallable] = None,
        backward_solver: Optional[FixedPointSolver] = None,
        equilibrium_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(objective, DEQClassifier):
            raise TypeError(f"DEQModule needs a DEQClassifier, got {type(objective).__name__}")
        if objective_optimizer is None:
            raise ValueError("DEQModule trains the DEQ by its task loss as a separate component: set "
                             "model.init_args.objective_optimizer (e.g. {class_path: torch.optim.Adam})")
        if not equilibrium_weight >= 0:  # also catches NaN
            raise ValueError(f"DEQModule: equilibrium_weight must be a non-negative number (0 turns the term off), got "
                             f"{equilibrium_weight}")
        if inference is None:
            inference = Fallback(tolerance=_tolerance_of(objective.solver), solver=objective.solver)
        super().__init__(
            objective, amortizer, loss=loss if loss is not None else SolvedRegressionLoss(),
            refine=refine if refine is not None else objective.solver, inference=inference,
            objective_optimizer=objective_optimizer, **kwargs,
        )
        self.backward_solver = backward_solver
        self.equilibrium_weight = float(equilibrium_weight)
        self._refined: Optional[FixedPointResult] = None
        self._warned = False

    def _logs(self) -> bool:
        """Whether this training step's scalars are logged (a module used without a Trainer logs nothing)."""
        try:
            self.trainer  # noqa: B018 - raises when the module is not attached to a Trainer
        except RuntimeError:
            return False
        return self._logging_step()

    def _report(self, what: str, result: FixedPointResult, batch: int) -> None:
        unconverged = int((~result.converged).sum())
        if self._logs():
            self.log(f"train/{what}_unconverged", float(unconverged), batch_size=batch)
        if unconverged and not self._warned:
            self._warned = True
            trace = result.residuals.nanmedian(1).values
            shown = ", ".join(f"{float(v):.3g}" for v in trace[:: max(1, len(trace) // 8)])
            warnings.warn(f"DEQModule: the {what} fixed-point solve did not converge for {unconverged} of {batch} "
                          f"contexts at step {self.global_step} ({result.summary()}); median residual trace: {shown}",
                          RuntimeWarning, stacklevel=2)

    def objective_loss(self, x: Context, y_star: Optional[Tensor], output: AmortizedOutput) -> Tensor:
        """The cross-entropy of head(z*) against the labels, ``B``; z* solved from the (detached) prediction and
        differentiated implicitly, plus ``equilibrium_weight`` · ‖z* − ẑ‖² (ẑ the detached prediction). Contexts
        marked ``"augmented"`` (shifted, mixed or noised images, :class:`~datamodules.labelled.LabelledImages`) have
        no true label: their cross-entropy gets zero weight, the others ``B / kept`` so that the mean over the batch is
        the mean over the kept ones; the equilibrium term, which needs no label, counts for every context."""
        objective: DEQClassifier = self.objective
        cached = getattr(self.loss, "last", None)
        if cached is not None and cached[0].shape == output.y.shape and torch.equal(cached[0], output.y):
            result = cached[1]  # the amortizer's loss solved from this very prediction in this step
        else:
            result = objective.solver.solve(objective, x, init=output.y)
        batch = output.y.shape[0]
        self._report("forward", result, batch)
        backward = []
        z = implicit_fixed_point(objective.fixed_point_map(x), result.y, self.backward_solver, backward.append)
        if self._logs():
            self.log("train/forward_iterations", result.iterations.double().mean(), batch_size=batch)
        self._pending_backward = backward
        loss = F.cross_entropy(objective.logits(z), objective.labels(x), reduction="none")
        if isinstance(x, dict) and "augmented" in x:  # augmented inputs have no true label: no cross-entropy
            kept = (~x["augmented"].bool()).to(loss.dtype)
            loss = loss * kept / kept.mean().clamp_min(1.0 / batch)
        if self.equilibrium_weight:  # needs no label: every input
            distance = ((z - output.y.detach()) ** 2).sum(-1)
            loss = loss + self.equilibrium_weight * distance
            if self._logs():
                self.log("train/equilibrium_distance", distance.detach().sqrt().mean(), batch_size=batch)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Report the backward solves of this step (they run during its backward pass)."""
        for result in getattr(self, "_pending_backward", []):
            self._report("backward", result, result.converged.numel())
        self._pending_backward = []

    def reference_solutions(self, x: Context, y: Tensor, y_star: Optional[Tensor]) -> Optional[Tensor]:
        """z* by ``refine`` from the prediction ``y`` (``B x n``); its solve is kept for the metrics."""
        if y_star is not None or self.refine is None:
            return y_star
        result = self.refine.solve(self.objective, x, init=y.detach())
        self._refined = result if isinstance(result, FixedPointResult) else None
        return result.y

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """Accuracy and solver work from the learned start and from zero, each ``B`` (see the class docstring)."""
        objective: DEQClassifier = self.objective
        x, labels = evaluated.x, objective.labels(evaluated.x)
        cold = self.refine.solve(objective, x)
        metrics = {
            "accuracy": _correct(objective, evaluated.y_star, labels),
            "cold_accuracy": _correct(objective, cold.y, labels),
            "initializer_accuracy": _correct(objective, evaluated.y, labels),
            "cold_iterations": cold.iterations.double(),
            "cold_converged": cold.converged.double(),
            "residual": objective.residual_flat(evaluated.y, x),
        }
        refined = self._refined
        if refined is not None:
            metrics["iterations"] = refined.iterations.double()
            metrics["converged"] = refined.converged.double()
        return metrics


def _tolerance_of(solver: FixedPointSolver) -> float:
    """The residual a solver accepts at a typical point (its ``atol``, or ``rtol`` when it has none)."""
    return solver.atol if solver.atol > 0 else solver.rtol


def _correct(objective: DEQClassifier, z: Optional[Tensor], labels: Tensor) -> Tensor:
    if z is None:
        return torch.full_like(labels, float("nan"), dtype=torch.float64)
    return (objective.logits(z).argmax(-1) == labels).double()
