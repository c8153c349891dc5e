"""p(x) of sparse coding: signals x = D y_true (+ noise) of Bernoulli–Gaussian codes, the LISTA benchmark's data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from datamodules.context import ContextDataModule
from lightning_amor.apps.sparse_coding import gaussian_dictionary

TRAIN_TARGETS = ("oracle", "true_codes")
"""The values of :class:`SparseSignals`'s ``train_targets``."""


class SparseSignals(ContextDataModule):
    """Signals ``x = D y_true + ε`` (``B x m``) with Bernoulli(``sparsity``)–Gaussian codes ``y_true`` (``B x n``).

    Each coordinate of a code is nonzero with probability ``sparsity`` and then standard normal. D is
    :func:`~lightning_amor.apps.sparse_coding.gaussian_dictionary` of ``dictionary_seed``, the objective's own
    (checked when the data module is attached to a :class:`~lightning_amor.apps.sparse_coding.SparseCoding`). With
    ``snr_db`` each signal gets white Gaussian noise scaled to that signal-to-noise ratio exactly:
    ``‖D y_true‖² / ‖ε‖² = 10^(snr_db / 10)``; without it the signals are noiseless.

    Args:
        signal_dim: m, the length of a signal.
        code_dim: n, the length of a code.
        sparsity: the probability that a coordinate of a true code is nonzero, in (0, 1].
        dictionary_seed: the seed of D (the objective's ``dictionary_seed``).
        snr_db: the signal-to-noise ratio in dB (``None``: noiseless).
        train_targets: what a regression loss is trained towards, the ``y_star`` of the training pool: ``"oracle"``
            (the objective's lasso solutions, solved once and cached) or ``"true_codes"`` (the codes y_true the
            signals were drawn from, as the LISTA literature trains; nothing to solve). The validation and test sets
            keep the oracle's lasso solutions as references either way, so their gap and ``nmse_db`` metrics still
            measure the distance to the lasso minimum. The setting is part of the cache key.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self,
        signal_dim: int = 250,
        code_dim: int = 500,
        sparsity: float = 0.1,
        dictionary_seed: int = 0,
        snr_db: Optional[float] = None,
        train_targets: str = "oracle",
        **kwargs,
    ) -> None:
        if not 0 < sparsity <= 1:
            raise ValueError(f"SparseSignals: sparsity is the probability of a nonzero, in (0, 1], got {sparsity}")
        if snr_db is not None and not math.isfinite(snr_db):
            raise ValueError(f"SparseSignals: snr_db must be a finite number of dB or None (noiseless), got {snr_db}")
        if train_targets not in TRAIN_TARGETS:
            raise ValueError(
                f"SparseSignals: train_targets must be one of {list(TRAIN_TARGETS)} (the lasso solutions of the "
                f"objective's oracle, or the codes the signals were drawn from), got {train_targets!r}"
            )
        super().__init__(**kwargs)
        self.train_targets = train_targets
        self._pool_codes: Optional[tuple[Tensor, Tensor]] = None  # (signals, true codes) of the last pool drawn
        self.dictionary = gaussian_dictionary(signal_dim, code_dim, dictionary_seed)
        self.signal_dim, self.code_dim = int(signal_dim), int(code_dim)
        self.sparsity = float(sparsity)
        self.dictionary_seed = int(dictionary_seed)
        self.snr_db = None if snr_db is None else float(snr_db)

    def sample_with_codes(self, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``num`` signals (``num x m``) and their true codes (``num x n``), float32, drawn with ``generator``."""
        support = torch.rand(num, self.code_dim, generator=generator, dtype=torch.float64) < self.sparsity
        codes = torch.randn(num, self.code_dim, generator=generator, dtype=torch.float64) * support
        clean = codes @ self.dictionary.double().T
        if self.snr_db is None:
            return clean.float(), codes.float()
        noise = torch.randn(num, self.signal_dim, generator=generator, dtype=torch.float64)
        scale = clean.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True) / 10 ** (self.snr_db / 20)
        return (clean + scale * noise).float(), codes.float()

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num x m`` signals."""
        return self.sample_with_codes(num, generator)[0]

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> Tensor:
        """As :meth:`sample`; the training pool's true codes are kept for ``train_targets="true_codes"``."""
        x, codes = self.sample_with_codes(num, generator)
        if split == "pool":
            self._pool_codes = (x, codes)
        return x

    def fixed_set(self, split: str, size: int, with_targets: bool = True) -> dict[str, Tensor]:
        """As :meth:`ContextDataModule.fixed_set`; with ``train_targets="true_codes"`` the training pool's
        ``y_star`` (``size x n``) are the true codes of its signals instead of the oracle's solutions."""
        if split != "pool" or not with_targets or self.train_targets == "oracle":
            return super().fixed_set(split, size, with_targets)
        data = super().fixed_set(split, size, with_targets=False)
        x, codes = self._pool_codes if self._pool_codes is not None else (None, None)
        if x is not data["x"]:  # sample_split drew these very signals just now; anything else is a bug
            raise RuntimeError("SparseSignals: the training pool's true codes were not recorded with its signals")
        return {"x": data["x"], "y_star": codes}

    def cache_file(self, split: str, size: Optional[int] = None) -> Optional[Path]:
        """As :meth:`ContextDataModule.cache_file`; ``None`` for the training pool with ``train_targets="true_codes"``
        (its targets are drawn, not solved)."""
        if split == "pool" and self.train_targets == "true_codes":
            return None
        return super().cache_file(split, size)

    def attach(self, objective, needs_target: bool = False) -> None:
        """Use ``objective`` for the references, after checking that it codes over the same dictionary."""
        self.check_objective(objective)
        super().attach(objective, needs_target)

    def setup(self, stage: Optional[str] = None) -> None:
        """As :meth:`ContextDataModule.setup`, after checking the dictionary of the trainer's objective."""
        self.check_objective(self.objective)
        super().setup(stage)

    def check_objective(self, objective) -> None:
        """Refuse an objective with a ``dictionary`` other than this data module's D (signals drawn from one
        dictionary and coded over another would give a silently wrong benchmark).

        Raises:
            ValueError: the objective's dictionary differs in shape or values.
        """
        theirs = getattr(objective, "dictionary", None)
        if not isinstance(theirs, Tensor):
            return
        same = tuple(theirs.shape) == tuple(self.dictionary.shape) and torch.equal(
            theirs.detach().cpu().float(), self.dictionary
        )
        if not same:
            raise ValueError(
                f"SparseSignals draws signals from the {self.signal_dim} x {self.code_dim} dictionary of seed "
                f"{self.dictionary_seed}, but {type(objective).__name__} codes over a different dictionary "
                f"{tuple(theirs.shape)}; give the objective and the data module the same signal_dim, code_dim and "
                f"dictionary_seed"
            )
