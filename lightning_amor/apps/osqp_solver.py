"""OSQP on a family of QPs that share P and A: one solver set up once, warm starts, exact iteration counts.

A parametric QP ``min ½ zᵀPz + qᵀz  s.t.  l ≤ Az ≤ u`` whose instances differ only in ``q``, ``l`` and ``u`` is
solved by one ``osqp.OSQP`` object (osqp ≥ 1.0, its own Python API): it factors the KKT matrix once and each
instance is an ``update(q=, l=, u=)`` followed by ``solve()``. This is the strongest cold baseline: the step size
ρ that OSQP adapted on the previous instance is carried over (``reset_rho=True`` restores the initial ρ before a
solve). A cold start sets the warm start to ``x = 0, y = 0`` explicitly; a warm start passes a primal ``x`` and a
dual ``y`` (OSQP sets its split variable to ``Ax``). ``check_termination=1`` tests convergence at every iteration, so
iteration counts are exact, not multiples of OSQP's default 25.

Bad data is refused before OSQP sees it, with one message that says what is wrong: non-finite or misshapen
matrices, a non-symmetric or indefinite P (the problem is not convex), NaN in q, l or u, and l > u. An instance that
OSQP finds primal (or dual) infeasible raises :class:`QPInfeasibleError` naming the instance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import osqp
import scipy.sparse as sp

__all__ = ["OSQPBatch", "OSQPSession", "QPDataError", "QPInfeasibleError", "check_bounds", "check_qp_matrices"]

_SOLVED = osqp.SolverStatus.OSQP_SOLVED
_INACCURATE = osqp.SolverStatus.OSQP_SOLVED_INACCURATE
_MAX_ITER = osqp.SolverStatus.OSQP_MAX_ITER_REACHED
_INFEASIBLE = {
    osqp.SolverStatus.OSQP_PRIMAL_INFEASIBLE: "primal infeasible (no z satisfies l ≤ Az ≤ u)",
    osqp.SolverStatus.OSQP_PRIMAL_INFEASIBLE_INACCURATE: "primal infeasible (no z satisfies l ≤ Az ≤ u)",
    osqp.SolverStatus.OSQP_DUAL_INFEASIBLE: "dual infeasible (the objective is unbounded below on the feasible set)",
    osqp.SolverStatus.OSQP_DUAL_INFEASIBLE_INACCURATE: "dual infeasible (the objective is unbounded below on the "
                                                       "feasible set)",
    osqp.SolverStatus.OSQP_NON_CVX: "non-convex (P is not positive semidefinite)",
}


class QPDataError(ValueError):
    """QP data that OSQP must not be given: NaN or infinite numbers, wrong shapes, an indefinite P, or l > u."""


class QPInfeasibleError(ValueError):
    """OSQP proved an instance infeasible (or unbounded): there is no solution to return."""


def check_qp_matrices(P: np.ndarray, A: np.ndarray, who: str = "QP") -> None:
    """Refuse a P (``n x n``) and A (``m x n``) that do not make a convex QP.

    Raises:
        QPDataError: wrong shapes, non-finite entries, P not symmetric, or P not positive semidefinite (the
            smallest eigenvalue is named).
    """
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise QPDataError(f"{who}: P must be a square n x n matrix, got shape {P.shape}")
    if A.ndim != 2 or A.shape[1] != P.shape[0]:
        raise QPDataError(f"{who}: A must be m x n with n = {P.shape[0]} columns (the size of P), got shape {A.shape}")
    for name, matrix in (("P", P), ("A", A)):
        if not np.isfinite(matrix).all():
            raise QPDataError(f"{who}: {name} holds NaN or infinite entries; every entry of P and A must be finite")
    scale = max(1.0, float(np.abs(P).max()))
    if not np.allclose(P, P.T, rtol=0.0, atol=1e-10 * scale):
        raise QPDataError(f"{who}: P must be symmetric (the QP is ½ zᵀPz + qᵀz); pass (P + Pᵀ)/2")
    smallest = float(np.linalg.eigvalsh(P).min())
    if smallest < -1e-9 * scale:
        raise QPDataError(
            f"{who}: P is not positive semidefinite (smallest eigenvalue {smallest:.3g}), so the QP is not convex and "
            f"OSQP cannot solve it; make P PSD (e.g. add a multiple of the identity, or use a covariance matrix)"
        )


def check_bounds(q: np.ndarray, lower: np.ndarray, upper: np.ndarray, names: Optional[Sequence[str]] = None,
                 who: str = "QP") -> None:
    """Refuse a batch of instances ``q`` (``N x n``), ``lower`` and ``upper`` (l, u: ``N x m``) with NaN, infinite q,
    or l > u.

    ``l`` may hold −inf and ``u`` +inf (a one-sided or free row). ``names`` name the instances in the message
    (default: ``instance i``).

    Raises:
        QPDataError: naming the first offending instances and rows.
    """
    label = (lambda i: names[i]) if names is not None else (lambda i: f"instance {i}")
    for name, array in (("q", q), ("l", lower), ("u", upper)):
        bad = np.isnan(array).any(-1)
        if bad.any():
            shown = ", ".join(label(int(i)) for i in np.flatnonzero(bad)[:5])
            raise QPDataError(f"{who}: the parameters of {shown} make {name} NaN; every q, l and u must be a number "
                              f"(l may be -inf and u +inf for one-sided rows)")
    if not np.isfinite(q).all():
        shown = ", ".join(label(int(i)) for i in np.flatnonzero(~np.isfinite(q).all(-1))[:5])
        raise QPDataError(f"{who}: the parameters of {shown} make q infinite; q must be finite")
    crossed = lower > upper
    if crossed.any():
        first = int(np.flatnonzero(crossed.any(-1))[0])
        rows = np.flatnonzero(crossed[first])[:5].tolist()
        raise QPDataError(
            f"{who}: the parameters of {label(first)} are infeasible: lower bound l > upper bound u in constraint rows "
            f"{rows} (e.g. l = {lower[first, rows[0]]:.4g} > u = {upper[first, rows[0]]:.4g}); "
            f"{int(crossed.any(-1).sum())} instance(s) affected. Every row needs l ≤ u"
        )


@dataclass
class OSQPBatch:
    """OSQP's answers for ``N`` instances of a family with ``n`` variables and ``m`` constraints.

    Attributes:
        x: ``N x n`` primal solutions.
        y: ``N x m`` dual solutions (OSQP's sign convention: y > 0 at an active upper bound, < 0 at a lower).
        iterations: ``N`` ADMM iterations.
        status: ``N`` OSQP status strings (``solved``, ``maximum iterations reached``, ...).
        solved: ``N`` bool, OSQP reported ``solved`` (to its tolerance).
        prim_res: ``N`` OSQP's own primal residuals ‖Az − z̃‖∞.
        dual_res: ``N`` OSQP's own dual residuals ‖Pz + q + Aᵀy‖∞.
        seconds: ``N`` wall times of ``solve()`` (the warm start and the update not included).
    """

    x: np.ndarray
    y: np.ndarray
    iterations: np.ndarray
    status: list[str]
    solved: np.ndarray
    prim_res: np.ndarray
    dual_res: np.ndarray
    seconds: np.ndarray


class OSQPSession:
    """One OSQP solver for a QP family with fixed P (``n x n``) and A (``m x n``); instances differ in q, l, u.

    Args:
        P: the symmetric PSD quadratic term (dense; its upper triangle is passed to OSQP as CSC).
        A: the constraint matrix (dense; passed as CSC).
        eps: OSQP's ``eps_abs`` and ``eps_rel``.
        max_iter: OSQP's iteration limit.
        polishing: OSQP's solution polishing (an active-set refinement; reference solutions use it).
        fresh: set up a new solver for every instance (the "fresh solver" baseline: OSQP's initial ρ every time, no
            reuse of anything) instead of updating one.
        who: the family's name in error messages.
        **settings: any other OSQP setting (``rho``, ``adaptive_rho``, ...).
    """

    def __init__(self, P: np.ndarray, A: np.ndarray, eps: float = 1e-4, max_iter: int = 100_000,
                 polishing: bool = False, fresh: bool = False, who: str = "QP", **settings) -> None:
        P, A = np.asarray(P, dtype=np.float64), np.asarray(A, dtype=np.float64)
        check_qp_matrices(P, A, who)
        if not eps > 0:
            raise QPDataError(f"{who}: eps must be positive, got {eps}")
        self.n, self.m, self.who, self.fresh = P.shape[0], A.shape[0], who, fresh
        self._P, self._A = sp.csc_matrix(np.triu(P)), sp.csc_matrix(A)
        self.settings = dict(eps_abs=eps, eps_rel=eps, max_iter=max_iter, polishing=polishing, check_termination=1,
                             verbose=False, **settings)
        self._solver: Optional[osqp.OSQP] = None

    def _setup(self, q: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> osqp.OSQP:
        solver = osqp.OSQP()
        solver.setup(self._P, q, self._A, lower, upper, **self.settings)
        return solver

    def solve(self, q: np.ndarray, lower: np.ndarray, upper: np.ndarray, x0: Optional[np.ndarray] = None,
              y0: Optional[np.ndarray] = None, reset_rho: bool = False,
              names: Optional[Sequence[str]] = None, callback=None) -> OSQPBatch:
        """Solve ``N`` instances (``q``: ``N x n``; ``lower``, ``upper``, i.e. l and u: ``N x m``) one after the other.

        Args:
            x0, y0: ``N x n`` and ``N x m`` warm starts (``None``: cold, x = 0 and y = 0).
            reset_rho: ask the reused solver for its initial ρ again before each solve (``update_settings(rho=)``;
                otherwise it carries the ρ it adapted on the previous instance). This is close to, not identical
                with, a fresh solver.
            names: the instances' names for error messages (default ``instance i``).
            callback: ``callback(i, k, x, y)`` with instance i's iterate after k = 1 … iterations, computed by
                replaying the solve with ``max_iter = k`` from the same start on a fresh solver (exact with
                ``fresh=True``, and quadratic in the iteration count: for evaluation plots of short runs only).

        Raises:
            QPDataError: NaN parameters or l > u (naming the instance).
            QPInfeasibleError: OSQP proved an instance primal or dual infeasible (naming it).
        """
        q, lower, upper = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (q, lower, upper))
        count = q.shape[0]
        if callback is not None and not self.fresh:
            raise ValueError(f"{self.who}: iterates can only be replayed exactly by a fresh solver per instance (a "
                             f"reused one carries the ρ it adapted); use OSQPSession(..., fresh=True)")
        if q.shape != (count, self.n) or lower.shape != (count, self.m) or upper.shape != (count, self.m):
            raise QPDataError(f"{self.who}: expected q of shape (N, {self.n}) and l, u of shape (N, {self.m}), got "
                              f"{q.shape}, {lower.shape} and {upper.shape}")
        check_bounds(q, lower, upper, names, self.who)
        for name, start, width in (("x0", x0, self.n), ("y0", y0, self.m)):
            if start is not None and (np.shape(start) != (count, width) or not np.isfinite(start).all()):
                raise QPDataError(f"{self.who}: the warm start {name} must be a finite ({count}, {width}) array, got "
                                  f"shape {np.shape(start)}")
        out_x, out_y = np.zeros((count, self.n)), np.zeros((count, self.m))
        iterations, seconds = np.zeros(count, dtype=np.int64), np.zeros(count)
        prim, dual, solved, status = np.zeros(count), np.zeros(count), np.zeros(count, dtype=bool), []
        rho0 = self.settings.get("rho", 0.1)
        for i in range(count):
            if self.fresh or self._solver is None:
                self._solver = self._setup(q[i], lower[i], upper[i])
            else:
                self._solver.update(q=q[i], l=lower[i], u=upper[i])
            if reset_rho and not self.fresh:
                self._solver.update_settings(rho=rho0)
            start_x = np.zeros(self.n) if x0 is None else x0[i]
            start_y = np.zeros(self.m) if y0 is None else y0[i]
            self._solver.warm_start(x=start_x, y=start_y)
            begin = time.perf_counter()
            result = self._solver.solve(raise_error=False)
            seconds[i] = time.perf_counter() - begin
            value = result.info.status_val
            name = names[i] if names is not None else f"instance {i}"
            if value in _INFEASIBLE:
                raise QPInfeasibleError(
                    f"{self.who}: OSQP finds {name} {_INFEASIBLE[value]}; check its parameters (and that the family's "
                    f"constraints can hold together), or leave it out"
                )
            out_x[i], out_y[i] = result.x, result.y
            iterations[i], prim[i], dual[i] = result.info.iter, result.info.prim_res, result.info.dual_res
            solved[i] = value == _SOLVED
            status.append(result.info.status)
            if callback is not None:
                self._replay(i, q[i], lower[i], upper[i], start_x, start_y, int(result.info.iter), callback)
        return OSQPBatch(out_x, out_y, iterations, status, solved, prim, dual, seconds)

    def _replay(self, i: int, q: np.ndarray, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray,
                y0: np.ndarray, iterations: int, callback) -> None:
        """Call ``callback(i, k, x_k, y_k)`` for k = 1 … ``iterations`` by solving afresh with ``max_iter = k``."""
        for k in range(1, iterations + 1):
            solver = osqp.OSQP()
            solver.setup(self._P, q, self._A, lower, upper, **{**self.settings, "max_iter": k})
            solver.warm_start(x=x0, y=y0)
            result = solver.solve(raise_error=False)
            callback(i, k, result.x, result.y)
