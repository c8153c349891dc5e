"""The standard evaluation of a VAE: the IWAE log-likelihood and the split of the inference gap (Cremer et al. 2018).

For a decoder p(x | z) with the prior p(z) = N(0, I) and a diagonal-Gaussian proposal q(z) = N(μ, diag σ²):

- :func:`iwae_log_likelihood` estimates log p(x) with k importance samples from q (Burda et al. 2016): the number
  VAE papers report as the test log-likelihood (k = 1000 or 5000), a lower bound in expectation that tightens with
  k. The samples are drawn in chunks, and the log-mean-exp accumulated in float64
  (:func:`lightning_amor.importance.importance_log_likelihood`).
- :func:`gap_split` splits the inference gap log p(x) − ELBO(q_φ) of the encoder's posterior q_φ in two, with q* the
  best posterior of the Gaussian family found by SVI from the encoder:

      log p(x) − ELBO(q_φ) = [log p(x) − ELBO(q*)]  +  [ELBO(q*) − ELBO(q_φ)]
                           =   approximation gap    +   amortization gap.

  The approximation gap is what the Gaussian family cannot fit of the true posterior; the amortization gap is
  what the encoder loses against solving each image's problem on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_amor.apps.vae import SVI, ELBOObjective
from lightning_amor.importance import ImportanceEstimate, importance_log_likelihood
from lightning_amor.objective import Context
from lightning_amor.solvers import Solver

_LOG_2PI = math.log(2.0 * math.pi)

LogLikelihood = Callable[[Tensor], Tensor]
"""log p(x | z) of latents ``B x n x L`` (n samples for each of the B examples): ``B x n``."""


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) of ``... x L`` latents: ``...``."""
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)


def gaussian_iwae(
    mean: Tensor, logvar: Tensor, log_likelihood: LogLikelihood, samples: int = 1000, chunk: int = 100,
    generator: Optional[torch.Generator] = None,
) -> ImportanceEstimate:
    """The IWAE estimate of log p(x) = log ∫ p(x | z) N(z; 0, I) dz with the proposal N(μ, diag σ²).

    Args:
        mean, logvar: the proposal's μ and log σ², each ``B x L``.
        log_likelihood: log p(x | z) of latents ``B x n x L`` -> ``B x n`` (the data x is bound in it).
        samples: k, importance samples per example.
        chunk: samples per call of ``log_likelihood`` (memory: B × chunk decoded examples).
        generator: the CPU generator of the samples (seeded: a reproducible estimate).

    Returns:
        An :class:`~lightning_amor.importance.ImportanceEstimate` (float64, ``B``).
    """
    if mean.shape != logvar.shape or mean.dim() != 2:
        raise ValueError(f"gaussian_iwae: mean and logvar must both be B x L, got {tuple(mean.shape)} and "
                         f"{tuple(logvar.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise ValueError("gaussian_iwae: the proposal's mean or log-variance holds NaN or infinite numbers")
    batch, latent = mean.shape
    std = (0.5 * logvar).exp()

    def log_weights(n: int) -> Tensor:
        eps = torch.randn((batch, n, latent), generator=generator, dtype=torch.float64).to(mean.device, mean.dtype)
        z = mean.unsqueeze(1) + std.unsqueeze(1) * eps
        # log q(z) from ε directly: −½ Σ (ε² + log 2π + log σ²)
        log_q = -0.5 * (eps.pow(2) + _LOG_2PI).sum(-1) - 0.5 * logvar.sum(-1, keepdim=True)
        return log_likelihood(z) + standard_normal_log_density(z) - log_q

    with torch.no_grad():
        return importance_log_likelihood(log_weights, samples, chunk)


def bernoulli_log_likelihood(objective: ELBOObjective, x: Context) -> LogLikelihood:
    """log p(x | z) of an :class:`~lightning_amor.apps.vae.ELBOObjective` for the images ``x`` as a function of the
    latents ``B x S x d`` alone (:meth:`~lightning_amor.apps.vae.ELBOObjective.log_likelihood`): ``B x S``."""
    return lambda z: objective.log_likelihood(z, x)


def iwae_log_likelihood(
    objective: ELBOObjective, y: Tensor, x: Context, samples: int = 1000, chunk: int = 100, seed: int = 0
) -> ImportanceEstimate:
    """The IWAE test log-likelihood of images ``x`` (``B x ...``) under a VAE's decoder, with the proposal of
    posterior parameters ``y`` (``B x 2L``: μ then log σ², e.g. the encoder's prediction), k = ``samples``."""
    if not isinstance(objective, ELBOObjective):
        raise TypeError(f"iwae_log_likelihood needs an ELBOObjective, got {type(objective).__name__}")
    if y.dim() != 2 or y.shape[1] != objective.dim or y.shape[0] != x.shape[0]:
        raise ValueError(f"iwae_log_likelihood: y must be B x {objective.dim} with B = {x.shape[0]} images, got "
                         f"{tuple(y.shape)}")
    mean, logvar = objective.split(y)
    generator = torch.Generator().manual_seed(seed)
    return gaussian_iwae(mean, logvar, bernoulli_log_likelihood(objective, x), samples, chunk, generator)


def elbo_estimate(objective: ELBOObjective, y: Tensor, x: Context, samples: int = 100, seed: int = 0) -> Tensor:
    """ELBO(λ; x) estimated with ``samples`` fixed, seeded reparameterised samples per image: ``B`` (float64).

    Two parameters scored with the same ``seed`` and batch share their noise (a paired comparison)."""
    with torch.no_grad(), objective.override_noise(samples=samples, fixed=True, seed=seed):
        return -objective.projected(y, x).double()


@dataclass(frozen=True)
class GapSplit:
    """The inference gap of ``B`` images split as in Cremer et al. (2018); every field ``B`` (float64, nats).

    Attributes:
        log_likelihood: log p̂(x), the IWAE estimate.
        elbo_amortized: ELBO(q_φ), the encoder's posterior.
        elbo_optimal: ELBO(q*), the posterior found by SVI from the encoder.
        approximation: log p̂(x) − ELBO(q*).
        amortization: ELBO(q*) − ELBO(q_φ).
        effective_sample_size: of the IWAE estimate (out of k).
    """

    log_likelihood: Tensor
    elbo_amortized: Tensor
    elbo_optimal: Tensor
    approximation: Tensor
    amortization: Tensor
    effective_sample_size: Tensor

    @property
    def total(self) -> Tensor:
        """log p̂(x) − ELBO(q_φ) = approximation + amortization, ``B``."""
        return self.log_likelihood - self.elbo_amortized

    def means(self) -> dict[str, float]:
        """The batch mean of every field (and of the total gap), as floats."""
        fields = ("log_likelihood", "elbo_amortized", "elbo_optimal", "approximation", "amortization", "total",
                  "effective_sample_size")
        return {name: float(getattr(self, name).mean()) for name in fields}


def gap_split(
    objective: ELBOObjective, y_amortized: Tensor, x: Context, solver: Optional[Solver] = None,
    samples: int = 1000, chunk: int = 100, elbo_samples: int = 100, seed: int = 0, proposal: str = "optimal",
    y_optimal: Optional[Tensor] = None,
) -> GapSplit:
    """Split the inference gap of the posteriors ``y_amortized`` (``B x 2L``) of images ``x`` in two.

    Args:
        objective: the VAE's −ELBO (its decoder is p(x | z)).
        y_amortized: the encoder's posterior parameters (or any model's, e.g. SA-VAE's), ``B x 2L``.
        x: the images, ``B x ...``.
        solver: finds q* from ``y_amortized`` (default ``SVI(steps=500, lr=0.01, samples=4)``).
        samples: k of the IWAE estimate.
        chunk: IWAE samples per decoder call.
        elbo_samples: fixed samples per image of each ELBO estimate (both ELBOs share them).
        seed: the seed of the ELBO and IWAE noise.
        proposal: the IWAE proposal, ``optimal`` (q*, usually the tighter estimate) or ``amortized`` (q_φ).
        y_optimal: q*'s parameters when already solved (skips ``solver``).

    Returns:
        A :class:`GapSplit`; ``approximation + amortization == total`` by construction. A negative amortization
        part means the solver did not improve on the encoder (too few steps or too small a step size); a negative
        approximation part means the IWAE estimate is too loose (raise ``samples``).
    """
    if proposal not in ("optimal", "amortized"):
        raise ValueError(f"gap_split: proposal must be 'optimal' or 'amortized', got {proposal!r}")
    if y_optimal is None:
        solver = solver if solver is not None else SVI(steps=500, lr=0.01, samples=4)
        y_optimal = solver.solve(objective, x, y_amortized.detach()).y
    elbo_amortized = elbo_estimate(objective, y_amortized, x, elbo_samples, seed)
    elbo_optimal = elbo_estimate(objective, y_optimal, x, elbo_samples, seed)
    estimate = iwae_log_likelihood(
        objective, y_optimal if proposal == "optimal" else y_amortized.detach(), x, samples, chunk, seed
    )
    return GapSplit(
        log_likelihood=estimate.log_likelihood,
        elbo_amortized=elbo_amortized,
        elbo_optimal=elbo_optimal,
        approximation=estimate.log_likelihood - elbo_optimal,
        amortization=elbo_optimal - elbo_amortized,
        effective_sample_size=estimate.effective_sample_size,
    )
