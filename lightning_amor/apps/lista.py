"""LISTA (Gregor & LeCun 2010): K unrolled ISTA steps whose matrices and thresholds are learned.

ISTA on ½‖x − Dy‖² + h(y) with the step 1/L is ``y ← prox_{h/L}(y − Dᵀ(Dy − x)/L) = prox_{h/L}(W_e x + S y)`` with
``W_e = Dᵀ/L`` and ``S = I − DᵀD/L``. LISTA keeps that form for K layers from y⁰ = 0 and learns W_e (``n x m``), S
(``n x n``) and, per layer and per coordinate, the prox's step s_k (the threshold of ℓ1 is ``s_k · α``):

    y^{k+1} = prox_{s_k h}(W_e x + S y^k),    k = 0, …, K − 1.

:class:`LISTA` is an :class:`~lightning_amor.amortizers.Amortizer` built on the core's proximal operators: it
applies the objective's own ``prox_flat`` (and its domain projection), so the same network works for any h a
:class:`~lightning_amor.proximal.CompositeObjective` carries (ℓ1, a box, the non-negative orthant), and every
loss of :mod:`lightning_amor.losses` trains it (regression, objective, summed over its iterates).

**Initialisation.** On its first forward pass (or by :meth:`LISTA.initialise`) it takes W_e, S and s_k = 1/L from
the objective's ``dictionary`` (``m x n``) and ``lipschitz`` (L = ‖D‖₂²), so that the untrained network is exactly
ISTA's first K iterates from 0. A flag in the state dict records it, so a checkpoint, a resumed run or a loaded
model keeps the learned values.

**Tied weights.** W_e and S are shared by the K layers, as in Gregor & LeCun: it keeps the parameter count of one
ISTA step whatever K (``n·m + n²`` ≈ 375k for 250 × 500, against 6M for 16 untied layers), which trains in minutes
on a CPU and lets the same network be unrolled further; the thresholds, n numbers per layer, are untied (and learned
in log scale, see ``step_gain``), since the best threshold falls from layer to layer as the estimate improves (Chen
et al. 2018).

**Support selection** (optional, off by default; Chen et al. 2018, "LISTA-CPSS"; Liu et al. 2019). With
``support_step`` p > 0, at layer k (1-based) the ``round(p_k · n)`` entries of each row of ``W_e x + S y^k`` with the
largest magnitudes, ``p_k = min(k · p, support_max)``, skip the prox (they pass unshrunk; the domain projection still
applies), while the others are thresholded as above. Those entries are very likely in the support: shrinking them
only biases the estimate, which the next layers would have to undo. With it on, the untrained network is no longer
ISTA; the literature's values for 10%-sparse codes are p = 0.012 up to 0.13.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput, Amortizer
from lightning_amor.objective import Context, Objective, ObjectiveShapeError

__all__ = ["LISTA"]


class LISTA(Amortizer):
    """Learned ISTA: codes ``B x n`` from signals ``B x m`` by K layers ``y ← prox_{s_k h}(W_e x + S y)``.

    Args:
        signal_dim: m, the length of a signal.
        code_dim: n, the length of a code.
        steps: K, the number of layers (unrolled steps), ≥ 1.
        step_gain: the steps are ``s_k = (1/L) · exp(step_gain · log_step[k])`` with ``log_step`` learned from 0.
            Adam moves every parameter by about its learning rate per step, whatever the parameter's scale; the
            gain lets the few thresholds move by a relative ``step_gain × lr`` per step while the ~0.01-sized
            entries of W_e and S move by ``lr`` (with the gain 1 they barely learn: -12 dB instead of -14.5 dB to
            the lasso solution after 400 steps at lr 3e-4 here). ``exp`` keeps them positive and starts at 1/L
            exactly.
        support_step: p, the fraction of each code's entries that skip the prox at layer 1, growing by p per layer
            (support selection, see the module docstring); 0 (the default) keeps plain LISTA, whose initialisation
            is ISTA exactly. In [0, 1).
        support_max: the cap on that fraction, in [0, 1].
    """

    def __init__(self, signal_dim: int, code_dim: int, steps: int = 16, step_gain: float = 10.0,
                 support_step: float = 0.0, support_max: float = 0.13) -> None:
        super().__init__()
        for name, value in (("signal_dim", signal_dim), ("code_dim", code_dim), ("steps", steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"LISTA: {name} must be a positive integer, got {value}")
        if not (math.isfinite(step_gain) and step_gain > 0):
            raise ValueError(f"LISTA: step_gain must be a positive number, got {step_gain}")
        if not (math.isfinite(support_step) and 0.0 <= support_step < 1.0):
            raise ValueError(f"LISTA: support_step must be a fraction in [0, 1) (0 turns support selection off), "
                             f"got {support_step}")
        if not (math.isfinite(support_max) and 0.0 <= support_max <= 1.0):
            raise ValueError(f"LISTA: support_max must be a fraction in [0, 1], got {support_max}")
        self.signal_dim, self.code_dim, self.steps = int(signal_dim), int(code_dim), int(steps)
        self.step_gain = float(step_gain)
        self.support_step, self.support_max = float(support_step), float(support_max)
        self.encoder = nn.Parameter(torch.zeros(self.code_dim, self.signal_dim))  # W_e
        self.mutual = nn.Parameter(torch.zeros(self.code_dim, self.code_dim))  # S
        self.log_step = nn.Parameter(torch.zeros(self.steps, self.code_dim))  # s_k = s₀ exp(gain · log_step[k])
        self.register_buffer("base_step", torch.tensor(1.0))  # s₀ = 1/L
        self.register_buffer("initialised", torch.tensor(False))
        self.register_load_state_dict_post_hook(_remember_initialisation)
        self._initialised = False  # the buffer's value in Python: no device sync on every forward

    def extra_repr(self) -> str:
        support = f", support_step={self.support_step}, support_max={self.support_max}" if self.support_step else ""
        return (f"signal_dim={self.signal_dim}, code_dim={self.code_dim}, steps={self.steps}, "
                f"step_gain={self.step_gain}{support}")

    def selected_count(self, layer: int) -> int:
        """How many entries of each code skip the prox at 0-based ``layer``: ``round(min((layer + 1) p, p_max) n)``."""
        return int(round(min((layer + 1) * self.support_step, self.support_max) * self.code_dim))

    @property
    def step_sizes(self) -> Tensor:
        """The prox steps ``s_k = s₀ · exp(step_gain · log_step[k])``, ``K x n`` (positive; s₀ = 1/L)."""
        return self.base_step * torch.exp(self.step_gain * self.log_step)

    @torch.no_grad()
    def initialise(self, dictionary: Tensor, lipschitz: float) -> None:
        """Set W_e = Dᵀ/L, S = I − DᵀD/L and every s_k = 1/L for a ``m x n`` dictionary D and L ≥ ‖D‖₂² (> 0).

        Raises:
            ValueError: D is not ``signal_dim x code_dim`` or not finite, or L is not a positive number.
        """
        if tuple(dictionary.shape) != (self.signal_dim, self.code_dim):
            raise ValueError(
                f"LISTA: the dictionary is {tuple(dictionary.shape)} but the network is built for "
                f"({self.signal_dim}, {self.code_dim}) (signal_dim, code_dim); make them agree"
            )
        if not bool(torch.isfinite(dictionary).all()):
            raise ValueError("LISTA: the dictionary holds NaN or infinite numbers")
        if not (math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(f"LISTA: lipschitz must be a positive number (‖D‖₂²), got {lipschitz}")
        d = dictionary.detach().to(device=self.encoder.device, dtype=torch.float64)
        eye = torch.eye(self.code_dim, dtype=torch.float64, device=d.device)
        self.encoder.copy_(d.T / lipschitz)
        self.mutual.copy_(eye - d.T @ d / lipschitz)
        self.base_step.fill_(1.0 / lipschitz)
        self.log_step.zero_()
        self.initialised.fill_(True)
        self._initialised = True

    def initialise_from(self, objective: Objective) -> None:
        """:meth:`initialise` from the objective's ``dictionary`` (``m x n``) and ``lipschitz`` (L).

        Raises:
            TypeError: the objective has no ``dictionary`` or ``lipschitz`` (it is not ½‖x − Dy‖² + h(y)).
        """
        dictionary, lipschitz = getattr(objective, "dictionary", None), getattr(objective, "lipschitz", None)
        if not isinstance(dictionary, Tensor) or lipschitz is None:
            raise TypeError(
                f"LISTA initialises from ISTA on ½‖x − Dy‖² + h(y): the objective must expose `dictionary` (an m x n "
                f"tensor) and `lipschitz` (‖D‖₂²), as lightning_amor.apps.sparse_coding.SparseCoding does; "
                f"{type(objective).__name__} does not"
            )
        self.initialise(dictionary, float(lipschitz))

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """Codes ``B x n`` after K layers, with every iterate ``[0, y¹, …, y^K]``."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.signal_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ObjectiveShapeError(
                f"LISTA expects signals of shape (B, {self.signal_dim}) (signal_dim), got {got}; build it with the "
                f"objective's signal_dim"
            )
        if not self._initialised:
            self.initialise_from(objective)
        drive = x.to(self.encoder.dtype) @ self.encoder.T  # W_e x, the same for every layer
        steps = self.step_sizes
        y = drive.new_zeros(x.shape[0], self.code_dim)
        iterates = [y]
        for k in range(self.steps):
            v = drive + y @ self.mutual.T
            shrunk = objective.prox_flat(v, steps[k])
            count = self.selected_count(k)
            if count > 0:  # support selection: the `count` largest |v| of each row pass unshrunk
                chosen = torch.zeros_like(v, dtype=torch.bool)
                chosen.scatter_(1, v.detach().abs().topk(count, dim=1).indices, True)
                shrunk = torch.where(chosen, v, shrunk)
            y = objective.project_flat(shrunk)
            iterates.append(y)
        return AmortizedOutput(y=y, iterates=iterates)


def _remember_initialisation(module: nn.Module, incompatible_keys: Any) -> None:
    """After a state dict is loaded into a :class:`LISTA`: whether it held initialised (or trained) weights."""
    module._initialised = bool(module.initialised)
