"""Importance-sampling estimates of a log marginal likelihood, accumulated over chunks of samples.

For a latent-variable model p(x, z) and a proposal q(z), the estimate

    log p̂(x) = log (1/k) Σ_{i=1..k} w_i,    w_i = p(x, z_i) / q(z_i),  z_i ~ q,

is the IWAE bound of Burda et al. (2016): a lower bound of log p(x) in expectation (Jensen), which tightens as k
grows and equals the ELBO at k = 1. With k ≥ 1000 samples per example the B x k log-weights may not fit in memory
at once, so :func:`importance_log_likelihood` draws them in chunks and keeps a running log-sum-exp in float64 (a
chunk's log-weights are shifted by the running maximum before exponentiation, so nothing overflows or underflows,
and adding 10⁴ terms loses no precision). Nothing here knows what the model is: the caller gives a function that
returns the log-weights of n fresh samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImportanceEstimate:
    """The outcome of :func:`importance_log_likelihood` for ``B`` examples (float64 tensors).

    Attributes:
        log_likelihood: ``B`` estimates log (1/k) Σ w_i.
        effective_sample_size: ``B`` values (Σ w_i)² / Σ w_i², between 1 (one sample carries all the weight: a poor
            proposal, an unreliable estimate) and k (the proposal is the posterior).
        samples: k.
    """

    log_likelihood: Tensor
    effective_sample_size: Tensor
    samples: int


def importance_log_likelihood(
    log_weights: Callable[[int], Tensor], samples: int = 1000, chunk: int = 100
) -> ImportanceEstimate:
    """log (1/k) Σ_i exp(ℓ_i) over ``k = samples`` log-weights ℓ_i drawn ``chunk`` at a time.

    Args:
        log_weights: a function that draws n fresh samples for each of the B examples and returns their log-weights
            log p(x, z) − log q(z), ``B x n`` (any float dtype; accumulated in float64).
        samples: k ≥ 1, the samples per example.
        chunk: samples drawn per call (bounds the memory: B × chunk log-weights and whatever the function needs).

    Raises:
        ValueError: ``samples`` or ``chunk`` below 1, or a call returned a wrong shape or NaN / +inf log-weights
            (−inf is a zero weight and allowed, unless every weight of an example is zero).
    """
    if samples < 1 or chunk < 1:
        raise ValueError(f"importance_log_likelihood: samples and chunk must be at least 1, got {samples} and {chunk}")
    running_max = total = squares = None
    drawn = 0
    while drawn < samples:
        n = min(chunk, samples - drawn)
        w = log_weights(n)
        if w.dim() != 2 or w.shape[1] != n or (running_max is not None and w.shape[0] != running_max.shape[0]):
            expected = f"B x {n}" if running_max is None else f"{running_max.shape[0]} x {n}"
            raise ValueError(
                f"importance_log_likelihood: log_weights({n}) returned shape {tuple(w.shape)}, expected {expected} "
                f"(one row per example, one column per sample)"
            )
        w = w.detach().to(torch.float64)
        bad = torch.isnan(w) | (w == math.inf)
        if bool(bad.any()):
            rows = bad.any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"importance_log_likelihood: NaN or +inf log-weights for examples {rows[:10]}; check the model's "
                f"log-densities (a proposal with zero variance, a likelihood of data outside its support)"
            )
        chunk_max = w.max(1).values
        if running_max is None:
            running_max = chunk_max
            total = torch.zeros_like(chunk_max)
            squares = torch.zeros_like(chunk_max)
        new_max = torch.maximum(running_max, chunk_max)
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        scale = torch.exp(running_max - shift)
        total = total * scale + torch.exp(w - shift.unsqueeze(1)).sum(1)
        squares = squares * scale.pow(2) + torch.exp(2.0 * (w - shift.unsqueeze(1))).sum(1)
        running_max = new_max
        drawn += n
    if not torch.isfinite(running_max).all():
        rows = (~torch.isfinite(running_max)).nonzero().flatten().tolist()
        raise ValueError(
            f"importance_log_likelihood: every weight is zero (log-weight −inf) for examples {rows[:10]}: the proposal "
            f"puts its samples where the model has no mass"
        )
    log_likelihood = running_max + torch.log(total) - math.log(samples)
    return ImportanceEstimate(log_likelihood, total.pow(2) / squares, samples)
