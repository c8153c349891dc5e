"""Multi-hypothesis amortization: k candidate solutions per context, each refined by inner steps, the lowest f kept.

A semi-amortized model refines inside whichever basin its initial iterate lands in; where the global minimizer
y*(x) jumps between basins as x changes, one initial guess per context ends in the wrong basin near every jump.
:class:`MultiHypothesis` proposes ``k`` initial iterates per context (one network with ``k·n`` outputs), refines
each by the same differentiable inner steps as :class:`~lightning_amor.amortizers.SemiAmortized` (run on the
contexts repeated ``k`` times), and keeps the candidate with the lowest f. Trained winner-takes-all (the loss of the
kept candidate only, :class:`MultiHypothesisLoss`), the candidates spread over the basins: a candidate that loses a
context to another is not pulled towards the other's basin.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput, Amortizer, SemiAmortized
from lightning_amor.losses import AmortizationLoss
from lightning_amor.objective import Context, Objective, context_batch_size, context_index, context_repeat
from lightning_amor.updates import InnerUpdate


class _Candidates(nn.Module):
    """The initial iterates of the candidates: ``net`` runs once per context on contexts repeated ``k`` times (row
    ``b*k+j`` is context ``b``), and its ``B x (k·n)`` output becomes ``(B*k) x n``, row ``b*k+j`` candidate ``j``."""

    def __init__(self, net: nn.Module, hypotheses: int) -> None:
        super().__init__()
        self.net = net
        self.hypotheses = hypotheses
        self.dim = 0  # n, set by MultiHypothesis from the objective before each call

    def forward(self, repeated: Context) -> Tensor:
        k = self.hypotheses
        raw = self.net(context_index(repeated, slice(None, None, k)))
        if not isinstance(raw, Tensor) or raw.dim() != 2 or raw.shape[1] != k * self.dim:
            got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
            raise ValueError(
                f"MultiHypothesis: the init network must return B x (k·n) = B x {k * self.dim} flat candidates "
                f"(k = {k} hypotheses of the objective's n = {self.dim}), got {got}; set its output size "
                f"(e.g. MLP out_features) to {k * self.dim}"
            )
        return raw.reshape(-1, self.dim)


class MultiHypothesis(Amortizer):
    """``k`` candidates ŷ⁰_j = π(init(x)_j), each refined by K inner steps on f; the prediction is the candidate with
    the lowest f (NaN counts as the worst).

    The refinement is :class:`~lightning_amor.amortizers.SemiAmortized`'s, with the same update rules and gradient
    modes, run on the contexts repeated ``k`` times; ``steps=0`` gives a multi-hypothesis fully amortized model. The
    output's ``y`` and ``iterates`` are those of the kept candidates (``B x n`` each), so every loss of
    :mod:`lightning_amor.losses` trains winner-takes-all as it is; ``candidates`` holds every candidate's output
    (``(B*k) x n``) for :class:`MultiHypothesisLoss`, which adds a small weight on the losers. Works with any
    Objective (flat ``B x n`` solutions), under ``torch.no_grad`` and ``inference_mode``, and in export (the choice
    is a ``gather``, traced like any other operation).

    Args:
        init: a module ``x -> B x (k·n)``: the ``k`` initial candidates side by side (e.g. an
            :class:`~lightning_amor.nets.MLP` with ``out_features = k·n``).
        hypotheses: k, the number of candidates per context.
        steps: K, inner steps per candidate.
        update: the inner update rule (default: gradient descent with a learnable step size), shared by all.
        gradient: ``unroll``, ``first_order``, ``truncated`` or ``implicit``, as for ``SemiAmortized``.
        truncate: H of the ``truncated`` mode.
        shrinkage: λ of the inner problem (required > 0 for ``implicit``).
        cg_steps: conjugate-gradient iterations of the ``implicit`` mode.
    """

    def __init__(
        self,
        init: nn.Module,
        hypotheses: int = 4,
        steps: int = 5,
        update: InnerUpdate | None = None,
        gradient: str = "unroll",
        truncate: int = 1,
        shrinkage: float = 0.0,
        cg_steps: int = 20,
    ) -> None:
        super().__init__()
        if int(hypotheses) != hypotheses or hypotheses < 1:
            raise ValueError(f"MultiHypothesis: hypotheses must be a positive integer, got {hypotheses}")
        self.hypotheses = int(hypotheses)
        self.refine = SemiAmortized(
            _Candidates(init, self.hypotheses), steps=steps, update=update, gradient=gradient, truncate=truncate,
            shrinkage=shrinkage, cg_steps=cg_steps,
        )

    @property
    def init(self) -> nn.Module:
        """The network that proposes the ``k`` initial candidates."""
        return self.refine.init.net

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """The lowest-f candidate ``B x n`` with its iterates, and every candidate's output (``candidates``)."""
        k = self.hypotheses
        self.refine.init.dim = objective.dim
        repeated = context_repeat(x, k)
        candidates = self.refine(repeated, objective)
        with torch.no_grad():
            values = objective(candidates.y, repeated).reshape(context_batch_size(x), k)
            choice = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values).argmin(dim=1)
        y = pick_candidates(candidates.y, choice)
        iterates = [y if t is candidates.y else pick_candidates(t, choice) for t in candidates.iterates]
        return AmortizedOutput(y=y, iterates=iterates, candidates=candidates)


def pick_candidates(y: Tensor, choice: Tensor) -> Tensor:
    """Row ``choice[b]`` of each context's candidates: ``(B*k) x n`` candidates, ``B`` indices in ``[0, k)`` ->
    ``B x n``."""
    batch, dim = choice.shape[0], y.shape[-1]
    grouped = y.reshape(batch, -1, dim)
    return grouped.gather(1, choice.reshape(batch, 1, 1).expand(batch, 1, dim)).squeeze(1)


WINNERS = ("prediction", "lowest_loss")


class MultiHypothesisLoss(AmortizationLoss):
    """Winner-takes-all with a small weight on the losers: ``L(winner) + w · mean_{j ≠ winner} L(candidate j)``, ``B``.

    ``L`` is any loss of :mod:`lightning_amor.losses` (an objective, a regression, a sum over iterates), applied to
    each candidate of a :class:`MultiHypothesis`. The winner is either the candidate the model keeps as its
    prediction (lowest f), or the candidate with the lowest loss (multiple-choice learning: with a regression loss,
    the candidate nearest the reference, so that for contexts whose reference jumps between basins some candidate
    covers each basin). ``w = 0`` (the default) is pure winner-takes-all: a candidate that never wins is never
    trained; a small ``w`` keeps every candidate learning, but with a regression loss it also pulls every candidate
    towards the reference's basin, against the spread (on the sphere, k = 3: 3.8% of the held-out contexts in a
    wrong basin with ``w = 0.05``, 1.3% with ``w = 0``; ``lowest_loss`` winners: 2.6%).

    Args:
        base: the loss of one candidate.
        loser_weight: w ≥ 0, the weight of the mean loss of the other candidates.
        winner: ``prediction`` (the kept, lowest-f candidate) or ``lowest_loss`` (the candidate of lowest ``L``).
    """

    def __init__(self, base: AmortizationLoss, loser_weight: float = 0.0, winner: str = "prediction") -> None:
        super().__init__()
        if not loser_weight >= 0:
            raise ValueError(f"MultiHypothesisLoss: loser_weight must be >= 0, got {loser_weight}")
        if winner not in WINNERS:
            raise ValueError(f"MultiHypothesisLoss: winner must be one of {WINNERS}, got {winner!r}")
        self.base = base
        self.loser_weight = float(loser_weight)
        self.winner = winner
        self.needs_target = base.needs_target

    def forward(
        self, output: AmortizedOutput, x: Context, objective: Objective, y_star: Tensor | None = None
    ) -> Tensor:
        """Per-context loss, ``B``.

        Raises:
            ValueError: the output has no ``candidates`` (the model is not a :class:`MultiHypothesis`).
        """
        if output.candidates is None:
            raise ValueError(
                "MultiHypothesisLoss needs the candidates of a MultiHypothesis amortizer (output.candidates is None); "
                "use it with lightning_amor.MultiHypothesis, or use its base loss alone"
            )
        batch = context_batch_size(x)
        k = output.candidates.y.shape[0] // batch
        if self.winner == "prediction" and (k == 1 or self.loser_weight == 0):
            return self.base(output, x, objective, y_star)
        targets = None if y_star is None else y_star.repeat_interleave(k, dim=0)
        every = self.base(output.candidates, context_repeat(x, k), objective, targets).reshape(batch, k)
        if self.winner == "prediction":
            won = self.base(output, x, objective, y_star)
        else:
            won = every.min(dim=1).values
        if k == 1:
            return won
        return won + self.loser_weight * (every.sum(dim=1) - won) / (k - 1)
