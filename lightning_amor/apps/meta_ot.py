"""Meta OT (Amos et al. 2022): amortized entropic optimal transport between images, to warm-start Sinkhorn.

A context is a pair of histograms (a, b) on the pixels of one ``side x side`` grid (``n = side²`` pixels), carried
as a ``B x 2 x n`` tensor (``x[:, 0]`` is a, ``x[:, 1]`` is b). The ground cost is squared-Euclidean between pixel
centres, ``C_ij = ‖p_i − p_j‖²``, with the centres at ``k / (side − 1)`` for k = 0, …, side − 1 on each axis (the
grid spans [0, 1]², as in the issue's measurements). For ε > 0 the problem is

    OT_ε(a, b) = min_{P ≥ 0, P1 = a, Pᵀ1 = b} ⟨P, C⟩ + ε KL(P ‖ a ⊗ b),

whose dual (the sign convention used throughout: potentials are *maximised*) is

    max_{f, g} ⟨f, a⟩ + ⟨g, b⟩ − ε Σ_ij a_i b_j (exp((f_i + g_j − C_ij) / ε) − 1),

with the plan P_ij = a_i b_j exp((f_i + g_j − C_ij) / ε). Relative to a ⊗ b the potentials stay of the size of the
cost (they do not carry ε log a_i), which is what makes them learnable. For a fixed f the best g is in closed form,
one log-domain Sinkhorn half-step,

    g(f)_j = −ε log Σ_i a_i exp((f_i − C_ij) / ε),

after which every column of P sums exactly to b_j and the last term of the dual vanishes. The objective amortized
here is therefore the negative semi-dual in f alone (:class:`EntropicOT`),

    F(f; a, b) = −⟨f, a⟩ − ⟨g(f), b⟩,      ∇_f F = P(f)1 − a,

so no solver runs in training, the problem is convex in f, and its stationarity residual is the row-marginal
error of the plan. The certificate (:meth:`EntropicOT.residual`) is that marginal error in the L1 norm (or L2).
Potentials are defined up to a constant (f + c, g − c give the same plan and value), so distances between
potentials are measured after removing their mean difference.

Zero mass is allowed (log 0 = −∞ drops the pixel from the log-sum-exps), but the data modules add a small floor
before normalising, as Meta OT does, so every pixel carries some mass and its potential is determined.

The log-sum-exps run separably along the grid's two axes (``C`` is a sum of one cost per axis), so a half-step
costs ``O(B n side)`` instead of ``O(B n²)``: for 28×28 images 28× less work and no ``n x n`` matrix.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_amor.amortizers import Amortizer
from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective, ObjectiveShapeError

MarginalNorm = Literal["l1", "l2"]

MASS_TOLERANCE = 1e-4
"""How far from 1 the total mass of a histogram may be (float32 rounding of a normalised image is ~1e-6)."""


class HistogramError(ValueError):
    """A context is not a pair of probability histograms: NaN or infinite entries, negative mass, a sum other than 1."""


def grid_axis(side: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None) -> Tensor:
    """The ``side`` pixel-centre coordinates ``k / (side − 1)`` of a grid axis, from 0 to 1 (``[0]`` for one pixel)."""
    return torch.linspace(0.0, 1.0, side, dtype=dtype, device=device)


def grid_cost(side: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None) -> Tensor:
    """The dense ``n x n`` cost ``C_ij = ‖p_i − p_j‖²`` between the pixel centres of a ``side x side`` grid
    (pixels in row-major order, as ``image.flatten()``); ``n = side²``. For checks and POT: the solver never builds
    it."""
    t = grid_axis(side, dtype, device)
    rows, cols = torch.meshgrid(t, t, indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    return torch.cdist(points, points).pow(2)


def check_histograms(x: Tensor, side: int, who: str) -> None:
    """Refuse contexts that are not ``B x 2 x side²`` pairs of finite, non-negative histograms of mass 1.

    Raises:
        ObjectiveShapeError: the shape is wrong.
        HistogramError: NaN or infinite entries, negative mass, or a total mass farther than
            :data:`MASS_TOLERANCE` from 1; the message names the rows.
    """
    n = side * side
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != 2 or x.shape[2] != n:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ObjectiveShapeError(
            f"{who}: contexts must be pairs of histograms on the {side}x{side} grid, a B x 2 x {n} tensor "
            f"(x[:, 0] = a, x[:, 1] = b), got {got}"
        )

    def rows(mask: Tensor) -> str:
        index = mask.nonzero().flatten().tolist()
        return f"{index[:10]}{' and more' if len(index) > 10 else ''}"

    finite = torch.isfinite(x).all(-1).all(-1)
    if not bool(finite.all()):
        raise HistogramError(f"{who}: the histograms of rows {rows(~finite)} hold NaN or infinite numbers")
    negative = (x < 0).any(-1).any(-1)
    if bool(negative.any()):
        raise HistogramError(
            f"{who}: the histograms of rows {rows(negative)} have negative mass (smallest entry {float(x.min()):.3g}); "
            f"a histogram is non-negative: clip the images at 0 (and add a floor) before normalising"
        )
    sums = x.sum(-1, dtype=torch.float64)
    off = ((sums - 1.0).abs() > MASS_TOLERANCE).any(-1)
    if bool(off.any()):
        worst = float(sums[off].flatten()[(sums[off].flatten() - 1).abs().argmax()])
        raise HistogramError(
            f"{who}: the histograms of rows {rows(off)} do not sum to one (e.g. {worst:.6g}; allowed "
            f"±{MASS_TOLERANCE:g}); divide each histogram by its sum"
        )


class EntropicOT(Objective):
    """The negative entropic semi-dual F(f; a, b) = −⟨f, a⟩ − ⟨g(f), b⟩ on a ``side x side`` grid (see the module).

    Solutions ``f`` are ``B x n`` potentials (``n = side²``); contexts are ``B x 2 x n`` pairs of histograms; the value
    is ``B``. At the optimum −F equals OT_ε(a, b) (strong duality).

    Args:
        side: the grid's side (8 for the digits, 28 for Fashion-MNIST).
        epsilon: the entropic regularisation ε > 0, in units of squared distance on [0, 1]².
        marginal_norm: the norm of the certificate, the row-marginal error ‖P(f)1 − a‖: ``l1`` or ``l2``.
        oracle_tol: the marginal error at which the oracle (:meth:`solve`, Sinkhorn) stops.
        oracle_steps: the oracle's Sinkhorn iterations at most; an oracle that does not reach ``oracle_tol`` raises.
    """

    def __init__(
        self, side: int = 8, epsilon: float = 0.01, marginal_norm: MarginalNorm = "l1", oracle_tol: float = 1e-5,
        oracle_steps: int = 20000,
    ) -> None:
        super().__init__()
        if int(side) != side or side < 1:
            raise ValueError(f"EntropicOT: side must be a positive integer, got {side}")
        if not epsilon > 0:
            raise ValueError(f"EntropicOT: epsilon must be positive, got {epsilon}")
        if marginal_norm not in ("l1", "l2"):
            raise ValueError(f"EntropicOT: marginal_norm must be 'l1' or 'l2', got {marginal_norm!r}")
        if not oracle_tol > 0 or int(oracle_steps) != oracle_steps or oracle_steps < 1:
            raise ValueError(
                f"EntropicOT: oracle_tol must be positive and oracle_steps a positive integer, got {oracle_tol} and "
                f"{oracle_steps}"
            )
        self.side = int(side)
        self.dim = self.side * self.side
        self.epsilon = float(epsilon)
        self.marginal_norm = marginal_norm
        self.oracle_tol = float(oracle_tol)
        self.oracle_steps = int(oracle_steps)

    def extra_repr(self) -> str:
        return (f"side={self.side}, epsilon={self.epsilon}, marginal_norm={self.marginal_norm!r}, "
                f"oracle_tol={self.oracle_tol}, oracle_steps={self.oracle_steps}")

    # --- the pieces --------------------------------------------------------------------------------------------

    def histograms(self, x: Context) -> tuple[Tensor, Tensor]:
        """``(a, b)``, each ``B x n``, of checked contexts ``B x 2 x n``."""
        check_histograms(x, self.side, type(self).__name__)
        return x[:, 0], x[:, 1]

    def soft_min(self, h: Tensor) -> Tensor:
        """``out_j = log Σ_i exp(h_i − C_ij / ε)`` for ``B x n`` log-weights ``h`` (−∞ allowed): ``B x n``.

        Computed along one grid axis, then the other (C is the sum of the two axes' squared distances)."""
        batch, side = h.shape[0], self.side
        scaled = _axis_cost(side, h.dtype, h.device) / self.epsilon  # side x side, symmetric
        grid = h.reshape(batch, side, side)  # b, i1, i2
        inner = torch.logsumexp(grid.unsqueeze(-1) - scaled, dim=2)  # b, i1, j2
        outer = torch.logsumexp(inner.unsqueeze(2) - scaled[None, :, :, None], dim=1)  # b, j1, j2
        return outer.reshape(batch, side * side)

    def other_potential(self, f: Tensor, a: Tensor) -> Tensor:
        """The closed-form potential ``g(f)_j = −ε log Σ_i a_i exp((f_i − C_ij)/ε)`` (one Sinkhorn half-step),
        ``B x n``: the g that maximises the dual for this f, so that P's columns sum exactly to b. The same map gives
        f from g and b."""
        return -self.epsilon * self.soft_min(torch.log(a) + f / self.epsilon)

    def row_marginal(self, f: Tensor, g: Tensor, b: Tensor) -> Tensor:
        """``P1`` divided by a: ``exp(f_i/ε) Σ_j b_j exp((g_j − C_ij)/ε)``, ``B x n`` (multiply by a for P1)."""
        return torch.exp(f / self.epsilon + self.soft_min(torch.log(b) + g / self.epsilon))

    def marginal_error(self, f: Tensor, x: Context, norm: Optional[MarginalNorm] = None) -> Tensor:
        """``‖P(f)1 − a‖`` with g = g(f) (columns exact), in ``norm`` (default :attr:`marginal_norm`): ``B``."""
        a, b = self.histograms(x)
        g = self.other_potential(f, a)
        error = a * (self.row_marginal(f, g, b) - 1.0)
        return error.abs().sum(-1) if (norm or self.marginal_norm) == "l1" else error.norm(dim=-1)

    def plan(self, f: Tensor, x: Context) -> Tensor:
        """The plan ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)`` with g = g(f): ``B x n x n`` (dense; for checks)."""
        a, b = self.histograms(x)
        g = self.other_potential(f, a)
        cost = grid_cost(self.side, f.dtype, f.device)
        return a[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - cost) / self.epsilon)

    def transport_cost(self, f: Tensor, x: Context) -> Tensor:
        """The transport cost ``⟨P, C⟩`` of the plan of f (g = g(f)), ``B`` (what POT's ``ot.sinkhorn2`` returns).

        Never builds the plan: C = D ⊕ D is the sum of one squared distance D per grid axis, so ⟨P, C⟩ splits into
        two sums, each a separable log-sum-exp with the kernel exp(−D/ε) on one axis and D·exp(−D/ε) on the other.
        """
        a, b = self.histograms(x)
        g = self.other_potential(f, a)
        axis = _axis_cost(self.side, f.dtype, f.device)
        kernel = -axis / self.epsilon  # log exp(−D/ε)
        weighted = kernel + torch.log(axis)  # log (D exp(−D/ε)); −∞ on the diagonal
        rows, columns = torch.log(a) + f / self.epsilon, torch.log(b) + g / self.epsilon
        total = torch.zeros_like(f[:, 0])
        for first, second in ((weighted, kernel), (kernel, weighted)):
            total = total + torch.exp(torch.logsumexp(columns + _separable_logsumexp(rows, first, second), dim=-1))
        return total

    # --- the Objective hooks -----------------------------------------------------------------------------------

    def value(self, y: Tensor, x: Context) -> Tensor:
        """F(f; a, b) = −⟨f, a⟩ − ⟨g(f), b⟩, ``B`` (minimised; −F is the entropic OT value at the optimum)."""
        a, b = self.histograms(x)
        g = self.other_potential(y, a)
        return -(y * a).sum(-1) - (g * b).sum(-1)

    def residual(self, y: Tensor, x: Context) -> Tensor:
        """The marginal error ``‖P(f)1 − a‖`` (:attr:`marginal_norm`), ``B``: zero exactly at an optimal f."""
        return self.marginal_error(y, x)

    def distance(self, y: Tensor, y_ref: Tensor) -> Tensor:
        """``‖(f − f_ref) − mean(f − f_ref)‖``, ``B``: potentials are equal up to a constant."""
        difference = y - y_ref
        return (difference - difference.mean(-1, keepdim=True)).norm(dim=-1)

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """The oracle: log-domain Sinkhorn to a marginal error of :attr:`oracle_tol`; ``B x n`` potentials f.

        From zero (``init`` ``None``) it runs with ε-scaling
        (:class:`~lightning_amor.apps.sinkhorn.EpsilonScalingSinkhorn`: stages at ε = 1, 1/2, 1/4, … before this
        objective's ε), which reaches the same tolerance in far fewer iterations at small ε.

        Raises:
            RuntimeError: some problems did not reach ``oracle_tol`` within ``oracle_steps`` iterations.
        """
        from lightning_amor.apps.sinkhorn import EpsilonScalingSinkhorn

        result = EpsilonScalingSinkhorn(steps=self.oracle_steps, tol=self.oracle_tol).solve(self, x, init)
        if not bool(result.converged.all()):
            bad = (~result.converged).nonzero().flatten().tolist()
            raise RuntimeError(
                f"EntropicOT.solve: Sinkhorn did not reach a marginal error of {self.oracle_tol:g} within "
                f"{self.oracle_steps} iterations on rows {bad[:10]} (reasons: "
                f"{sorted(set(result.reasons()[i] for i in bad))}); raise oracle_steps or oracle_tol, solve in "
                f"float64, or raise epsilon"
            )
        return result.y


def gaussian_potential(x: Tensor, side: int) -> Tensor:
    """The warm start of Thornton & Cuturi (2022): the Kantorovich potential f between Gaussian approximations of a
    and b, ``B x n`` for ``B x 2 x n`` histogram pairs; a simple, training-free baseline.

    With means m and covariances Σ of the pixel coordinates under a and under b, the optimal map between the two
    Gaussians is T(p) = m_b + A(p − m_a), A = Σ_a^{-1/2} (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2} Σ_a^{-1/2}, and for the cost
    ‖p − q‖² the potential is f(p) = ‖p‖² − (p − m_a)ᵀ A (p − m_a) − 2 m_bᵀ p (up to a constant; at ε → 0 the
    potentials of this module's dual are Kantorovich potentials).
    """
    check_histograms(x, side, "gaussian_potential")
    t = grid_axis(side, x.dtype, x.device)
    rows, cols = torch.meshgrid(t, t, indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # n x 2
    a, b = x[:, 0], x[:, 1]
    ridge = 1e-9 * torch.eye(2, dtype=x.dtype, device=x.device)

    def moments(h: Tensor) -> tuple[Tensor, Tensor]:
        mean = h @ points  # B x 2
        centred = points[None] - mean[:, None]  # B x n x 2
        return mean, torch.einsum("bn,bni,bnj->bij", h, centred, centred) + ridge

    def power(matrix: Tensor, exponent: float) -> Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag_embed(values.clamp_min(1e-12) ** exponent) @ vectors.transpose(-1, -2)

    mean_a, cov_a = moments(a)
    mean_b, cov_b = moments(b)
    root_a, inverse_root_a = power(cov_a, 0.5), power(cov_a, -0.5)
    slope = inverse_root_a @ power(root_a @ cov_b @ root_a, 0.5) @ inverse_root_a  # B x 2 x 2
    centred = points[None] - mean_a[:, None]
    quadratic = torch.einsum("bni,bij,bnj->bn", centred, slope, centred)
    return points.pow(2).sum(-1)[None] - quadratic - 2.0 * (mean_b @ points.T)


def _separable_logsumexp(h: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``out_j = log Σ_i exp(h_i + first[i1, j1] + second[i2, j2])`` for ``B x n`` log-weights ``h`` on a
    ``side x side`` grid (``i = (i1, i2)`` row-major) and ``side x side`` log-kernels: ``B x n``."""
    batch, side = h.shape[0], first.shape[0]
    grid = h.reshape(batch, side, side)  # b, i1, i2
    inner = torch.logsumexp(grid.unsqueeze(-1) + second, dim=2)  # b, i1, j2
    outer = torch.logsumexp(inner.unsqueeze(2) + first[None, :, :, None], dim=1)  # b, j1, j2
    return outer.reshape(batch, side * side)


def _axis_cost(side: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None) -> Tensor:
    t = grid_axis(side, dtype, device)
    return (t[:, None] - t[None, :]).pow(2)


def entropic_objective(objective: Objective, who: str) -> EntropicOT:
    """``objective`` as an :class:`EntropicOT`, or a ``TypeError`` naming ``who`` needs one."""
    if not isinstance(objective, EntropicOT):
        raise TypeError(f"{who} works on an EntropicOT objective, got {type(objective).__name__}")
    return objective


class PotentialMLP(nn.Module):
    """Meta OT's model: an MLP from a pair of histograms ``B x 2 x n`` to a potential f, ``B x n``.

    The histograms are multiplied by n before the MLP, so that a uniform histogram reads as ones whatever the grid.

    Args:
        side: the grid's side (``n = side²``).
        hidden: the widths of the hidden layers.
        activation: as :class:`~lightning_amor.nets.MLP`.
        zero_init: start the output layer at zero, so that the untrained model predicts f = 0 (the cold start) and
            training moves on from there; at small ε a random output layer starts far worse than zero.
    """

    def __init__(self, side: int = 8, hidden: Sequence[int] = (512, 512), activation: str = "elu",
                 zero_init: bool = False) -> None:
        super().__init__()
        self.n = int(side) * int(side)
        self.mlp = MLP(2 * self.n, self.n, hidden=hidden, activation=activation)
        if zero_init:
            last = self.mlp.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``B x 2 x n`` histograms -> ``B x n`` potentials."""
        if x.dim() != 3 or x.shape[1:] != (2, self.n):
            raise ValueError(f"PotentialMLP expects B x 2 x {self.n} histogram pairs, got {tuple(x.shape)}")
        return self.mlp(x.flatten(1) * self.n)


class MetaOTModule(AmortizedModule):
    """An :class:`~lightning_amor.module.AmortizedModule` on :class:`EntropicOT` that also logs, at validation and
    test, ``marginal_error`` (the predictions' L1 marginal error, whatever the objective's norm) and
    ``transport_cost`` (⟨P, C⟩ of the predicted plans). Arguments as ``AmortizedModule``."""

    def __init__(self, objective: Objective, amortizer: Amortizer, **kwargs: Any) -> None:
        entropic_objective(objective, "MetaOTModule")
        super().__init__(objective, amortizer, **kwargs)

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """``marginal_error`` (L1) and ``transport_cost`` of the predictions, ``B`` each."""
        objective = entropic_objective(self.objective, "MetaOTModule")
        f = evaluated.y
        return {
            "marginal_error": objective.marginal_error(f, evaluated.x, norm="l1"),
            "transport_cost": objective.transport_cost(f, evaluated.x),
        }
