"""The VAE application: the −ELBO objective, its noise, SVI, SA-VAE's gradient options, the networks,
VAEModule's metrics and images, and a smoke run of the speed-up benchmark."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from datamodules import DigitsImages
from lightning_amor import MLP, FullyAmortized, GradientStep, LearnedConstant, SemiAmortized
from lightning_amor.apps.vae import (
    SVI,
    BurgessDecoder,
    BurgessEncoder,
    ELBOObjective,
    SemiAmortizedVI,
    VAEModule,
    image_grid,
)
from lightning_amor.objective import ObjectiveShapeError
from tests.objectives import Quadratic
from tests.test_recipes import recipe_args


def linear_decoder(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    """A decoder ``L -> D`` with the given weights (``D x L``) and bias (``D``)."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def small_elbo(latent: int = 2, pixels: int = 4, **kwargs) -> ELBOObjective:
    torch.manual_seed(0)
    return ELBOObjective(MLP(latent, pixels, hidden=[8], activation="tanh"), latent_dim=latent, **kwargs)


def images(num: int, pixels: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 1, 1, pixels, generator=torch.Generator().manual_seed(seed))


# --- the objective ----------------------------------------------------------------------------------

def test_elbo_against_a_hand_computed_value():
    """A decoder with zero weights gives logits = its bias, whatever z: no noise enters the value.

    Per pixel, −log Bernoulli(t; sigmoid(l)) = softplus(l) − t·l:
      l = 0, t = 1:    log 2                    = 0.693147
      l = 1, t = 0:    log(1 + e)               = 1.313262
      l = −1, t = 0.5: log(1 + 1/e) + 0.5       = 0.813262
      l = 2, t = 1:    log(1 + e²) − 2          = 0.126928   → reconstruction 2.946599
    KL for μ = (1, −2), log σ² = (0, log 4): ½[(1 + 1 − 1 − 0) + (4 + 4 − 1 − log 4)] = 3.306853.
    """
    objective = ELBOObjective(linear_decoder([[0.0, 0.0]] * 4, [0.0, 1.0, -1.0, 2.0]), latent_dim=2).eval()
    x = torch.tensor([[[[1.0, 0.0, 0.5, 1.0]]]])
    y = torch.tensor([[1.0, -2.0, 0.0, math.log(4.0)]])
    reconstruction, kl = objective.parts(y, x)
    assert reconstruction.item() == pytest.approx(2.946599, abs=1e-5)
    assert kl.item() == pytest.approx(3.306853, abs=1e-5)
    assert objective(y, x).item() == pytest.approx(6.253452, abs=1e-5)


def test_elbo_with_reparameterised_samples_against_a_hand_computation():
    """One latent, one pixel x = 1, logits 2z + 0.5 with z = μ + σ ε for the objective's fixed ε."""
    objective = ELBOObjective(linear_decoder([[2.0]], [0.5]), latent_dim=1, eval_samples=3).eval()
    mu, logvar = 0.3, math.log(0.25)
    y = torch.tensor([[mu, logvar]], dtype=torch.float64)
    objective.double()
    eps = objective.noise(1, y)[0, :, 0].tolist()
    assert len(eps) == 3
    expected_nll = sum(math.log1p(math.exp(-(2 * (mu + 0.5 * e) + 0.5))) for e in eps) / 3  # softplus(l) − l
    expected_kl = 0.5 * (mu**2 + 0.25 - 1 - logvar)
    value = objective(y, torch.ones(1, 1, dtype=torch.float64))
    assert value.item() == pytest.approx(expected_nll + expected_kl, rel=1e-12)


def test_fixed_noise_follows_the_mode_and_the_setting():
    x, y = images(5), torch.randn(5, 4)
    objective = small_elbo(eval_samples=6)
    with torch.no_grad():
        objective.eval()
        first, second = objective(y, x), objective(y, x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # evaluation is deterministic
        assert objective.noise(5, y).shape == (5, 6, 2)
        objective.train()
        assert objective.noise(5, y).shape == (5, 1, 2)
        assert not torch.equal(objective(y, x), objective(y, x))  # training draws fresh noise
        objective.fixed_noise = "always"
        torch.testing.assert_close(objective(y, x), objective(y, x), rtol=0, atol=0)
        objective.eval()
        objective.fixed_noise = "never"
        assert not torch.equal(objective(y, x), objective(y, x))


def test_fixed_noise_is_the_same_for_every_dtype_and_depends_on_the_seed():
    objective = small_elbo(eval_samples=2).eval()
    single = objective.noise(3, torch.zeros(1))
    double = objective.noise(3, torch.zeros(1, dtype=torch.float64))
    assert double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, rtol=0, atol=1e-7)
    objective.noise_seed = 1
    assert not torch.allclose(objective.noise(3, torch.zeros(1)), single)


def test_override_noise_and_the_seeded_stream():
    objective = small_elbo(eval_samples=4).eval()
    like = torch.zeros(1)
    with objective.override_noise(samples=2, fixed=False) as policy:
        assert policy.samples == 2 and not policy.fixed
        assert objective.noise(3, like).shape == (3, 2, 2)
    assert objective.noise_policy.samples == 4 and objective.noise_policy.fixed

    def stream() -> list[torch.Tensor]:
        with objective.override_noise(seed=9, stream=True):
            return [objective.noise(3, like).clone() for _ in range(3)]

    first, again = stream(), stream()
    assert not torch.equal(first[0], first[1])  # a new ε per call
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same sequence on every entry
    assert not torch.equal(first[0], objective.noise(3, like))  # independent of the scoring noise


def test_a_decoder_of_the_wrong_size_is_named():
    objective = ELBOObjective(MLP(2, 5, hidden=[4]), latent_dim=2)
    with pytest.raises(ObjectiveShapeError, match=r"output of shape \(3, 5\).*\(1, 2, 2\) \(4 numbers each\)"):
        objective(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"latent_dim": 0}, "latent_dim"), ({"mc_samples": 0}, "mc_samples"), ({"fixed_noise": "yes"}, "fixed_noise")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ELBOObjective(MLP(2, 4), **kwargs)


def test_decode_mean_has_the_shape_of_the_images():
    objective = small_elbo(pixels=6)
    x = torch.rand(3, 1, 2, 3)
    out = objective.decode_mean(torch.randn(3, 4), x)
    assert out.shape == x.shape and bool(((out > 0) & (out < 1)).all())


# --- SVI ----------------------------------------------------------------------------------------------

def test_svi_improves_the_elbo_and_does_not_fit_the_scoring_noise():
    weight = [[3.0, 0.0], [0.0, 3.0], [-3.0, 1.0], [2.0, -2.0]]
    objective = ELBOObjective(linear_decoder(weight, [0.0] * 4), latent_dim=2, eval_samples=64).eval()
    x = (images(16) > 0.5).float()
    start = objective.initial_point(x)
    torch.manual_seed(1)
    solved = SVI(steps=150, lr=0.05, samples=4).solve(objective, x, init=start)
    assert solved.y.shape == (16, 4) and not solved.y.requires_grad
    with torch.no_grad():
        before = objective(start, x).mean()
        after = objective(solved.y, x).mean()
        torch.testing.assert_close(solved.value, objective(solved.y, x))
        with objective.override_noise(seed=777):  # an independent estimate agrees with the improvement
            independent = objective(start, x).mean() - objective(solved.y, x).mean()
    assert after < before - 1.0
    assert independent > 0.5 * (before - after)


def test_svi_needs_an_elbo_objective():
    with pytest.raises(TypeError, match="SVI works on an ELBOObjective, got Quadratic"):
        SVI(steps=2).solve(Quadratic(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lr must be positive"):
        SVI(lr=0.0)


# --- SA-VAE and the gradient options -----------------------------------------------------------------

GRADIENTS = {
    "unroll": {},
    "first_order": {},
    "truncated": {"truncate": 1},
    "implicit": {"shrinkage": 1.0},
}


def savae(gradient: str, dtype=torch.float32) -> tuple[SemiAmortizedVI, ELBOObjective]:
    objective = small_elbo(fixed_noise="always").to(dtype)
    torch.manual_seed(1)
    encoder = MLP(4, 4, hidden=[8], activation="tanh").to(dtype)
    model = SemiAmortizedVI(encoder, steps=3, update=GradientStep(0.05), gradient=gradient, **GRADIENTS[gradient])
    return model.to(dtype), objective


def loss_and_gradients(model, objective, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    objective.zero_grad()
    loss = objective(model(x, objective).y, x).mean()
    loss.backward()
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"decoder.{n}": p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    return loss.detach(), grads


@pytest.mark.parametrize("gradient", list(GRADIENTS))
def test_every_gradient_option_trains_encoder_and_decoder(gradient):
    model, objective = savae(gradient)
    x = images(8)
    _, grads = loss_and_gradients(model, objective, x)
    for prefix in ("model.init.", "decoder.decoder."):
        mine = {n: g for n, g in grads.items() if n.startswith(prefix)}
        assert mine, f"{gradient}: no gradient reached {prefix}"
        assert all(bool(torch.isfinite(g).all()) for g in mine.values())
        assert sum(float(g.abs().sum()) for g in mine.values()) > 0


def test_unrolled_gradient_matches_finite_differences():
    model, objective = savae("unroll", torch.float64)
    x = images(6).double()
    _, grads = loss_and_gradients(model, objective, x)
    params = dict(model.named_parameters())
    params.update({f"decoder.{n}": p for n, p in objective.named_parameters()})
    generator = torch.Generator().manual_seed(3)
    for name in ("init.layers.2.bias", "update.raw_lr", "decoder.decoder.layers.0.weight"):
        param = params[name]
        direction = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        h = 1e-6
        with torch.no_grad():
            param.add_(h * direction)
            plus = objective(model(x, objective).y, x).mean()
            param.sub_(2 * h * direction)
            minus = objective(model(x, objective).y, x).mean()
            param.add_(h * direction)
        key = name if name.startswith("decoder.") else f"model.{name}"
        assert float((grads[key] * direction).sum()) == pytest.approx(float((plus - minus) / (2 * h)), rel=1e-5)


def test_first_order_and_truncated_differ_from_the_full_unroll_as_they_should():
    x = images(8).double()
    _, unrolled = loss_and_gradients(*savae("unroll", torch.float64), x)
    _, first = loss_and_gradients(*savae("first_order", torch.float64), x)
    model, objective = savae("truncated", torch.float64)
    model.truncate = model.steps
    _, truncated_all = loss_and_gradients(model, objective, x)
    key = "model.init.layers.0.weight"
    assert not torch.allclose(unrolled[key], first[key], rtol=1e-3, atol=0)
    torch.testing.assert_close(unrolled[key], truncated_all[key])  # truncating at K steps is the full unroll


def test_savae_in_evaluation_uses_its_own_noise_stream():
    """In evaluation the inner steps must not fit the noise that scores their result."""
    weight = [[3.0, 0.0], [0.0, 3.0], [-3.0, 1.0], [2.0, -2.0]]
    objective = ELBOObjective(linear_decoder(weight, [0.0] * 4), latent_dim=2, eval_samples=1).eval()
    init = LearnedConstant(4)
    model = SemiAmortizedVI(init, steps=20, update=GradientStep(0.1, learnable=False)).eval()
    plain = SemiAmortized(init, steps=20, update=GradientStep(0.1, learnable=False)).eval()
    x = (images(64) > 0.5).float()
    first, again = model(x, objective).y, model(x, objective).y
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    fitted = plain(x, objective).y
    with torch.no_grad():
        scored = objective(fitted, x).mean() - objective(first, x).mean()
        with objective.override_noise(samples=256, seed=99):
            truth = objective(fitted, x).mean() - objective(first, x).mean()
    # on its own scoring noise, the plain model (which fitted that very ε) looks much better than it is
    assert scored < truth - 0.5, (scored, truth)


def test_an_images_savae_answer_does_not_depend_on_its_batch():
    """The inner steps' evaluation noise is one draw per step shared by the batch: an image gets the same SA-VAE
    prediction alone, first or last, in a batch of 2, 3 or 64 (what a deployed model must guarantee)."""
    weight = [[3.0, 0.0], [0.0, 3.0], [-3.0, 1.0], [2.0, -2.0]]
    objective = ELBOObjective(linear_decoder(weight, [0.0] * 4), latent_dim=2, eval_samples=8).eval()
    model = SemiAmortizedVI(MLP(4, 4, hidden=[8]), steps=5, update=GradientStep(0.1, learnable=False)).eval()
    x = (images(64) > 0.5).float()
    answers = model(x, objective).y.detach()
    assert not torch.allclose(answers, model.init(x).detach(), atol=1e-3), "the inner steps must move the answer"
    for picked in ([5], [0, 5, 9], [9, 5], list(range(63, -1, -1))):
        torch.testing.assert_close(model(x[picked], objective).y.detach(), answers[picked], rtol=0, atol=1e-5)
    # the scoring noise stays independent across images (a batch-mean ELBO averages over them)
    eps = objective.noise(3, x)
    assert not torch.equal(eps[0], eps[1])


def test_savae_needs_an_elbo_objective():
    model, _ = savae("unroll")
    with pytest.raises(TypeError, match="SemiAmortizedVI works on an ELBOObjective"):
        model(torch.zeros(2, 4), Quadratic())


# --- networks and pictures ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_burgess_networks_map_images_to_posteriors_and_back(size):
    encoder, decoder = BurgessEncoder(latent_dim=3, image_size=size), BurgessDecoder(latent_dim=3, image_size=size)
    x = torch.rand(2, 1, size, size)
    assert encoder(x).shape == (2, 6)
    assert decoder(torch.randn(2, 3)).shape == (2, 1, size, size)
    objective = ELBOObjective(decoder, latent_dim=3)
    assert objective(encoder(x), x).shape == (2,)


def test_burgess_networks_refuse_other_sizes():
    with pytest.raises(ValueError, match="resize"):
        BurgessEncoder()(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="power-of-two"):
        BurgessDecoder(image_size=28)


def test_image_grid_tiles_rows():
    grid = image_grid([torch.zeros(3, 1, 4, 5), torch.ones(3, 1, 4, 5)], pad=1)
    assert grid.shape == (1, 2 * 5 + 1, 3 * 6 + 1)
    assert float(grid[0, 1:5, 1:6].max()) == 0.0 and float(grid[0, 6:10, 1:6].min()) == 1.0


# --- VAEModule under a Trainer -------------------------------------------------------------------------

@pytest.mark.parametrize("sanity_steps", [0, 2])
def test_validating_does_not_change_training(tmp_path, sanity_steps):
    """Validation draws random numbers (SVI's fresh noise for the gap): training must draw the same ones whether it
    validates every 2 steps (with or without a sanity check) or never."""

    def fit(validate: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        objective = ELBOObjective(MLP(4, 64, hidden=[16]), latent_dim=4, eval_samples=2)
        model = VAEModule(objective, FullyAmortized(MLP(64, 8, hidden=[16])), refine=SVI(steps=5, lr=0.05),
                          num_images=0)
        data = DigitsImages(batch_size=32, batches_per_epoch=6, val_size=16, test_size=16, eval_batch_size=16)
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, val_check_interval=2, check_val_every_n_epoch=None,
                             limit_val_batches=1.0 if validate else 0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=sanity_steps if validate else 0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        if validate:
            assert "val/gap" in trainer.callback_metrics
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, validated = fit(False), fit(True)
    for name, value in plain.items():
        torch.testing.assert_close(validated[name], value, rtol=0, atol=0, msg=f"{name} differs")


def test_vae_module_logs_the_elbo_its_parts_the_gap_and_reconstructions(tmp_path):
    torch.manual_seed(0)
    objective = ELBOObjective(MLP(4, 64, hidden=[16]), latent_dim=4, eval_samples=4)
    model = VAEModule(objective, FullyAmortized(MLP(64, 8, hidden=[16])), refine=SVI(steps=20, lr=0.05),
                      num_images=5)
    data = DigitsImages(batch_size=32, batches_per_epoch=4, val_size=24, test_size=24, eval_batch_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/elbo"] == pytest.approx(-metrics["val/objective"], rel=1e-5)
    assert metrics["val/kl"] + metrics["val/reconstruction"] == pytest.approx(metrics["val/objective"], rel=1e-5)
    assert metrics["val/kl"] >= 0
    assert metrics["val/elbo_refined"] - metrics["val/elbo"] == pytest.approx(metrics["val/gap"], abs=1e-4)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"val/elbo", "val/kl", "val/reconstruction", "val/gap", "val/elbo_refined"} <= set(events.Tags()["scalars"])
    assert "val/reconstructions" in events.Tags()["images"]
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    assert {"test/elbo", "test/kl", "test/reconstruction", "test/gap"} <= set(results)


def test_vae_module_needs_an_elbo_objective():
    with pytest.raises(TypeError, match="VAEModule needs an ELBOObjective"):
        VAEModule(Quadratic(), FullyAmortized(MLP(4, 4)))


# --- the benchmark -----------------------------------------------------------------------------------

def test_speedup_benchmark_smoke(tmp_path, monkeypatch):
    """A recipe trained for two steps, then the benchmark on a few held-out images and iterations."""
    from benchmarks import vae_speedup
    from lightning_amor.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    main(args=[
        "fit", *recipe_args(Path(__file__).resolve().parents[1] / "recipes" / "vae" / "vae_digits.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false", "--data.init_args.val_size", "16", "--data.init_args.test_size", "48",
    ])
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out = tmp_path / "bench"
    results = vae_speedup.main([
        "--ckpt", str(ckpt), "--batch", "40", "--iterations", "60",
        "--warmup", "1", "--repeats", "3", "--adam-repeats", "1", "--svi-steps", "10", "--images", "4",
        "--formats",  # no exported formats: tests/test_vae_pictures.py times them
        "--out", str(out),
    ])
    assert results["images"] == 40
    assert (results["speedup"] is None) == (results["adam_reached_at_iteration"] is None)
    for name in ("vae_speedup.png", "reconstructions.png", "results.json", "table.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["same_quality"].startswith("same quality := ")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(SystemExit, match="holds 48 images, fewer than --batch 64"):
        vae_speedup.main(["--ckpt", str(ckpt), "--batch", "64", "--out", str(out)])
