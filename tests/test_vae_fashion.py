"""The VAE's standard evaluation and its Fashion-MNIST data: the IWAE estimate against closed forms (a linear-Gaussian
model, a 1-D Bernoulli model by quadrature), the chunked float64 log-mean-exp, the gap split, the binarisation (fixed
on held-out images, dynamic in training), the install hint when the files are missing, and one real-data fit."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datamodules import fashion_mnist
from datamodules.binarized import BinarizedFashionMNIST, bernoulli_bits, fixed_binarization
from datamodules.fashion_mnist import FashionMNISTNotFound
from datamodules.images import write_idx
from lightning_amor.apps.vae import SVI, ELBOObjective
from lightning_amor.apps.vae_likelihood import (
    elbo_estimate,
    gap_split,
    gaussian_iwae,
    iwae_log_likelihood,
)
from lightning_amor.cli import main
from lightning_amor.importance import importance_log_likelihood

REPO = Path(__file__).resolve().parents[1]


# --- the IWAE estimate ------------------------------------------------------------------------------------------
def linear_gaussian(latent: int = 2, dim: int = 3, sigma: float = 0.5, orthogonal: bool = True):
    """p(z) = N(0, I), p(x | z) = N(Wz + b, σ²I): W (D x L), b, σ, and log p(x) = log N(x; b, WWᵀ + σ²I)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(dim, latent, generator=gen, dtype=torch.float64)
    if orthogonal:  # orthogonal columns of different lengths: WᵀW diagonal, so the exact posterior is diagonal
        w = torch.linalg.qr(w).Q * torch.tensor([1.5, 0.7], dtype=torch.float64)[:latent]
    b = torch.randn(dim, generator=gen, dtype=torch.float64)

    def log_likelihood(x):
        def f(z):  # B x n x L -> B x n
            mean = z @ w.T + b
            return -0.5 * (((x.unsqueeze(1) - mean) / sigma) ** 2 + math.log(2 * math.pi * sigma**2)).sum(-1)
        return f

    def log_marginal(x):
        cov = w @ w.T + sigma**2 * torch.eye(dim, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(b, cov).log_prob(x)

    def posterior(x):  # N(m, S) with S = (I + WᵀW/σ²)⁻¹, m = S Wᵀ (x − b)/σ²
        precision = torch.eye(latent, dtype=torch.float64) + w.T @ w / sigma**2
        cov = torch.linalg.inv(precision)
        return (x - b) @ w @ cov.T / sigma**2, cov
    return log_likelihood, log_marginal, posterior


def test_iwae_with_the_exact_posterior_as_proposal_is_exact_for_any_k():
    log_likelihood, log_marginal, posterior = linear_gaussian()
    x = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, -0.5]], dtype=torch.float64)
    mean, cov = posterior(x)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-12)  # a diagonal posterior
    logvar = torch.diagonal(cov).log().expand_as(mean)
    for k in (1, 7, 300):
        est = gaussian_iwae(mean, logvar, log_likelihood(x), samples=k, chunk=64,
                            generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(est.log_likelihood, log_marginal(x), rtol=0, atol=1e-10)
        torch.testing.assert_close(est.effective_sample_size, torch.full((2,), float(k), dtype=torch.float64))


def test_iwae_is_a_lower_bound_in_expectation_that_converges_to_log_px():
    log_likelihood, log_marginal, posterior = linear_gaussian()
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    mean, cov = posterior(x0.unsqueeze(0))
    # a poor diagonal proposal: shifted by 0.5 and twice as wide as the posterior
    q_mean, q_logvar = mean + 0.5, (torch.diagonal(cov) * 4).log().unsqueeze(0)
    reps = 400  # independent estimates of the same image, one per row
    x = x0.expand(reps, -1)
    truth = float(log_marginal(x0))
    gaps, stderrs = {}, {}
    for k in (1, 10, 100):
        est = gaussian_iwae(q_mean.expand(reps, -1), q_logvar.expand(reps, -1), log_likelihood(x), samples=k,
                            chunk=32, generator=torch.Generator().manual_seed(k))
        values = est.log_likelihood
        stderr = float(values.std()) / math.sqrt(reps)
        gaps[k], stderrs[k] = truth - float(values.mean()), stderr
        assert gaps[k] > -3 * stderr, (k, gaps[k], stderr)  # below log p(x) in expectation
    assert gaps[1] > gaps[10] > gaps[100] - 3 * stderrs[100], gaps  # and tighter as k grows
    assert gaps[10] > 3 * stderrs[10] and abs(gaps[100]) < 0.05, (gaps, stderrs)
    big = gaussian_iwae(q_mean, q_logvar, log_likelihood(x0.unsqueeze(0)), samples=20000, chunk=2000,
                        generator=torch.Generator().manual_seed(0))
    assert abs(float(big.log_likelihood) - truth) < 0.01
    assert gaps[1] > 0.1  # the k = 1 estimate (the ELBO) is visibly loose with this proposal


def test_chunked_log_mean_exp_matches_one_logsumexp_in_float64_even_for_extreme_weights():
    gen = torch.Generator().manual_seed(0)
    shift = torch.tensor([[-5000.0], [0.0], [800.0]], dtype=torch.float64)  # exp() under- or overflows alone
    weights = (torch.randn(3, 1000, generator=gen, dtype=torch.float64) * 30 + shift).float()  # float32 log-weights
    expected = torch.logsumexp(weights.double(), 1) - math.log(1000)
    for chunk in (1, 7, 1000):
        starts = iter(range(0, 1000, chunk))

        def log_weights(n, starts=starts):
            start = next(starts)
            return weights[:, start : start + n]
        est = importance_log_likelihood(log_weights, 1000, chunk)
        torch.testing.assert_close(est.log_likelihood, expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="NaN or \\+inf log-weights for examples \\[1\\]"):
        importance_log_likelihood(lambda n: torch.tensor([[0.0] * n, [float("nan")] * n]), 4, 2)
    with pytest.raises(ValueError, match="returned shape"):
        importance_log_likelihood(lambda n: torch.zeros(2, n + 1), 4, 2)


def tiny_vae(latent: int = 1, pixels: int = 6, seed: int = 0) -> ELBOObjective:
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, pixels))
    return ELBOObjective(decoder, latent_dim=latent, mc_samples=1, eval_samples=8).double().eval()


def test_the_bernoulli_iwae_matches_log_px_by_quadrature():
    objective = tiny_vae()
    x = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float64)
    grid = torch.linspace(-9, 9, 20001, dtype=torch.float64)
    with torch.no_grad():
        logits = objective.decoder(grid.unsqueeze(1))  # G x D
        log_px_z = -nn.functional.binary_cross_entropy_with_logits(
            logits.unsqueeze(0).expand(2, -1, -1), x.unsqueeze(1).expand(-1, len(grid), -1), reduction="none").sum(-1)
    log_joint = log_px_z - 0.5 * (grid**2 + math.log(2 * math.pi))
    truth = torch.logsumexp(log_joint, 1) + math.log(float(grid[1] - grid[0]))
    y = torch.tensor([[0.3, -1.0], [-0.5, 0.0]], dtype=torch.float64)  # proposals N(μ, σ²): not the posterior
    est = iwae_log_likelihood(objective, y, x, samples=4000, chunk=500, seed=0)
    torch.testing.assert_close(est.log_likelihood, truth, rtol=0, atol=0.02)
    assert (est.log_likelihood >= elbo_estimate(objective, y, x, samples=2000)).all()
    with pytest.raises(ValueError, match="y must be B x 2"):
        iwae_log_likelihood(objective, y[:, :1], x)


def test_the_gap_split_adds_up_and_svi_closes_the_amortization_part():
    objective = tiny_vae(latent=2, pixels=20, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 20, generator=gen) < 0.5).double()
    y_amortized = torch.cat([torch.randn(16, 2, generator=gen, dtype=torch.float64), torch.full((16, 2), -2.0,
                                                                                               dtype=torch.float64)], 1)
    split = gap_split(objective, y_amortized, x, solver=SVI(steps=150, lr=0.05, samples=4), samples=1000, chunk=250,
                      elbo_samples=200)
    torch.testing.assert_close(split.approximation + split.amortization, split.total, rtol=0, atol=1e-12)
    torch.testing.assert_close(split.total, split.log_likelihood - split.elbo_amortized)
    assert float(split.amortization.mean()) > 0.5  # SVI from a poor start gains a lot
    assert float(split.approximation.mean()) > -0.05  # log p(x) ≥ ELBO(q*) up to the estimates' noise
    means = split.means()
    assert math.isclose(means["approximation"] + means["amortization"], means["total"], abs_tol=1e-9)
    with pytest.raises(ValueError, match="proposal must be"):
        gap_split(objective, y_amortized, x, proposal="encoder", y_optimal=y_amortized)


# --- binarisation -----------------------------------------------------------------------------------------------
def idx_folder(folder: Path, train: int = 60, test: int = 24) -> Path:
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (train, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (test, 28, 28), dtype=np.uint8))
    return folder


def test_held_out_bits_are_fixed_and_training_bits_are_fresh(tmp_path):
    root = str(idx_folder(tmp_path))
    a = BinarizedFashionMNIST(root=root, val_size=10, test_size=24, batch_size=8, seed=0)
    b = BinarizedFashionMNIST(root=root, val_size=10, test_size=12, batch_size=8, seed=123)
    for split in ("val", "test"):
        bits = a.images(split)
        assert set(bits.unique().tolist()) <= {0.0, 1.0}
        n = min(len(bits), len(b.images(split)))
        assert torch.equal(bits[:n], b.images(split)[:n])  # same bits for other seeds and sizes
        assert torch.equal(a.sample_split(split, 5, torch.Generator().manual_seed(9)), bits[:5])
    plain = BinarizedFashionMNIST(root=root, val_size=10, batch_size=8, binarize="none")
    grey = plain.images("test")
    assert not torch.equal(a.images("test"), grey)
    assert abs(float(a.images("test").mean() - grey.mean())) < 0.01  # a Bernoulli draw of the grey levels
    other_seed = BinarizedFashionMNIST(root=root, val_size=10, batch_size=8, binarize_seed=1).images("test")
    assert not torch.equal(other_seed, a.images("test"))

    first, again = a.sample(8, torch.Generator().manual_seed(5)), a.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and set(first.unique().tolist()) <= {0.0, 1.0}
    # the same grey images drawn twice get different bits: dynamic binarisation
    one = torch.Generator().manual_seed(5)
    grey_batch = a.images("train")[torch.randperm(len(a.images("train")), generator=one)[:8]]
    two = bernoulli_bits(grey_batch, torch.Generator().manual_seed(77))
    assert not torch.equal(first, two)
    assert torch.equal(a.images("train"), plain.images("train"))  # training images kept grey, binarised per batch
    assert a.images("train").unique().numel() > 2
    with pytest.raises(ValueError, match="split must be one of"):
        fixed_binarization(grey, 0, "train")
    with pytest.raises(ValueError, match="binarize must be 'dynamic' or 'none'"):
        BinarizedFashionMNIST(root=root, binarize="static")
    with pytest.raises(ValueError, match="unset train_size"):
        BinarizedFashionMNIST(root=root, train_size=100, batch_size=8)


def test_the_training_loader_binarises_each_batch_afresh(tmp_path):
    data = BinarizedFashionMNIST(root=str(idx_folder(tmp_path, train=40)), val_size=8, test_size=8, batch_size=32,
                                 batches_per_epoch=2, seed=0)
    data.attach(tiny_vae(latent=2, pixels=784))
    data.setup("fit")
    loader = data.train_dataloader()
    batches = [batch["x"] for _, batch in zip(range(2), loader, strict=False)]
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in batches)
    assert batches[0].shape == (32, 1, 28, 28) and not torch.equal(batches[0], batches[1])


def test_missing_files_raise_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "not-installed")
    with pytest.raises(FashionMNISTNotFound, match=r"not-installed does not exist.*apt-get install dataset-fashion"):
        BinarizedFashionMNIST()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FashionMNISTNotFound, match=r"empty lacks the image files.*apt-get install dataset-fashion"):
        BinarizedFashionMNIST(root=str(tmp_path / "empty")).images("test")


# --- the real data ------------------------------------------------------------------------------------------------
def test_vae_fashion_fits_three_steps_on_the_installed_fashion_mnist(tmp_path, monkeypatch, capsys):
    """Reads Debian's dataset-fashion-mnist (CI installs it); where the files are absent this FAILS with the install
    hint, it does not skip."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    fashion_mnist.fashion_mnist_folder()  # FashionMNISTNotFound: apt-get install dataset-fashion-mnist
    recipe = REPO / "recipes" / "vae" / "vae_fashion.yaml"
    main(args=[
        "fit", "--config", str(REPO / "recipes" / "_base" / "trainer.yaml"), "--config", str(recipe),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.batch_size", "16", "--data.init_args.val_size", "64", "--data.init_args.test_size", "64",
        "--data.init_args.eval_batch_size", "64", "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.refine.init_args.steps", "5",
    ])
    out = capsys.readouterr().out
    assert "val/elbo" in out, out
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
