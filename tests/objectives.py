"""Every Objective of the project, with a sampler of example contexts, for the shared contract tests.

To put a new Objective under the contract tests (``tests/test_objective_contract.py``), add ONE line to
:data:`OBJECTIVES`::

    ObjectiveCase("my_app", MyObjective, lambda num, gen: MyContexts().sample(num, gen), in_domain=my_check),

``make`` builds a fresh instance (called once per test), ``sample(num, generator)`` returns ``num``
contexts drawn with a seeded CPU generator, and ``in_domain`` (default: every finite point, i.e. R^n)
tells which ``B x n`` points lie on the objective's domain. The oracle tests run only for objectives with an
oracle (``solve``); the others skip them.

The small test objectives defined here (with closed-form minimizers) are also used by the gradient,
amortizer and loss tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from datamodules import DigitsImages, SphereContexts
from datamodules.convex_qp import PortfolioReturns
from datamodules.digits_classes import DigitsClasses
from datamodules.few_shot_digits import FewShotDigits
from datamodules.gym_replay import GymReplayData
from datamodules.meta_ot import ImagePairs
from datamodules.pendulum_states import PendulumStates
from datamodules.sinusoid import SinusoidTasks
from datamodules.sparse_coding import SparseSignals
from lightning_amor.apps.actor_critic import SoftQObjective
from lightning_amor.apps.convex_qp import PortfolioQP
from lightning_amor.apps.deq import DEQClassifier
from lightning_amor.apps.maml import TaskLoss
from lightning_amor.apps.meta_ot import EntropicOT
from lightning_amor.apps.mpc import PendulumMPC
from lightning_amor.apps.sparse_coding import SparseCoding
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.apps.vae import ELBOObjective
from lightning_amor.fixed_point import Anderson
from lightning_amor.nets import MLP
from lightning_amor.objective import Context, Objective


def spd_matrix(dim: int, low: float = 1.0, high: float = 4.0, seed: int = 0) -> Tensor:
    """A fixed ``dim x dim`` float64 SPD matrix with eigenvalues evenly spread in ``[low, high]``."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, dim, dtype=torch.float64)) @ q.T


class Quadratic(Objective):
    """f(y; x) = ½ (y − x)ᵀ A (y − x) on R^4 with a fixed SPD A (eigenvalues in [1, 4]); y*(x) = x.

    Contexts are ``B x 4`` (the centres).
    """

    dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", spd_matrix(self.dim).float())

    def value(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        d = y - x
        return 0.5 * ((d @ self.a.to(d.dtype)) * d).sum(-1)

    def solve(self, x: Context, init: Tensor | None = None) -> Tensor:
        """The exact minimizers ``x`` (``B x 4``)."""
        return x.detach().clone()


class ParametricQuadratic(Objective):
    """f(y; x) = ½ (y − x − c)ᵀ (L Lᵀ + I) (y − x − c) on R^3 with learnable ``c`` and ``L``; y*(x) = x + c.

    Contexts are ``B x 3``. The parameters make it a model of objectives that learn along with the
    amortizer (a VAE decoder, a critic), for gradients w.r.t. objective parameters.
    """

    dim = 3

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.center = nn.Parameter(torch.randn(self.dim, generator=generator))
        self.factor = nn.Parameter(0.5 * torch.randn(self.dim, self.dim, generator=generator))

    def matrix(self) -> Tensor:
        """The SPD matrix L Lᵀ + I, ``n x n``."""
        return self.factor @ self.factor.T + torch.eye(self.dim, dtype=self.factor.dtype, device=self.factor.device)

    def value(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        d = y - x - self.center
        return 0.5 * ((d @ self.matrix()) * d).sum(-1)

    def solve(self, x: Context, init: Tensor | None = None) -> Tensor:
        """The exact minimizers ``x + c`` (``B x 3``), detached."""
        return (x + self.center).detach()


class CoshObjective(Objective):
    """f(y; x) = Σ_i cosh((M (y − x))_i) on R^3, M fixed and invertible: smooth, strongly convex, y*(x) = x.

    Not quadratic (its Hessian depends on y), so unrolled second-order gradients are non-trivial.
    Contexts are ``B x 3``.
    """

    dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("m", (0.5 * spd_matrix(self.dim, 0.5, 1.5, seed=2)).float())

    def value(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        return torch.cosh((y - x) @ self.m.to(y.dtype).T).sum(-1)

    def solve(self, x: Context, init: Tensor | None = None) -> Tensor:
        """The exact minimizers ``x`` (``B x 3``)."""
        return x.detach().clone()


class BoxQuadratic(Objective):
    """f(y; x) = (s/2) ‖y − c‖² on the box [0, 1]^3 (projection: clamp); y*(x) = clamp(c, 0, 1).

    Contexts are dicts ``{"center": B x 3, "scale": B}`` (a dict context with per-sample scales).
    """

    dim = 3

    def value(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        return 0.5 * x["scale"] * ((y - x["center"]) ** 2).sum(-1)

    def project(self, y: Tensor) -> Tensor:
        """Clamp every coordinate into [0, 1]."""
        return y.clamp(0.0, 1.0)

    def solve(self, x: Context, init: Tensor | None = None) -> Tensor:
        """The exact minimizers ``clamp(c, 0, 1)`` (``B x 3``)."""
        return x["center"].detach().clamp(0.0, 1.0)


def in_real_space(y: Tensor) -> Tensor:
    """R^n: every finite point (``B`` bool)."""
    return torch.isfinite(y).all(-1)


def on_unit_sphere(y: Tensor) -> Tensor:
    """S^{n-1}: unit norm up to rounding (``B`` bool)."""
    return ((y.norm(dim=-1) - 1).abs() <= 100 * torch.finfo(y.dtype).eps) & torch.isfinite(y).all(-1)


def in_unit_box(y: Tensor) -> Tensor:
    """[0, 1]^n (``B`` bool)."""
    return ((y >= 0) & (y <= 1)).all(-1)


def _sample_normal(dim: int, scale: float = 1.0) -> Callable[[int, torch.Generator], Tensor]:
    def sample(num: int, generator: torch.Generator) -> Tensor:
        return scale * torch.randn(num, dim, generator=generator)

    return sample


def _sample_box(num: int, generator: torch.Generator) -> dict[str, Tensor]:
    center = 2.0 * torch.randn(num, 3, generator=generator)  # about half the coordinates fall outside the box
    scale = 0.5 + torch.rand(num, generator=generator)
    return {"center": center, "scale": scale}


def _sample_sphere(num: int, generator: torch.Generator) -> Tensor:
    return SphereContexts().sample(num, generator)


@functools.lru_cache(maxsize=1)
def _digits() -> DigitsImages:
    return DigitsImages(val_size=64, test_size=64)


def _sample_digits(num: int, generator: torch.Generator) -> Tensor:
    return _digits().sample(num, generator)


def _elbo() -> ELBOObjective:
    """−ELBO of 8×8 digits with a small random MLP decoder (no oracle: the decoder learns)."""
    return ELBOObjective(MLP(10, 64, hidden=[32]), latent_dim=10)


@dataclass(frozen=True)
class ObjectiveCase:
    """One Objective under test.

    Attributes:
        name: the test id.
        make: builds a fresh instance (shape checks run on an instance's first call, so tests need fresh ones).
        sample: ``(num, generator) -> num`` contexts (a tensor or a dict of tensors leading with ``num``).
        in_domain: ``B x n -> B`` bool, whether points lie on the domain.
        stationarity_tol: the largest gradient-mapping norm accepted at the oracle's float64 solutions.
    """

    name: str
    make: Callable[[], Objective]
    sample: Callable[[int, torch.Generator], Context]
    in_domain: Callable[[Tensor], Tensor] = in_real_space
    stationarity_tol: float = 1e-5

    def __repr__(self) -> str:
        return self.name


def _sample_sparse_signals(num: int, generator: torch.Generator) -> Tensor:
    return SparseSignals(signal_dim=20, code_dim=40, cache_dir="none").sample(num, generator)


@functools.lru_cache(maxsize=1)
def _few_shot() -> FewShotDigits:
    return FewShotDigits(val_size=4, test_size=4)


@functools.lru_cache(maxsize=1)
def _digit_pairs() -> ImagePairs:
    return ImagePairs(images="digits", val_size=16, test_size=16)


def _sample_digit_pairs(num: int, generator: torch.Generator) -> Tensor:
    return _digit_pairs().sample(num, generator)


@functools.lru_cache(maxsize=1)
def _digits_classes() -> DigitsClasses:
    return DigitsClasses(val_size=64, test_size=64)


# One line per Objective of the project; add yours here to run the contract tests on it.
OBJECTIVES: list[ObjectiveCase] = [
    ObjectiveCase("quadratic", Quadratic, _sample_normal(4)),
    ObjectiveCase("parametric_quadratic", ParametricQuadratic, _sample_normal(3)),
    ObjectiveCase("cosh", CoshObjective, _sample_normal(3)),
    ObjectiveCase("box_quadratic", BoxQuadratic, _sample_box, in_domain=in_unit_box),
    ObjectiveCase("sphere", SphereObjective, _sample_sphere, in_domain=on_unit_sphere),
    ObjectiveCase("elbo", _elbo, _sample_digits),
    ObjectiveCase("sparse_coding", lambda: SparseCoding(signal_dim=20, code_dim=40), _sample_sparse_signals),
    ObjectiveCase("maml_sinusoid", lambda: TaskLoss(MLP(1, 1, hidden=[40, 40])),
                  lambda num, gen: SinusoidTasks().sample(num, gen)),
    ObjectiveCase("maml_digits", lambda: TaskLoss(MLP(64, 3, hidden=[16]), "cross_entropy"),
                  lambda num, gen: _few_shot().sample(num, gen)),
    ObjectiveCase("portfolio_qp", lambda: PortfolioQP(assets=20, factors=3),
                  lambda num, gen: PortfolioReturns(assets=20, factors=3).sample(num, gen),
                  in_domain=lambda y: PortfolioQP(assets=20, factors=3).feasible(y)),
    ObjectiveCase("entropic_ot", lambda: EntropicOT(side=8, epsilon=0.05), _sample_digit_pairs),
    ObjectiveCase("deq", lambda: DEQClassifier(hidden=16, solver=Anderson(steps=500, atol=1e-10)),
                  lambda num, gen: _digits_classes().sample(num, gen)),
    ObjectiveCase("pendulum_mpc", lambda: PendulumMPC(horizon=10), lambda num, gen: PendulumStates().sample(num, gen)),
    ObjectiveCase("soft_q", lambda: SoftQObjective(obs_dim=3, action_dim=1, hidden=(32,)),
                  lambda num, gen: GymReplayData(val_size=8, test_size=8).sample(num, gen),
                  in_domain=lambda y: (y[:, 1] >= -20.0) & (y[:, 1] <= 2.0)),
]


def case(name: str) -> ObjectiveCase:
    """The registered case called ``name``."""
    return next(c for c in OBJECTIVES if c.name == name)


def contexts(objective_case: ObjectiveCase, num: int, seed: int = 0, dtype: torch.dtype | None = None) -> Context:
    """``num`` contexts of a case, drawn with a CPU generator seeded with ``seed``, cast to ``dtype`` if given."""
    x = objective_case.sample(num, torch.Generator().manual_seed(seed))
    return x if dtype is None else cast_context(x, dtype)


def cast_context(x: Context, dtype: torch.dtype) -> Context:
    """A context with every floating-point tensor cast to ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    return {k: cast_context(v, dtype) for k, v in x.items()}
