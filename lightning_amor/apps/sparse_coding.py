"""Sparse coding (tutorial ch. 3): the lasso E(y; x) = ½‖x − Dy‖² + α‖y‖₁ over codes y for signals x.

The dictionary D ∈ R^{m×n} (m = ``signal_dim`` < n = ``code_dim``) is the standard synthetic one of the LISTA
literature (Gregor & LeCun 2010; Chen et al. 2018): Gaussian entries, columns scaled to unit norm, drawn once from
``dictionary_seed``. It is a buffer of the objective, so a checkpoint carries it, and the data module
(:class:`datamodules.sparse_coding.SparseSignals`) draws its signals from the same seed.

:class:`SparseCoding` is a :class:`~lightning_amor.proximal.CompositeObjective`: the smooth part g = ½‖x − Dy‖²
and the core's :class:`~lightning_amor.proximal.L1` prox (the soft threshold) for h = α‖y‖₁, so the core's ISTA
and FISTA solve it, :class:`~lightning_amor.updates.ProximalStep` refines it, and its certificate is the core's
prox-gradient residual. Its oracle is FISTA with the fixed step 1/L, L = ‖D‖₂² (the largest eigenvalue of DᵀD),
in float64. :class:`SparseCodingModule` adds the NMSE to the reference solution and the share of nonzero
coordinates to the validation and test metrics. The learned ISTA amortizer lives in
:mod:`lightning_amor.apps.lista`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.objective import Context, ObjectiveShapeError
from lightning_amor.proximal import L1, CompositeObjective
from lightning_amor.proximal_solvers import FISTA

__all__ = ["SparseCoding", "SparseCodingModule", "gaussian_dictionary", "nmse_db"]


def gaussian_dictionary(signal_dim: int, code_dim: int, seed: int = 0) -> Tensor:
    """The ``signal_dim x code_dim`` dictionary D: i.i.d. standard normal entries, each column scaled to unit norm.

    Drawn in float64 on the CPU from ``seed`` and rounded to float32 (the precision it is stored in), so every
    user of the same seed (the objective, the data module, a benchmark) gets bit-identical numbers, in float32 or
    cast to float64.
    """
    if int(signal_dim) != signal_dim or int(code_dim) != code_dim or signal_dim < 1 or code_dim < 1:
        raise ValueError(
            f"gaussian_dictionary: signal_dim and code_dim must be positive integers, got {signal_dim} and {code_dim}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    atoms = torch.randn(int(signal_dim), int(code_dim), generator=generator, dtype=torch.float64)
    return (atoms / atoms.norm(dim=0, keepdim=True)).float()


def nmse_db(y: Tensor, reference: Tensor) -> Tensor:
    """The normalised mean squared error in dB of ``B x n`` codes against ``B x n`` references: ``B``.

    ``10 log10(‖y − y_ref‖² / ‖y_ref‖²)`` per context (its mean over contexts is a mean of ratios in dB). A
    reference of zero norm divides by the smallest normal number of the dtype instead, so the value stays finite.
    """
    if y.shape != reference.shape:
        raise ValueError(f"nmse_db: codes of shape {tuple(y.shape)} against references of shape "
                         f"{tuple(reference.shape)}; give both as B x n")
    error = ((y - reference) ** 2).sum(-1)
    scale = (reference**2).sum(-1).clamp_min(torch.finfo(reference.dtype).tiny)
    return 10.0 * torch.log10(error.clamp_min(torch.finfo(error.dtype).tiny) / scale)


class SparseCoding(CompositeObjective):
    """The lasso ½‖x − Dy‖² + α‖y‖₁: signals ``x`` (``B x m``), codes ``y`` (``B x n``), values ``B``.

    Args:
        signal_dim: m, the length of a signal (250 in the LISTA literature).
        code_dim: n, the number of atoms, i.e. the length of a code (500).
        alpha: the ℓ1 weight α ≥ 0. With unit-norm atoms and noiseless signals of Bernoulli(0.1)–Gaussian codes,
            α = 0.1 keeps about the true support (docs/applications/sparse_coding.md).
        dictionary_seed: the seed of the dictionary (:func:`gaussian_dictionary`); the data module must use the
            same one.
        oracle_tol: the oracle (FISTA, float64) stops a context when its prox-gradient residual with the step 1/L
            is at most this.
        oracle_steps: the oracle's iteration budget; contexts that do not converge within it are returned as they
            are, with a warning.
    """

    def __init__(
        self,
        signal_dim: int = 250,
        code_dim: int = 500,
        alpha: float = 0.1,
        dictionary_seed: int = 0,
        oracle_tol: float = 1e-6,
        oracle_steps: int = 5000,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"SparseCoding: alpha must be a finite number >= 0 (the weight of ‖y‖₁), got {alpha}")
        if not oracle_tol > 0 or int(oracle_steps) != oracle_steps or oracle_steps < 1:
            raise ValueError(
                f"SparseCoding: oracle_tol must be positive and oracle_steps a positive integer, got {oracle_tol} "
                f"and {oracle_steps}"
            )
        super().__init__(prox=L1(alpha))
        dictionary = gaussian_dictionary(signal_dim, code_dim, dictionary_seed)
        self.register_buffer("dictionary", dictionary)
        self.dim = int(code_dim)
        self.signal_dim = int(signal_dim)
        self.alpha = float(alpha)
        self.dictionary_seed = int(dictionary_seed)
        self.oracle_tol = float(oracle_tol)
        self.oracle_steps = int(oracle_steps)
        # L = ‖D‖₂² = λ_max(DᵀD), the Lipschitz constant of ∇g, in float64 and as a Python number, so the step
        # 1/L is the same whatever dtype the module is cast to.
        self.lipschitz = float(torch.linalg.matrix_norm(dictionary.double(), ord=2) ** 2)

    def extra_repr(self) -> str:
        return (
            f"signal_dim={self.signal_dim}, code_dim={self.dim}, alpha={self.alpha}, "
            f"dictionary_seed={self.dictionary_seed}, oracle_tol={self.oracle_tol}, oracle_steps={self.oracle_steps}"
        )

    def check_signals(self, x: Context, finite: bool = True) -> Tensor:
        """``x`` itself when it is a ``B x m`` tensor of signals (and, with ``finite``, has no NaN or infinity).

        Raises:
            ObjectiveShapeError: ``x`` is not a ``B x m`` tensor.
            ValueError: ``finite`` and some signals hold NaN or infinite numbers (their rows are named).
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.signal_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ObjectiveShapeError(
                f"SparseCoding expects signals x of shape (B, {self.signal_dim}) (signal_dim={self.signal_dim}, the "
                f"rows of its dictionary), got {got}; draw them from a data module with the same signal_dim"
            )
        if finite and not bool(torch.isfinite(x).all()):
            rows = (~torch.isfinite(x).all(-1)).nonzero().flatten().tolist()
            raise ValueError(
                f"SparseCoding: {len(rows)} signals hold NaN or infinite numbers (rows {rows[:10]}"
                f"{' ...' if len(rows) > 10 else ''}); a lasso of such a signal has no solution, remove or repair them"
            )
        return x

    def smooth(self, y: Tensor, x: Context) -> Tensor:
        """g(y; x) = ½‖x − Dy‖² for codes ``B x n`` and signals ``B x m``: ``B``."""
        x = self.check_signals(x, finite=False)
        residual = x.to(y.dtype) - y @ self.dictionary.to(y.dtype).T
        return 0.5 * (residual * residual).sum(-1)

    def oracle(self) -> FISTA:
        """The oracle's solver: FISTA (restarted) with the fixed step 1/L, :attr:`oracle_tol`, :attr:`oracle_steps`."""
        return FISTA(steps=self.oracle_steps, tol=self.oracle_tol, lipschitz=self.lipschitz, backtracking=False)

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        """Lasso solutions ``B x n`` of signals ``B x m`` by :meth:`oracle` in float64 (from ``init`` if given, else
        from 0), returned in the signals' dtype.

        Raises:
            ObjectiveShapeError: the signals are not ``B x m``.
            ValueError: some signals hold NaN or infinite numbers.
        """
        x = self.check_signals(x)
        start = None if init is None else init.detach().to(torch.float64)
        result = self.oracle().solve(self, x.detach().to(torch.float64), init=start)
        missed = int((~result.converged).sum())
        if missed:
            warnings.warn(
                f"SparseCoding.solve: {missed} of {x.shape[0]} contexts did not reach the residual {self.oracle_tol:g} "
                f"within {self.oracle_steps} FISTA steps; raise oracle_steps (a small alpha converges slowly)",
                stacklevel=2,
            )
        return result.y.to(x.dtype)


class SparseCodingModule(AmortizedModule):
    """An :class:`~lightning_amor.AmortizedModule` for :class:`SparseCoding` that also logs sparse-coding metrics.

    On the validation and test sets, besides the core metrics: ``nmse_db`` (the mean over contexts of the NMSE in
    dB of the prediction against the reference solution, :func:`nmse_db`; when the batch has references) and
    ``nonzeros`` (the mean share of nonzero coordinates of the predicted codes). Arguments as
    :class:`~lightning_amor.AmortizedModule`.
    """

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """``nmse_db`` (``B``, with references) and ``nonzeros`` (``B``)."""
        y = evaluated.y
        metrics = {"nonzeros": (y != 0).to(y.dtype).mean(-1)}
        if evaluated.y_star is not None:
            metrics["nmse_db"] = nmse_db(y, evaluated.y_star.to(y.dtype))
        return metrics
