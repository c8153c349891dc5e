"""What a VAE's decoder draws (lightning_amor.apps.vae_pictures): prior samples and the 2-D latent traversal come
from the decoder with the right shapes, are written as real PNG files and TensorBoard images; and the speed-up
benchmark's export timing and RESULTS section (benchmarks/vae_speedup.py; its whole run is smoke-tested in
tests/test_vae.py)."""

from __future__ import annotations

import argparse
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from datamodules import DigitsImages
from lightning_amor import MLP, FullyAmortized
from lightning_amor.apps.vae import ELBOObjective, VAEModule
from lightning_amor.apps.vae_pictures import (
    VAEPictures,
    decode_latents,
    latent_traversal,
    prior_samples,
    run_name,
    save_grid_png,
    tile,
    traversal_values,
)
from lightning_amor.objective import ObjectiveShapeError
from tests.objectives import Quadratic


def linear_elbo(weight: list[list[float]], bias: list[float]) -> ELBOObjective:
    """An ELBO whose decoder is the linear map ``L -> D`` with the given weights (``D x L``) and bias (``D``)."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return ELBOObjective(layer, latent_dim=len(weight[0]))


# --- prior samples --------------------------------------------------------------------------------------------

def test_a_constant_decoder_gives_constant_prior_samples():
    bias = [-1.0, 0.0, 0.5, 2.0, 1.0, -2.0]
    objective = linear_elbo([[0.0, 0.0, 0.0]] * 6, bias)
    samples = prior_samples(objective, 5, (1, 2, 3), seed=3)
    assert samples.shape == (5, 1, 2, 3)
    expected = torch.sigmoid(torch.tensor(bias)).reshape(1, 1, 2, 3).expand(5, -1, -1, -1)
    torch.testing.assert_close(samples, expected)


def test_prior_samples_decode_seeded_standard_normal_latents():
    """An identity decoder shows the latents themselves: sigmoid(z) with z the seeded N(0, I) draw."""
    objective = linear_elbo(torch.eye(4).tolist(), [0.0] * 4)
    samples = prior_samples(objective, 6, (1, 2, 2), seed=7)
    z = torch.randn((6, 4), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(samples, torch.sigmoid(z).reshape(6, 1, 2, 2))
    torch.testing.assert_close(prior_samples(objective, 6, (1, 2, 2), seed=7), samples)  # the same z every call
    assert not torch.allclose(prior_samples(objective, 6, (1, 2, 2), seed=8), samples)


# --- the 2-D traversal -----------------------------------------------------------------------------------------

def test_traversal_values_are_evenly_spaced_normal_quantiles():
    values = traversal_values(5, 0.1, 0.9)
    torch.testing.assert_close(torch.special.ndtr(values.double()), torch.linspace(0.1, 0.9, 5, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(values, -values.flip(0))  # symmetric about 0
    for bad in ((1, 0.05, 0.95), (5, 0.0, 0.9), (5, 0.6, 0.4)):
        with pytest.raises(ValueError, match="traversal_values"):
            traversal_values(*bad)


@pytest.mark.parametrize("read", [0, 1])
def test_a_decoder_that_reads_one_coordinate_changes_along_one_axis_only(read):
    """Coordinate 0 runs left to right (increasing), coordinate 1 top to bottom (decreasing)."""
    weight = [[1.0 if j == read else 0.0 for j in range(2)] for _ in range(4)]
    objective = linear_elbo(weight, [0.0] * 4)
    grid = latent_traversal(objective, (1, 2, 2), steps=7)
    assert grid.shape == (7, 7, 1, 2, 2)
    along_rows, along_columns = grid.diff(dim=0), grid.diff(dim=1)
    constant = 1e-6  # a matrix product's rounding
    if read == 0:
        assert along_rows.abs().max() < constant and torch.all(along_columns > 1e-3)
    else:
        assert along_columns.abs().max() < constant and torch.all(along_rows < -1e-3)
    values = traversal_values(7)
    shown = grid[0, :, 0, 0, 0] if read == 0 else grid.flip(0)[:, 0, 0, 0, 0]
    torch.testing.assert_close(shown, torch.sigmoid(values))


def test_traversal_of_chosen_coordinates_holds_the_others_at_zero():
    objective = linear_elbo([[0.0, 0.0, 1.0]], [0.0])  # reads only coordinate 2
    grid = latent_traversal(objective, (1, 1, 1), steps=3, dims=(0, 1))
    torch.testing.assert_close(grid, torch.full((3, 3, 1, 1, 1), 0.5))
    moving = latent_traversal(objective, (1, 1, 1), steps=3, dims=(2, 0))
    assert torch.all(moving.diff(dim=1) > 1e-3) and moving.diff(dim=0).abs().max() < 1e-6


def test_bad_requests_are_refused_clearly():
    objective = linear_elbo([[1.0, 0.0]] * 4, [0.0] * 4)
    with pytest.raises(ValueError, match="dims must be two different coordinates in \\[0, 2\\)"):
        latent_traversal(objective, (1, 2, 2), dims=(0, 2))
    with pytest.raises(ValueError, match="dims must be two different"):
        latent_traversal(objective, (1, 2, 2), dims=(1, 1))
    with pytest.raises(ValueError, match="N x L with L = 2"):
        decode_latents(objective, torch.zeros(3, 5), (1, 2, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        decode_latents(objective, torch.tensor([[0.0, math.nan]]), (1, 2, 2))
    with pytest.raises(ObjectiveShapeError, match="one logit per pixel"):
        prior_samples(objective, 2, (1, 3, 3))  # the decoder makes 4 pixels, not 9
    with pytest.raises(ValueError, match="image_shape must be \\(C, H, W\\)"):
        prior_samples(objective, 2, (4,))
    with pytest.raises(ValueError, match="num must be at least 1"):
        prior_samples(objective, 0, (1, 2, 2))
    with pytest.raises(TypeError, match="ELBOObjective's decoder, got Quadratic"):
        prior_samples(Quadratic(), 2, (1, 2, 2))
    with pytest.raises(ValueError, match="multiple of columns=3"):
        tile(torch.zeros(4, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="traversal must be"):
        VAEPictures(traversal="sometimes")


# --- files: PNG and TensorBoard ---------------------------------------------------------------------------------

def test_grids_are_written_as_real_png_files(tmp_path):
    from matplotlib.image import imread

    objective = linear_elbo(torch.eye(2).repeat(8, 1).tolist(), [0.0] * 16)
    grid = tile(latent_traversal(objective, (1, 4, 4), steps=5).flatten(0, 1), 5)
    assert grid.shape == (1, 5 * 4 + 6, 5 * 4 + 6)  # 5 images of 4 pixels plus 6 one-pixel borders each way
    path = save_grid_png(tmp_path / "sub" / "traversal.png", grid, labels=["a", "b", "c", "d", "e"], title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 50 and picture[..., :3].std() > 0  # a picture, not blank
    with pytest.raises(ValueError, match="C x H x W with C = 1 or 3"):
        save_grid_png(tmp_path / "bad.png", torch.zeros(2, 4, 4))
    assert run_name("runs/vae/vae_fashion_2d/checkpoints/last.ckpt") == "vae_fashion_2d"


@pytest.mark.parametrize("latent", [2, 3])
def test_the_callback_logs_prior_samples_and_for_a_2d_latent_the_traversal(tmp_path, latent):
    torch.manual_seed(0)
    objective = ELBOObjective(MLP(latent, 64, hidden=[8]), latent_dim=latent, eval_samples=2)
    model = VAEModule(objective, FullyAmortized(MLP(64, 2 * latent, hidden=[8])), num_images=0)
    data = DigitsImages(batch_size=16, batches_per_epoch=2, val_size=8, test_size=8, eval_batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    pictures = VAEPictures(rows=2, columns=3, traversal_steps=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, check_val_every_n_epoch=None,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[pictures],
                         log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert "figures/vae_prior_samples" in tags
    assert ("figures/vae_latent_traversal" in tags) == (latent == 2)
    (samples,) = events.Images("figures/vae_prior_samples")
    assert (samples.height, samples.width) == (2 * 9 + 1, 3 * 9 + 1)  # 8×8 digits, a one-pixel border
    assert samples.step == 2
    if latent == 2:
        (traversal,) = events.Images("figures/vae_latent_traversal")
        assert (traversal.height, traversal.width) == (4 * 9 + 1, 4 * 9 + 1)


# --- the benchmark's pieces ----------------------------------------------------------------------------------

def test_benchmark_times_the_exported_encoder_next_to_eager(tmp_path):
    from benchmarks.vae_speedup import export_encoder, time_encoders

    torch.manual_seed(0)
    objective = ELBOObjective(MLP(3, 16, hidden=[8]), latent_dim=3)
    module = VAEModule(objective, FullyAmortized(MLP(16, 6, hidden=[8]))).eval()
    x = torch.rand(10, 1, 4, 4)
    exported, failed = export_encoder(module, x, tmp_path, ("torchscript",))
    assert failed == {} and set(exported) == {"torchscript"}
    file, error = exported["torchscript"]
    assert error < 1e-5
    torch.testing.assert_close(file.predict(x), module(x))
    seconds = time_encoders(module, x, exported, warmup=1, repeats=3)
    assert set(seconds) == {"eager", "torchscript"} and all(0 < s < 1 for s in seconds.values())


def run(speedups: dict[str, float], reached) -> dict:
    """A benchmark result with the fields the RESULTS section reads (numbers made up for the layout)."""
    return {
        "checkpoint": "runs/vae/vae_fashion/checkpoints/last.ckpt", "data": "BinarizedFashionMNIST", "images": 1024,
        "image_shape": [1, 28, 28], "torch_threads": 1, "amortizer": "FullyAmortized", "latent_dim": 20,
        "same_quality": "same quality := x", "adam_lr": 5e-3, "adam_reached_at_iteration": reached,
        "adam_iterations_run": 2000, "adam_seconds_median": 60.0, "adam_seconds_per_iteration": 0.03,
        "encoder_seconds_interleaved": {k: 60.0 / v for k, v in speedups.items()}, "speedups": speedups,
        "speedup_is_lower_bound": reached is None, "encoder_elbo_mean": -250.0, "adam_elbo_at": {0: -550.0},
        "adam_final_minus_encoder": 1.0, "svi_elbo_mean": -245.0, "svi": {"steps": 10, "samples": 2},
        "adam_final_minus_svi": -4.0, "amortization_gap": 5.0, "export_max_abs_error": {"onnx": 1e-6},
        "command": "python -m benchmarks.vae_speedup --ckpt c", "load_average": [2.0, 3.0],
    }


def test_the_results_section_states_the_target_met_missed_or_unmeasured():
    from benchmarks.vae_speedup import FASHION_SECTION, results_section

    args = argparse.Namespace(ckpt=["a"], iterations=2000, adam_repeats=1, svi_steps=10, svi_samples=2, repeats=5)
    runs = [run({"eager": 3000.0, "onnx": 4000.0}, 900), run({"eager": 2e4, "onnx": 3e4}, 1900),
            run({"eager": 5000.0, "onnx": 6000.0}, None)]
    text = results_section(FASHION_SECTION, runs, args, 90.0, None)
    assert text.startswith(FASHION_SECTION + "\n")
    rows = [line for line in text.splitlines() if line.startswith("| `vae_fashion`")][:3]
    assert rows[0].endswith("**missed** (best 4,000×) |") and "| 3,000× | 4,000× |" in rows[0]
    assert rows[1].endswith("| met |") and "(1900 iterations)" in rows[1]
    assert rows[2].endswith("| lower bound |") and "> 5,000×" in rows[2] and "not reached in 2000" in rows[2]
    assert "shared with other jobs" in text and "vae_fashion 2.0 → 3.0" in text
    assert "    python -m benchmarks.vae_speedup --ckpt c" in text


def test_the_callback_refuses_coordinates_the_latent_lacks():
    objective = ELBOObjective(MLP(2, 64, hidden=[8]), latent_dim=2)
    model = VAEModule(objective, FullyAmortized(MLP(64, 4, hidden=[8])), num_images=0)
    with pytest.raises(ValueError, match="traversal_dims \\(0, 2\\) are not coordinates of the 2-D latent"):
        VAEPictures(traversal="always", traversal_dims=(0, 2)).setup(None, model, "fit")
    with pytest.raises(ValueError, match="two different coordinates"):
        VAEPictures(traversal_dims=(1, 1))
    VAEPictures(traversal="never", traversal_dims=(0, 2)).setup(None, model, "fit")  # nothing to traverse


def test_adam_beyond_its_budget_stops_at_the_target_time_or_when_it_reaches():
    from benchmarks.vae_speedup import adam_until, beyond_budget

    torch.manual_seed(0)
    objective = ELBOObjective(MLP(2, 16, hidden=[8]), latent_dim=2, eval_samples=4)
    module = VAEModule(objective, FullyAmortized(MLP(16, 4, hidden=[8]))).eval()
    x = (torch.rand(8, 1, 4, 4) > 0.5).float()
    with torch.no_grad():
        start = -float(objective.eval()(torch.zeros(8, 4), x).mean())
    easy = adam_until(objective, x, start - 1.0, 30.0, 5e-3, seed=0, check_every=5)
    assert easy["reached"] and easy["iterations"] == 5 and easy["seconds"] < 30.0
    hard = adam_until(objective, x, 0.0, 0.3, 5e-3, seed=0, check_every=5)  # ELBO ≤ 0 for binary pixels: never
    assert not hard["reached"] and hard["seconds"] >= 0.3 and hard["iterations"] % 5 == 0
    assert [k for k, _, _ in hard["checks"]] == list(range(5, hard["iterations"] + 1, 5))
    results = {"encoder_seconds_interleaved": {"eager": 4e-5, "onnx": 2e-5}, "encoder_elbo_mean": 0.0,
               "adam_lr": 5e-3}
    run = beyond_budget(module, x, results, seed=0)  # runs to 10⁴ × 4e-5 s = 0.4 s, never reaching
    assert run["seconds"] >= 0.4 and run["target_met"] == {"eager": True, "onnx": True}


def test_the_same_load_ratio_is_adams_iteration_time_over_the_encoders():
    from benchmarks.vae_speedup import same_load_ratio

    torch.manual_seed(0)
    objective = ELBOObjective(MLP(2, 16, hidden=[8]), latent_dim=2, eval_samples=2)
    module = VAEModule(objective, FullyAmortized(MLP(16, 4, hidden=[8]))).eval()
    x = torch.rand(6, 1, 4, 4)
    got = same_load_ratio(module, x, {}, 5e-3, rounds=3, steps=4)
    seconds = got["seconds"]
    assert set(seconds) == {"eager", "adam_iteration"}
    assert got["iteration_over_encoder"]["eager"] == pytest.approx(seconds["adam_iteration"] / seconds["eager"])
    assert got["iteration_over_encoder"]["eager"] > 1  # an Adam iteration (forward + backward) costs more than a call
