"""Amortized variational inference (tutorial §3.1, §4.1): the VAE and the semi-amortized SA-VAE.

For an image x and a decoder p_φ(x | z) with a Bernoulli likelihood, the variational posterior
q(z; λ) = N(μ, diag σ²) over a latent z ∈ R^L has parameters λ = (μ, log σ²) ∈ R^{2L}, and

    f(λ; x) = −ELBO(λ; x) = E_{ε ~ N(0, I)} [−log p_φ(x | μ + σ ⊙ ε)] + KL(q(z; λ) ‖ N(0, I)),

with the KL in closed form and the expectation estimated with reparameterised samples. The
encoder of a VAE is a fully amortized model λ̂_θ(x) (:class:`~lightning_amor.FullyAmortized`);
SA-VAE (Kim et al. 2018) refines the encoder's output by K differentiable SVI steps
(:class:`SemiAmortizedVI`, a :class:`~lightning_amor.SemiAmortized` with its own noise). The
decoder lives inside the objective, so the module's optimizer trains it jointly with the encoder.
:class:`SVI` solves each image's problem from a prediction, which measures the amortization gap
(``VAEModule(refine=SVI(...))``).

Networks: for 8×8 digits a pair of :class:`~lightning_amor.MLP` (encoder ``64 -> 2L``, decoder
``L -> 64`` logits); for 32×32 images the conv pair of Burgess et al. (2018) used by the reference,
:class:`BurgessEncoder` and :class:`BurgessDecoder`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_amor.amortizers import AmortizedOutput, Amortizer, SemiAmortized
from lightning_amor.fallback import Fallback
from lightning_amor.losses import AmortizationLoss
from lightning_amor.module import AmortizedModule, Evaluated
from lightning_amor.objective import Context, Objective, ObjectiveShapeError
from lightning_amor.solvers import Adam, Callback, Solver, SolverResult

NoiseMode = Literal["never", "eval", "always"]


@dataclass(frozen=True)
class NoisePolicy:
    """How an :class:`ELBOObjective` draws its reparameterisation noise ε on one call.

    Attributes:
        samples: samples per image.
        fixed: a fixed, seeded ε (otherwise fresh draws from the global generator).
        seed: the seed of fixed noise.
        stream: every call draws the next fixed ε of a seeded stream (call c uses the seed pair
            ``(seed, c)``), so successive calls differ but a repeated sequence of calls is deterministic.
    """

    samples: int
    fixed: bool
    seed: int = 0
    stream: bool = False


class ELBOObjective(Objective):
    """−ELBO per image for a Bernoulli decoder and a diagonal-Gaussian posterior with parameters λ = (μ, log σ²).

    Solutions ``y`` are ``B x 2L`` (the first L columns μ, the last L log σ²); contexts ``x`` are images
    ``B x C x H x W`` (or ``B x D``) with values in [0, 1]; the value is ``B`` (nats per image).

    Fixed noise makes the objective a deterministic function, which a deterministic solver (L-BFGS, or
    Adam on the fixed estimate) can overfit: it finds λ that suit those few ε rather than the expectation.
    To solve an image's problem, use :class:`SVI` (fresh noise at every step), and score the result with
    the fixed noise.

    Args:
        decoder: a module ``N x L -> N x ...`` of Bernoulli logits with ``C·H·W`` numbers per latent;
            its parameters are trained along with the amortizer.
        latent_dim: L.
        mc_samples: reparameterised samples per image while the objective is in training mode.
        eval_samples: samples per image in evaluation mode (``None``: ``mc_samples``); more samples give a
            more precise estimate for validation, test and benchmarks.
        fixed_noise: when ε is fixed: ``never``; ``eval`` (default: fresh noise for training, fixed noise in
            evaluation mode, so validation and benchmarks see one deterministic function); ``always``. Fixed
            noise depends only on ``noise_seed``, the batch size and the number of samples: the image in row b
            of a batch of B always gets the same ε, so two evaluations of the same batch (an encoder's λ̂ and
            a solver's iterate) use the same noise.
        noise_seed: the seed of the fixed noise.
    """

    def __init__(
        self,
        decoder: nn.Module,
        latent_dim: int = 10,
        mc_samples: int = 1,
        eval_samples: Optional[int] = None,
        fixed_noise: NoiseMode = "eval",
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"ELBOObjective: latent_dim must be at least 1, got {latent_dim}")
        if mc_samples < 1 or (eval_samples is not None and eval_samples < 1):
            raise ValueError(
                f"ELBOObjective: mc_samples and eval_samples must be at least 1, got {mc_samples} and {eval_samples}"
            )
        if fixed_noise not in ("never", "eval", "always"):
            raise ValueError(f"ELBOObjective: fixed_noise must be 'never', 'eval' or 'always', got {fixed_noise!r}")
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.dim = 2 * latent_dim
        self.mc_samples = mc_samples
        self.eval_samples = eval_samples
        self.fixed_noise = fixed_noise
        self.noise_seed = noise_seed
        self._override: Optional[NoisePolicy] = None
        self._calls = 0
        self._noise_cache: Optional[tuple[tuple, Tensor]] = None

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, mc_samples={self.mc_samples}, eval_samples={self.eval_samples}, "
            f"fixed_noise={self.fixed_noise!r}, noise_seed={self.noise_seed}"
        )

    @property
    def noise_policy(self) -> NoisePolicy:
        """The policy of the next call: an override (see :meth:`override_noise`), else the mode's."""
        if self._override is not None:
            return self._override
        samples = self.mc_samples if self.training or self.eval_samples is None else self.eval_samples
        fixed = self.fixed_noise == "always" or (self.fixed_noise == "eval" and not self.training)
        return NoisePolicy(samples, fixed, self.noise_seed)

    @contextmanager
    def override_noise(
        self, samples: Optional[int] = None, fixed: Optional[bool] = None, seed: Optional[int] = None,
        stream: bool = False,
    ) -> Iterator[NoisePolicy]:
        """Within the block, draw noise by a policy built from the current one with the given fields replaced."""
        current = self.noise_policy
        policy = NoisePolicy(
            samples=current.samples if samples is None else samples,
            fixed=current.fixed if fixed is None else fixed,
            seed=current.seed if seed is None else seed,
            stream=stream,
        )
        if policy.samples < 1:
            raise ValueError(f"ELBOObjective: samples must be at least 1, got {policy.samples}")
        saved, saved_calls = self._override, self._calls
        self._override, self._calls = policy, 0
        try:
            yield policy
        finally:
            self._override, self._calls = saved, saved_calls

    def split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Means and log-variances, each ``B x L``, of ``B x 2L`` parameters."""
        return y[:, : self.latent_dim], y[:, self.latent_dim :]

    def noise(self, batch: int, like: Tensor) -> Tensor:
        """Standard normal ε, ``B x S x L`` on ``like``'s device and dtype, drawn by :attr:`noise_policy`.

        Fresh and fixed noise are independent for every image (fixed: one seeded ``B x S x L`` draw, so a
        batch-mean estimate averages over images). A seeded stream (SA-VAE's inner steps in evaluation) draws one
        ``S x L`` ε per call shared by every image of the batch, so that an image's SA-VAE answer does not depend
        on the batch it comes in — its size or its position — and an exported SA-VAE takes any batch size.
        """
        policy = self.noise_policy
        if not policy.fixed:
            return torch.randn((batch, policy.samples, self.latent_dim), device=like.device, dtype=like.dtype)
        if policy.stream:
            seed = _mixed_seed(policy.seed, self._calls)
            self._calls += 1
            return _normal((policy.samples, self.latent_dim), seed, like).expand(batch, -1, -1)
        shape = (batch, policy.samples, self.latent_dim)
        key = (shape, like.device, like.dtype, policy.seed)
        if self._noise_cache is None or self._noise_cache[0] != key:
            self._noise_cache = (key, _normal(shape, policy.seed, like))
        return self._noise_cache[1]

    def kl(self, y: Tensor) -> Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), ``B``."""
        mean, logvar = self.split(y)
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)

    def logits(self, z: Tensor, x: Context) -> Tensor:
        """Decoder logits for latents ``B x S x L`` and images ``x``: ``B x S x D`` (D = pixels per image)."""
        batch, samples, _ = z.shape
        pixels = x[0].numel()
        out = self.decoder(z.reshape(batch * samples, self.latent_dim))
        if out.shape[0] != batch * samples or out[0].numel() != pixels:
            raise ObjectiveShapeError(
                f"ELBOObjective: the decoder maps {batch * samples} latents to output of shape {tuple(out.shape)}, "
                f"but the images have shape {tuple(x.shape[1:])} ({pixels} numbers each); the decoder must return "
                f"one logit per pixel"
            )
        return out.reshape(batch, samples, pixels)

    def log_likelihood(self, z: Tensor, x: Context) -> Tensor:
        """log p(x | z) = Σ_pixels log Bernoulli(x; sigmoid(decoder(z))) for latents ``B x S x d`` and images
        ``B x ...`` (values in {0, 1} for a likelihood; grey levels give a negative cross-entropy): ``B x S``."""
        logits = self.logits(z, x)
        target = x.reshape(x.shape[0], 1, -1).to(logits.dtype).expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def reconstruction(self, y: Tensor, x: Context) -> Tensor:
        """The expected negative log-likelihood E_q[−log p(x | z)], estimated with reparameterised samples: ``B``."""
        mean, logvar = self.split(y)
        eps = self.noise(y.shape[0], mean)
        z = mean.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps
        return -self.log_likelihood(z, x).mean(1)

    def parts(self, y: Tensor, x: Context) -> tuple[Tensor, Tensor]:
        """``(reconstruction, KL)``, each ``B``; their sum is the value, −ELBO."""
        return self.reconstruction(y, x), self.kl(y)

    def value(self, y: Tensor, x: Context) -> Tensor:
        """−ELBO(λ; x) = reconstruction + KL, ``B``."""
        reconstruction, kl = self.parts(y, x)
        return reconstruction + kl

    def decode_mean(self, y: Tensor, x: Context) -> Tensor:
        """The decoded mean image sigmoid(decoder(μ)) of each posterior, shaped like ``x``."""
        mean, _ = self.split(y)
        return torch.sigmoid(self.logits(mean.unsqueeze(1), x)).reshape(x.shape)


def _mixed_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from integers, so nearby tuples give unrelated streams."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _normal(shape: tuple[int, ...], seed: int, like: Tensor) -> Tensor:
    # drawn in float64 on the CPU, so every device and dtype sees the same numbers
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return eps.to(device=like.device, dtype=like.dtype)


def _elbo_objective(objective: Objective, who: str) -> ELBOObjective:
    if not isinstance(objective, ELBOObjective):
        raise TypeError(f"{who} works on an ELBOObjective, got {type(objective).__name__}")
    return objective


class SVI(Solver):
    """Stochastic variational inference for every image at once: Adam on −ELBO with fresh noise at every step.

    The step size decays linearly from ``lr`` to 0 over ``steps``, so the iterates settle at the
    optimum of the expectation instead of jittering around it, and fresh noise keeps them from fitting
    any particular ε. Run from an amortized prediction, it measures the amortization gap (as
    ``AmortizedModule(refine=SVI(...))``); Adam is separable, so each image is solved as if alone.

    Args:
        steps: Adam steps.
        lr: the initial step size.
        samples: fresh reparameterised samples per image and step.
        betas: Adam's decay rates.
        eps: Adam's denominator guard.
    """

    def __init__(
        self, steps: int = 300, lr: float = 1e-2, samples: int = 4, betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if samples < 1:
            raise ValueError(f"SVI: samples must be at least 1, got {samples}")
        self.samples = int(samples)
        self.adam = Adam(steps=steps, lr=lr, betas=betas, eps=eps, decay="linear")

    def _solve(
        self, objective: Objective, x: Context, init: Optional[Tensor], callback: Optional[Callback]
    ) -> SolverResult:
        elbo = _elbo_objective(objective, "SVI")
        with elbo.override_noise(samples=self.samples, fixed=False):
            result = self.adam._solve(objective, x, init, callback)
        with torch.no_grad():  # the value under the objective's own noise, not the last fresh draw
            result.value = objective.projected(result.y, x)
        return result


class SemiAmortizedVI(SemiAmortized):
    """SA-VAE (Kim et al. 2018): :class:`~lightning_amor.SemiAmortized` whose inner SVI steps draw their own noise.

    In training the inner steps and the loss all draw fresh noise, as in plain ``SemiAmortized``. In
    evaluation, where the objective's noise is fixed, the inner steps draw instead from a separate
    seeded stream (a new ε per step, deterministic, independent of the noise that scores the result).
    With the objective's own fixed noise, the K steps would fit the very ε that then measures them, and
    SA-VAE would look better than it is. Arguments as :class:`~lightning_amor.SemiAmortized`.
    """

    inner_seed_offset = 1_000_003

    def forward(self, x: Context, objective: Objective) -> AmortizedOutput:
        """``B x 2L`` posterior parameters after K inner SVI steps, with every iterate."""
        elbo = _elbo_objective(objective, "SemiAmortizedVI")
        if not elbo.noise_policy.fixed:
            return super().forward(x, objective)
        with elbo.override_noise(samples=elbo.mc_samples, seed=elbo.noise_seed + self.inner_seed_offset, stream=True):
            return super().forward(x, objective)


class BurgessEncoder(nn.Module):
    """The conv encoder of Burgess et al. (2018): images ``B x C x S x S`` -> ``B x 2L`` (μ, then log σ²).

    ``log2(S) − 2`` conv layers (32 channels, 4×4 kernels, stride 2, padding 1: three for 32×32) with ReLU
    down to 4×4, then linear layers ``512 -> hidden -> hidden`` with ReLU and a linear output.
    """

    def __init__(self, latent_dim: int = 10, channels: int = 1, image_size: int = 32, hidden: int = 256) -> None:
        super().__init__()
        layers = _conv_layers(image_size)
        convs: list[nn.Module] = []
        width = channels
        for _ in range(layers):
            convs += [nn.Conv2d(width, 32, 4, stride=2, padding=1), nn.ReLU()]
            width = 32
        self.convs = nn.Sequential(*convs)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.shape = (channels, image_size, image_size)

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x S x S`` -> ``B x 2L``."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"BurgessEncoder expects images of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}; resize the data (e.g. data.init_args.resize: {self.shape[-1]})")
        return self.head(self.convs(x))


class BurgessDecoder(nn.Module):
    """The mirror of :class:`BurgessEncoder`: latents ``B x L`` -> Bernoulli logits ``B x C x S x S``."""

    def __init__(self, latent_dim: int = 10, channels: int = 1, image_size: int = 32, hidden: int = 256) -> None:
        super().__init__()
        layers = _conv_layers(image_size)
        self.head = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 32 * 4 * 4), nn.ReLU(),
        )
        deconvs: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            deconvs.append(nn.ConvTranspose2d(32, channels if last else 32, 4, stride=2, padding=1))
            if not last:
                deconvs.append(nn.ReLU())
        self.deconvs = nn.Sequential(*deconvs)

    def forward(self, z: Tensor) -> Tensor:
        """``B x L`` -> ``B x C x S x S`` logits."""
        return self.deconvs(self.head(z).reshape(-1, 32, 4, 4))


def _conv_layers(image_size: int) -> int:
    layers = math.log2(image_size) - 2 if image_size > 0 else 0
    if layers < 1 or layers != int(layers):
        raise ValueError(f"the Burgess networks need square images of a power-of-two size >= 8, got {image_size}")
    return int(layers)


def image_grid(rows: list[Tensor], pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile rows of images (each ``N x C x H x W``, values in [0, 1]) into one ``C x H' x W'`` image."""
    count, channels, height, width = rows[0].shape
    grid = torch.full((channels, len(rows) * (height + pad) + pad, count * (width + pad) + pad), float(pad_value))
    for r, images in enumerate(rows):
        for c in range(count):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[:, top : top + height, left : left + width] = images[c].detach().float().cpu()
    return grid.clamp(0.0, 1.0)


class VAEModule(AmortizedModule):
    """An :class:`~lightning_amor.AmortizedModule` for an :class:`ELBOObjective` that also logs the ELBO's parts.

    Logged on the validation and test sets, besides the core metrics (``objective`` = mean −ELBO of the
    prediction, ``gap`` = the amortization gap when ``refine`` is set): ``elbo`` (mean ELBO of the
    prediction), ``kl`` and ``reconstruction`` (its two parts, −ELBO = reconstruction + KL) and, with
    ``refine``, ``elbo_refined`` (mean ELBO after the solver), all by the public
    :meth:`~lightning_amor.module.AmortizedModule.evaluation_metrics` hook. With a TensorBoard logger, the first
    ``num_images`` validation images are shown at every validation with their reconstructions (the
    decoded posterior means) from the prediction and, with ``refine``, from the refined solution.

    Args:
        objective: the −ELBO, with the decoder inside.
        amortizer: the encoder (``FullyAmortized``) or SA-VAE (:class:`SemiAmortizedVI`).
        num_images: images shown in TensorBoard (0: none).
        loss, optimizer, lr_scheduler, nonfinite, refine, inference: as :class:`~lightning_amor.AmortizedModule`;
            ``refine`` (and the ``inference`` policy's solver) is typically :class:`SVI`.
        objective_optimizer, objective_lr_scheduler: as :class:`~lightning_amor.AmortizedModule`: the decoder's
            own optimizer and scheduler (two learning rates, say); it then learns from −ELBO at the encoder's
            prediction, and the encoder from −ELBO with the decoder held constant.
    """

    def __init__(
        self,
        objective: ELBOObjective,
        amortizer: Amortizer,
        loss: Optional[AmortizationLoss] = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        nonfinite: str = "raise",
        refine: Optional[Solver] = None,
        num_images: int = 16,
        inference: Optional[Fallback] = None,
        objective_optimizer: Optional[OptimizerCallable] = None,
        objective_lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        if not isinstance(objective, ELBOObjective):
            raise TypeError(f"VAEModule needs an ELBOObjective, got {type(objective).__name__}")
        super().__init__(
            objective, amortizer, loss, optimizer, lr_scheduler, nonfinite, refine, inference,
            objective_optimizer=objective_optimizer, objective_lr_scheduler=objective_lr_scheduler,
        )
        self.num_images = num_images
        self._shown: Optional[list[Tensor]] = None

    def evaluation_metrics(self, evaluated: Evaluated) -> dict[str, Tensor]:
        """The ELBO of the prediction and its two parts, and the ELBO of the refined solution: each ``B``."""
        kl = self.objective.kl(evaluated.y)
        metrics = {"elbo": -evaluated.value, "kl": kl, "reconstruction": evaluated.value - kl}
        if evaluated.reference_value is not None:
            metrics["elbo_refined"] = -evaluated.reference_value
        return metrics

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the first validation batch's images and reconstructions for TensorBoard."""
        if self._shown is not None or self.num_images <= 0:
            return
        x, y, y_star = outputs["x"], outputs["y"], outputs["y_star"]
        shown = slice(0, self.num_images)
        rows = [x[shown], self.objective.decode_mean(y[shown], x[shown])]
        if y_star is not None:
            rows.append(self.objective.decode_mean(y_star[shown], x[shown]))
        self._shown = [r.detach() for r in rows]

    def on_validation_epoch_end(self) -> None:
        """Log the metrics, and the images kept by :meth:`on_validation_batch_end` to TensorBoard."""
        super().on_validation_epoch_end()
        shown, self._shown = self._shown, None
        if shown is None or shown[0].dim() != 4 or self.global_rank != 0:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            # rows: the data, the prediction's reconstruction, the refined solution's reconstruction
            experiment.add_image("val/reconstructions", image_grid(shown), self.global_step)
