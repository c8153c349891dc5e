"""Parametric convex QPs (tutorial §3, convex optimization): amortize the primal–dual solution, then warm-start OSQP.

A family of quadratic programs shares P and A and differs in its parameters x:

    z*(x) ∈ argmin_z ½ zᵀPz + q(x)ᵀz   s.t.   l(x) ≤ Az ≤ u(x),

with duals λ ∈ R^m (OSQP's convention: λ_i > 0 where the upper bound of row i is active, < 0 at the lower). The
solution the amortizer predicts is the pair ``{"primal": z (n), "dual": λ (m)}`` (a structured solution, see
``docs/extending.md``), because a warm start of OSQP gains nothing from a primal guess alone: its ADMM iterates
need the multipliers too.

- :class:`ParametricQP`: the family's Objective. The value is the QP objective of the primal part; the certificate
  (:meth:`~ParametricQP.residual`) is the KKT residual of the pair, the largest of the primal residual
  ‖Az − Π_[l,u](Az)‖∞, the dual residual ‖Pz + q + Aᵀλ‖∞ (OSQP's two) and the complementarity residual
  ‖Az − Π_[l,u](Az + λ)‖∞, which is zero exactly when Az is feasible and λ lies in the normal cone of [l, u] at Az.
  The oracle is OSQP at a tight tolerance with polishing.
- :class:`PortfolioQP`: the Markowitz portfolio family of the benchmark (a factor covariance, the expected returns
  as the parameter, a budget and position limits); its :meth:`~PortfolioQP.project` is the exact Euclidean
  projection onto the capped simplex, differentiable, so every prediction is feasible.
- :class:`OSQPWarmStart`: a :class:`~lightning_amor.solvers.Solver` that runs OSQP from a prediction (primal and
  dual), so the amortize-then-refine policy (``Fallback``) and ``lightning-amor evaluate`` use OSQP as the solver.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_amor.apps.osqp_solver import OSQPBatch, OSQPSession, QPDataError, check_bounds
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective
from lightning_amor.solvers import Callback, Solver, SolverResult

__all__ = ["OSQPWarmStart", "ParametricQP", "PortfolioMLP", "PortfolioQP", "capped_simplex_projection",
           "portfolio_family", "sample_portfolio_returns"]


class ParametricQP(Objective):
    """A family ``min ½ zᵀPz + q(x)ᵀz s.t. l(x) ≤ Az ≤ u(x)`` with fixed P (``n x n``, PSD) and A (``m x n``).

    Solutions are ``{"primal": B x n, "dual": B x m}`` (flat: ``B x (n + m)``, primal first). Subclasses implement
    :meth:`linear` (q) and :meth:`bounds` (l, u) from the contexts, and may override :meth:`project`.

    Args:
        P: the quadratic term, symmetric positive semidefinite.
        A: the constraint matrix.
        reference_eps: OSQP's tolerance for the oracle's reference solutions (polished).
    """

    def __init__(self, P: Tensor, A: Tensor, reference_eps: float = 1e-7) -> None:
        super().__init__()
        P64, A64 = torch.as_tensor(P, dtype=torch.float64), torch.as_tensor(A, dtype=torch.float64)
        self._reference = OSQPSession(P64.numpy(), A64.numpy(), eps=reference_eps, polishing=True,
                                      who=type(self).__name__)  # refuses a non-convex P here
        self.register_buffer("P", P64)  # float64, as OSQP sees them; value() casts to the solutions' dtype
        self.register_buffer("A", A64)
        self.n, self.m = P64.shape[0], A64.shape[0]
        self.reference_eps = reference_eps
        self.set_structure({"primal": (self.n,), "dual": (self.m,)})

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reference"] = None  # OSQP's C solver does not pickle; it is rebuilt on demand
        return state

    def reference_session(self) -> OSQPSession:
        """The OSQP session of the oracle (tight tolerance, polishing), set up once."""
        if self._reference is None:
            self._reference = OSQPSession(self.P.double().cpu().numpy(), self.A.double().cpu().numpy(),
                                          eps=self.reference_eps, polishing=True, who=type(self).__name__)
        return self._reference

    def linear(self, x: Context) -> Tensor:
        """q(x): ``B x n``. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement linear(x) returning q(x), B x {self.n}")

    def bounds(self, x: Context) -> tuple[Tensor, Tensor]:
        """(l(x), u(x)): each ``B x m``. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement bounds(x) returning l(x), u(x), B x {self.m}")

    def split(self, y) -> tuple[Tensor, Tensor]:
        """(primal ``B x n``, dual ``B x m``) of a structured or flat batch of solutions."""
        if isinstance(y, Tensor):
            return y[:, : self.n], y[:, self.n :]
        return y["primal"], y["dual"]

    def value(self, y, x: Context) -> Tensor:
        """½ zᵀPz + q(x)ᵀz of the primal part: ``B``."""
        z, _ = self.split(y)
        return 0.5 * ((z @ self.P.to(z.dtype)) * z).sum(-1) + (self.linear(x).to(z.dtype) * z).sum(-1)

    def violation(self, y, x: Context) -> Tensor:
        """The largest constraint violation max(l − Az, Az − u, 0) of the primal part: ``B``."""
        z, _ = self.split(y)
        lower, upper = self.bounds(x)
        az = z @ self.A.to(z.dtype).T
        return torch.maximum(lower.to(z.dtype) - az, az - upper.to(z.dtype)).clamp_min(0).amax(-1)

    def kkt_residuals(self, y, x: Context) -> dict[str, Tensor]:
        """The KKT residuals of primal–dual pairs, each ``B`` (∞-norms).

        ``primal``: ‖Az − Π_[l,u](Az)‖∞ (OSQP's primal residual at a polished or exact point); ``dual``:
        ‖Pz + q + Aᵀλ‖∞ (OSQP's dual residual); ``complementarity``: ‖Az − Π_[l,u](Az + λ)‖∞, zero exactly when Az is
        feasible and λ is a valid multiplier there (λ_i ≥ 0 only at an active upper bound, ≤ 0 only at a lower).
        """
        z, lam = self.split(y)
        lower, upper = (b.to(z.dtype) for b in self.bounds(x))
        a = self.A.to(z.dtype)
        az = z @ a.T
        primal = (az - torch.minimum(torch.maximum(az, lower), upper)).abs().amax(-1)
        dual = (z @ self.P.to(z.dtype) + self.linear(x).to(z.dtype) + lam @ a).abs().amax(-1)
        shifted = az + lam
        comp = (az - torch.minimum(torch.maximum(shifted, lower), upper)).abs().amax(-1)
        return {"primal": primal, "dual": dual, "complementarity": comp}

    def residual(self, y, x: Context) -> Tensor:
        """The certificate: the largest of the three :meth:`kkt_residuals`, ``B``; zero exactly at a primal–dual
        solution of the QP."""
        parts = self.kkt_residuals(y, x)
        return torch.stack(list(parts.values())).amax(0)

    def qp_data(self, x: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, l, u) of every context as float64 arrays (``B x n``, ``B x m``, ``B x m``), checked.

        Raises:
            QPDataError: a context gives NaN (or infinite q), or l > u; the message names the context.
        """
        with torch.no_grad():
            q = self.linear(x).detach().double().cpu().numpy()
            lower, upper = (b.detach().double().cpu().numpy() for b in self.bounds(x))
        check_bounds(q, lower, upper, [f"context {i}" for i in range(q.shape[0])], type(self).__name__)
        return q, lower, upper

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """Reference solutions by OSQP at ``reference_eps`` with polishing: flat ``B x (n + m)`` (primal, dual), in
        the dtype of the contexts. Started from ``init`` (primal and dual) when given.

        Raises:
            QPDataError: NaN parameters or l > u (naming the context).
            QPInfeasibleError: OSQP proves a context infeasible (naming it).
        """
        q, lower, upper = self.qp_data(x)
        x0 = y0 = None
        if init is not None:
            start = self.flatten(init).detach().double().cpu().numpy()
            x0, y0 = start[:, : self.n], start[:, self.n :]
        names = [f"context {i}" for i in range(q.shape[0])]
        out = self.reference_session().solve(q, lower, upper, x0, y0, names=names)
        like = x if isinstance(x, Tensor) else next(iter(x.values()))
        dtype = like.dtype if like.is_floating_point() else self.P.dtype
        # the domain's projection removes the polished solution's rounding off the bounds (a change of ~1e-15)
        y = self.project_flat(torch.from_numpy(np.concatenate([out.x, out.y], axis=1)))
        return y.to(device=like.device, dtype=dtype)


def capped_simplex_projection(v: Tensor, cap: float, total: float = 1.0) -> Tensor:
    """The Euclidean projection of each row of ``v`` (``B x n``) onto {w : Σw = total, 0 ≤ w ≤ cap}: ``B x n``.

    The projection is ``clamp(v − τ, 0, cap)`` for the scalar τ that meets the budget; τ is found from the sorted
    breakpoints (O(n log n), no iteration), then recomputed from the coordinates strictly inside (0, cap) so that
    the result meets the budget to rounding and is differentiable (almost everywhere) in ``v``.

    Raises:
        ValueError: the set is empty (n · cap < total), or ``v`` holds NaN.
    """
    n = v.shape[-1]
    if n * cap < total - 1e-12 or cap <= 0 or total < 0:
        raise ValueError(f"capped_simplex_projection: no w has Σw = {total} with 0 ≤ w ≤ {cap} in {n} coordinates "
                         f"(needs n · cap ≥ total); raise the cap or the number of assets")
    if torch.isnan(v).any():
        raise ValueError("capped_simplex_projection: the points to project hold NaN")
    with torch.no_grad():
        # g(τ) = Σ clamp(v − τ, 0, cap) is piecewise linear and non-increasing, with breakpoints v_i (a coordinate
        # turns positive below it) and v_i − cap (it reaches the cap): walk the sorted breakpoints downwards,
        # accumulating g, and solve g(τ) = total on the segment where it crosses
        w = v.detach().double()
        points = torch.cat([w, w - cap], dim=-1)
        signs = torch.cat([torch.ones_like(w), -torch.ones_like(w)], dim=-1)
        points, order = points.sort(dim=-1, descending=True)
        slope = signs.gather(-1, order).cumsum(-1)  # free coordinates just below each breakpoint
        rises = slope[:, :-1] * (points[:, :-1] - points[:, 1:])
        g = torch.cat([torch.zeros_like(w[:, :1]), rises.cumsum(-1)], dim=-1)  # g at each breakpoint
        segment = ((g < total).sum(-1, keepdim=True) - 1).clamp(0, points.shape[-1] - 2)
        start, rise = points.gather(-1, segment), slope.gather(-1, segment).clamp_min(1)
        tau0 = (start - (total - g.gather(-1, segment)) / rise).squeeze(-1)
        shifted = w - tau0[:, None]
        # a coordinate within rounding of a bound counts as on it (zero derivative), so that a point on a face of
        # the set has the Jacobian of that face
        slack = 1e-12 * max(1.0, cap)
        free = (shifted > slack) & (shifted < cap - slack)
        at_cap = shifted >= cap - slack
    n_free = free.sum(-1).to(v.dtype)
    exact = ((v * free).sum(-1) - (total - cap * at_cap.sum(-1).to(v.dtype))) / n_free.clamp_min(1)
    tau = torch.where(n_free > 0, exact, tau0.to(v.dtype))
    bound = torch.where(at_cap, torch.full_like(v, cap), torch.zeros_like(v))
    out = torch.where(free, (v - tau[:, None]).clamp(0, cap), bound)
    # v − τ loses digits when v is large (1e6): put the budget's rounding error back on the free coordinates
    excess = (total - out.sum(-1)) / n_free.clamp_min(1)
    return torch.where(free, out + excess[:, None], out)


def portfolio_family(assets: int, factors: int, seed: int = 0) -> dict[str, Tensor]:
    """The fixed part of a portfolio family, float64: factor loadings F (``n x k``, half of them zero), idiosyncratic
    variances d (``n``), the base expected returns μ̄ (``n``) and the return loadings of the forecast's factors
    (``n x k``).

    Σ = F Fᵀ + diag(d) is the covariance of asset returns (the factor model of OSQP's portfolio benchmark); the
    expected-return forecasts of the contexts are μ = μ̄ + B s + ε, with factor views s (``k``) and idiosyncratic
    noise ε, see ``datamodules.convex_qp.PortfolioReturns``.
    """
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(assets, factors, generator=generator, dtype=torch.float64) < 0.5
    loadings = torch.randn(assets, factors, generator=generator, dtype=torch.float64) * mask / factors**0.5
    idiosyncratic = 0.1 * factors**0.5 * torch.rand(assets, generator=generator, dtype=torch.float64)
    mean = 0.1 * torch.randn(assets, generator=generator, dtype=torch.float64)
    views = torch.randn(assets, factors, generator=generator, dtype=torch.float64) / factors**0.5
    return {"loadings": loadings, "idiosyncratic": idiosyncratic, "mean": mean, "views": views}


class PortfolioQP(ParametricQP):
    """Markowitz portfolios: max μᵀw − (γ/2) wᵀΣw over long-only weights with a budget and position limits, with
    the factor covariance Σ = F Fᵀ + diag(d) of :func:`portfolio_family` and the expected returns μ (``B x n``) as the
    context. As in OSQP's own portfolio benchmark, the factor exposures t = Fᵀw are variables, which keeps P and A
    sparse (OSQP's cost per iteration grows with n k, not n²):

        min_{w, t} ½ γ (wᵀ diag(d) w + tᵀt) − μᵀw   s.t.   1ᵀw = 1,   0 ≤ w ≤ w_max,   Fᵀw − t = 0.

    The primal part is z = (w, t) (``n + k``); A has ``m = 1 + n + k`` rows: the budget, one bound per asset, one
    exposure per factor. The domain projection is a correction step: w onto the capped simplex (the exact Euclidean
    projection, differentiable), then t = Fᵀw, so every projected prediction is feasible; the duals are left as
    they are (all free in sign here: the budget and the exposures are equalities, each asset row has two bounds).

    Args:
        assets: n.
        factors: k, the factors of the covariance.
        risk_aversion: γ.
        max_weight: w_max; the budget needs n · w_max ≥ 1.
        seed: the seed of :func:`portfolio_family` (use the data module's ``family_seed``).
        reference_eps: OSQP's tolerance for reference solutions.
    """

    def __init__(self, assets: int = 50, factors: int = 5, risk_aversion: float = 1.0, max_weight: float = 0.2,
                 seed: int = 0, reference_eps: float = 1e-7) -> None:
        if assets < 1 or factors < 1:
            raise ValueError(f"PortfolioQP: assets and factors must be at least 1, got {assets} and {factors}")
        if not risk_aversion > 0:
            raise ValueError(f"PortfolioQP: risk_aversion must be positive (else the QP is not strictly convex), got "
                             f"{risk_aversion}")
        if not 0 < max_weight <= 1 or assets * max_weight < 1:
            raise ValueError(
                f"PortfolioQP: max_weight={max_weight} with {assets} assets is infeasible: the budget Σw = 1 needs "
                f"0 < max_weight ≤ 1 and assets · max_weight ≥ 1"
            )
        family = portfolio_family(assets, factors, seed)
        n, k = assets, factors
        quadratic = risk_aversion * torch.diag(torch.cat([family["idiosyncratic"], torch.ones(k, dtype=torch.float64)]))
        constraints = torch.zeros(1 + n + k, n + k, dtype=torch.float64)
        constraints[0, :n] = 1.0
        constraints[1 : 1 + n, :n] = torch.eye(n, dtype=torch.float64)
        constraints[1 + n :, :n] = family["loadings"].T
        constraints[1 + n :, n:] = -torch.eye(k, dtype=torch.float64)
        super().__init__(quadratic, constraints, reference_eps)
        self.register_buffer("loadings", family["loadings"])
        self.assets, self.factors, self.risk_aversion = assets, factors, risk_aversion
        self.max_weight, self.seed = max_weight, seed

    def extra_repr(self) -> str:
        return (f"assets={self.assets}, factors={self.factors}, risk_aversion={self.risk_aversion}, "
                f"max_weight={self.max_weight}, seed={self.seed}, reference_eps={self.reference_eps}")

    def _returns(self, x: Context) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.assets:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise QPDataError(f"PortfolioQP: contexts are expected returns of shape (B, {self.assets}), got {shape}")
        return x

    def weights(self, y) -> Tensor:
        """The portfolio weights w of structured or flat solutions: ``B x n``."""
        return self.split(y)[0][:, : self.assets]

    def linear(self, x: Context) -> Tensor:
        """q = (−μ, 0): ``B x (n + k)``."""
        mu = self._returns(x)
        return torch.cat([-mu, mu.new_zeros(mu.shape[0], self.factors)], dim=-1)

    def bounds(self, x: Context) -> tuple[Tensor, Tensor]:
        """l = (1, 0, …, 0) and u = (1, w_max, …, w_max, 0, …, 0): each ``B x (1 + n + k)``."""
        mu = self._returns(x)
        lower = torch.zeros(mu.shape[0], self.m, dtype=mu.dtype, device=mu.device)
        lower[:, 0] = 1.0
        upper = lower.clone()
        upper[:, 1 : 1 + self.assets] = self.max_weight
        return lower, upper

    def project(self, y):
        """w onto the capped simplex, t = Fᵀw, duals unchanged; a flat ``B x (n + k + m)`` batch or the structured
        dict in, the same kind out."""
        z, lam = self.split(y)
        w = capped_simplex_projection(z[:, : self.assets], self.max_weight)
        primal = torch.cat([w, w @ self.loadings.to(w.dtype)], dim=-1)
        if isinstance(y, Tensor):
            return torch.cat([primal, lam], dim=-1)
        return {"primal": primal, "dual": lam}

    def feasible(self, y: Tensor, tol: Optional[float] = None) -> Tensor:
        """Whether flat solutions ``B x (n + k + m)`` are feasible to ``tol`` (weights on the capped simplex, the
        exposures equal to Fᵀw): ``B``. The default tolerance follows the dtype's rounding: 1e-9 in float64, 1e-5
        in lower precision (a float32 budget 1ᵀw is off by ~1e-7 after an exact projection)."""
        if tol is None:
            tol = 1e-9 if y.dtype == torch.float64 else 1e-5
        z = y[:, : self.n]
        w, t = z[:, : self.assets], z[:, self.assets :]
        budget = (w.sum(-1) - 1).abs() <= tol * self.assets
        exposures = (w @ self.loadings.to(w.dtype) - t).abs().amax(-1) <= tol * self.assets
        box = (w >= -tol).all(-1) & (w <= self.max_weight + tol).all(-1)
        return budget & exposures & box & torch.isfinite(y).all(-1)


def sample_portfolio_returns(num: int, assets: int, factors: int, family_seed: int, view_scale: float, noise: float,
                             generator: torch.Generator) -> Tensor:
    """``num x n`` expected-return forecasts μ = μ̄ + ``view_scale`` · V s + ``noise`` · ε of the family
    :func:`portfolio_family` (μ̄ its base returns, V its view loadings), s ~ N(0, I_k), ε ~ N(0, I_n); float32."""
    family = portfolio_family(assets, factors, family_seed)
    views = torch.randn(num, factors, generator=generator)
    eps = torch.randn(num, assets, generator=generator)
    return family["mean"].float() + view_scale * views @ family["views"].float().T + noise * eps


@functools.lru_cache(maxsize=8)
def _calibration(assets: int, factors: int, family_seed: int, risk_aversion: float, max_weight: float,
                 view_scale: float, noise: float, samples: int) -> tuple[Tensor, Tensor]:
    """The per-coordinate mean and standard deviation (each ``n + k + m``, float64) of the oracle's solutions of
    ``samples`` forecasts of a portfolio family drawn with a fixed seed. Cached: a deterministic function of its
    arguments, and a process that builds the same network more than once (fit, then test or a checkpoint's reload)
    solves them once."""
    family = PortfolioQP(assets, factors, risk_aversion, max_weight, family_seed)
    forecasts = sample_portfolio_returns(samples, assets, factors, family_seed, view_scale, noise,
                                         torch.Generator().manual_seed(12345))
    solutions = family.solve(forecasts.double())
    return solutions.mean(0), solutions.std(0)


class PortfolioMLP(nn.Module):
    """An MLP for :class:`PortfolioQP` contexts that works in the family's own units: ``B x n`` returns -> ``B x
    (n + k + m)`` primal–dual solutions.

    The input is standardised as (μ − μ̄) / ``view_scale`` (the family's base returns μ̄; forecasts vary by about
    ``view_scale`` around it), and the output is ``centre + scale ⊙ MLP(...)``, with the per-coordinate mean and
    standard deviation (at least ``min_scale``) of the solutions of ``calibration_samples`` forecasts drawn from the
    family with a fixed seed and solved by the oracle at construction. An untrained network thus predicts the mean
    solution. The floor ``min_scale`` keeps coordinates that vary rarely (an asset held in a few per cent of the
    forecasts, or none of the calibration ones) within the network's reach: on the 300-asset family of
    ``benchmarks/convex_qp.py``, 64 calibration forecasts and a floor of 1e-3 left OSQP a median 99 iterations from
    the predictions at eps 1e-4, against 69 with the defaults.

    Args:
        assets: n, the family's assets (as :class:`PortfolioQP`).
        factors: k, the family's factors.
        family_seed: the family's seed (:class:`PortfolioQP`'s ``seed``).
        risk_aversion: the family's γ.
        max_weight: the family's position limit.
        view_scale: the scale of the forecasts' factor views (as ``datamodules.convex_qp.PortfolioReturns``).
        noise: the scale of the forecasts' idiosyncratic noise.
        hidden: the MLP's hidden widths.
        calibration_samples: forecasts solved to set the output's centre and scale.
        min_scale: the smallest output scale.
    """

    def __init__(self, assets: int = 50, factors: int = 5, family_seed: int = 0, risk_aversion: float = 1.0,
                 max_weight: float = 0.2, view_scale: float = 0.05, noise: float = 0.01,
                 hidden: Sequence[int] = (256, 256), calibration_samples: int = 128, min_scale: float = 1e-2) -> None:
        super().__init__()
        if not view_scale > 0 or not min_scale > 0 or calibration_samples < 2:
            raise ValueError(f"PortfolioMLP: view_scale and min_scale must be positive and calibration_samples at "
                             f"least 2, got {view_scale}, {min_scale} and {calibration_samples}")
        centre, spread = _calibration(assets, factors, family_seed, risk_aversion, max_weight, view_scale, noise,
                                      calibration_samples)
        self.register_buffer("input_mean", portfolio_family(assets, factors, family_seed)["mean"].float())
        self.register_buffer("centre", centre.float().clone())
        self.register_buffer("scale", spread.clamp_min(min_scale).float().clone())
        self.view_scale = view_scale
        self.mlp = MLP(assets, centre.shape[0], hidden=hidden)

    def forward(self, x: Tensor) -> Tensor:
        """``B x n`` -> ``B x (n + k + m)``."""
        return self.centre + self.scale * self.mlp((x - self.input_mean) / self.view_scale)


class OSQPWarmStart(Solver):
    """OSQP on a :class:`ParametricQP`, started from the given primal–dual points (cold: x = 0, y = 0).

    Each context is solved by a freshly set-up OSQP (its initial ρ), by default, so that a context's answer and
    iteration count never depend on the other contexts of the batch, as every solver of the framework promises, and
    iterates can be replayed; ``fresh=False`` updates one solver set up for the family instead (the ρ adapted on
    one context carries over to the next: faster, and the strongest cold baseline, which
    ``benchmarks/convex_qp.py`` measures too). A context that OSQP does not solve within ``steps`` iterations is
    reported as not converged; one it proves infeasible raises
    :class:`~lightning_amor.apps.osqp_solver.QPInfeasibleError`. A ``callback`` receives every iterate (replayed
    exactly, see :meth:`~lightning_amor.apps.osqp_solver.OSQPSession.solve`; quadratic in the iteration count, so
    for short evaluations).

    Args:
        eps: OSQP's ``eps_abs`` and ``eps_rel``.
        steps: OSQP's ``max_iter``.
        fresh: a new OSQP solver for every context (see above).
    """

    def __init__(self, eps: float = 1e-4, steps: int = 10_000, fresh: bool = True) -> None:
        if not eps > 0 or steps < 1:
            raise ValueError(f"OSQPWarmStart: eps must be positive and steps at least 1, got {eps} and {steps}")
        self.eps, self.steps, self.fresh = eps, steps, fresh
        self._sessions: dict[tuple, OSQPSession] = {}

    def __repr__(self) -> str:
        return f"OSQPWarmStart(eps={self.eps}, steps={self.steps}, fresh={self.fresh})"

    def __deepcopy__(self, memo: dict) -> OSQPWarmStart:
        return OSQPWarmStart(self.eps, self.steps, self.fresh)  # a copy sets up its own OSQP solver

    def session(self, objective: ParametricQP) -> OSQPSession:
        """The OSQP session for ``objective``'s family (set up on first use)."""
        key = (id(objective), objective.n, objective.m)
        if key not in self._sessions:
            self._sessions = {key: OSQPSession(objective.P.double().cpu().numpy(), objective.A.double().cpu().numpy(),
                                               eps=self.eps, max_iter=self.steps, fresh=self.fresh,
                                               who=type(objective).__name__)}
        session = self._sessions[key]
        session.settings["max_iter"] = self.steps
        if session._solver is not None:
            session._solver.update_settings(max_iter=self.steps)
        return session

    def run(self, objective: ParametricQP, x: Context, init: Optional[Tensor] = None, callback=None) -> OSQPBatch:
        """OSQP's raw answers for contexts ``x`` from ``init`` (flat ``B x (n + m)``; ``None``: cold)."""
        if not isinstance(objective, ParametricQP):
            raise TypeError(f"OSQPWarmStart solves a ParametricQP, got {type(objective).__name__}")
        q, lower, upper = objective.qp_data(x)
        x0 = y0 = None
        if init is not None:
            start = init.detach().double().cpu().numpy()
            x0, y0 = start[:, : objective.n], start[:, objective.n :]
        names = [f"context {i}" for i in range(q.shape[0])]
        return self.session(objective).solve(q, lower, upper, x0, y0, names=names, callback=callback)

    def _solve(self, objective: Objective, x: Context, init: Optional[Tensor],
               callback: Optional[Callback]) -> SolverResult:
        like = objective.initial_point(x)
        start = torch.zeros_like(like) if init is None else init
        replay = None
        if callback is not None:
            iterates: dict[int, list[np.ndarray]] = {}

            def replay(i: int, k: int, xk: np.ndarray, yk: np.ndarray) -> None:
                iterates.setdefault(k, []).append((i, np.concatenate([xk, yk])))

        out = self.run(objective, x, init, replay)
        y = torch.from_numpy(np.concatenate([out.x, out.y], axis=1)).to(like)
        if callback is not None:
            current = start.detach().clone()
            callback(0, current.clone())
            for k in range(1, int(out.iterations.max(initial=0)) + 1):
                for i, row in iterates.get(k, []):
                    current[i] = torch.from_numpy(row).to(like)
                callback(k, current.clone())
        with torch.no_grad():
            value = objective(y, x)
        converged = torch.from_numpy(out.solved)
        stopped = torch.where(converged, 0, 1).to(torch.int64)  # STOP_REASONS: converged, max_steps
        return SolverResult(y=y, value=value.detach(), iterations=torch.from_numpy(out.iterations), converged=converged,
                            stopped=stopped)
