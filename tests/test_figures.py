"""Figures in TensorBoard: real short fits with a TensorBoardLogger, read back from the event files."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import DigitsImages, SphereContexts, context
from lightning_amor import MLP, AdamStep, AmortizedModule, FullyAmortized
from lightning_amor.apps.sphere_figures import SphereContours, lat_lon_grid, to_lat_lon
from lightning_amor.apps.vae import SVI, ELBOObjective, SemiAmortizedVI, VAEModule
from lightning_amor.apps.vae_figures import VAEReconstructions, as_images, default_iterations
from lightning_amor.figures import AmortizationFigures, curve_figure, histogram_figure, trace_solver
from lightning_amor.solvers import Adam, GradientDescent
from tests.objectives import Quadratic
from tests.test_module import cheap_sphere, make_data, make_model, make_trainer

ALL = {"images": 0, "histograms": 0, "scalars": 0}


def read_events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance=ALL)
    events.Reload()
    return events


def decoded(event) -> np.ndarray:
    """The PNG of an image event as an ``H x W x C`` uint8 array (checked against the stated size)."""
    picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert picture.shape[:2] == (event.height, event.width)
    return picture


def assert_drawn(picture: np.ndarray, min_width: int, min_height: int) -> None:
    height, width, _ = picture.shape
    assert width >= min_width and height >= min_height, picture.shape
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50, "the image is (nearly) blank"


# --- a real fit of the sphere ---------------------------------------------------------------------------------

def test_sphere_fit_logs_gap_histogram_solver_curves_and_contours(tmp_path):
    model, data = make_model(), make_data(tmp_path)
    logger = TensorBoardLogger(tmp_path, name="tb")
    figures = AmortizationFigures(num_contexts=10, solver=Adam(steps=20, lr=0.05), record_every=2)
    contours = SphereContours(every_n_validations=2, num_contexts=3, lat_steps=20, lon_steps=40)
    trainer = make_trainer(tmp_path, max_steps=4, val_check_interval=2, logger=logger, callbacks=[figures, contours])
    trainer.fit(model, data)

    events = read_events(logger.log_dir)
    assert {"figures/gap_histogram", "figures/solver_curves", "figures/sphere_contours"} <= set(
        events.Tags()["images"]
    )
    # AmortizationFigures draws at every validation, SphereContours at the 1st, 3rd, ... (every second one)
    assert [e.step for e in events.Images("figures/solver_curves")] == [2, 4]
    assert [e.step for e in events.Images("figures/gap_histogram")] == [2, 4]
    assert [e.step for e in events.Images("figures/sphere_contours")] == [2]
    assert_drawn(decoded(events.Images("figures/solver_curves")[-1]), 800, 300)
    assert_drawn(decoded(events.Images("figures/gap_histogram")[-1]), 400, 300)
    assert_drawn(decoded(events.Images("figures/sphere_contours")[-1]), 2 * 300, 2 * 200)  # 2 x 2 panels

    # the histogram holds f(ŷ) − f(y*) of the first 10 validation contexts, computed here by hand
    first = next(iter(data.val_dataloader()))
    x, y_star = first["x"][:10], first["y_star"][:10]
    with torch.no_grad():
        gaps = (model.objective(model(x), x) - model.objective(y_star, x)).double()
    histograms = events.Histograms("val/gap_per_context")
    assert [h.step for h in histograms] == [2, 4]
    final = histograms[-1].histogram_value  # the weights at step 4 are the final weights
    assert final.num == 10
    assert final.min == pytest.approx(float(gaps.min()), abs=1e-6)
    assert final.max == pytest.approx(float(gaps.max()), abs=1e-6)
    assert final.sum == pytest.approx(float(gaps.sum()), abs=1e-5)
    assert final.sum_squares == pytest.approx(float((gaps**2).sum()), abs=1e-5)
    assert final.min >= -1e-4, "the references are global minimizers, so no gap is negative"
    assert plt.get_fignums() == [], "a figure was left open"


def test_sphere_contours_evaluate_the_objective_on_the_grid(tmp_path):
    model = make_model()
    lat, lon, points = lat_lon_grid(4, 8, torch.zeros(1))
    assert points.shape == (32, 3)
    torch.testing.assert_close(points.norm(dim=1), torch.ones(32))
    back_lat, back_lon = to_lat_lon(points.reshape(4, 8, 3))
    np.testing.assert_allclose(back_lat[:, 0], lat.numpy(), atol=1e-6)
    np.testing.assert_allclose(back_lon[0], lon.numpy(), atol=1e-6)

    x = make_data(tmp_path).sample(2, torch.Generator().manual_seed(0))
    contours = SphereContours(lat_steps=4, lon_steps=8)
    _, _, values = contours.landscape(model, x)
    assert values.shape == (2, 4, 8)
    expected = model.objective(points, x[1:2].expand(32, -1)).reshape(4, 8)
    np.testing.assert_allclose(values[1], expected.double().numpy(), rtol=1e-6)


# --- a real fit of SA-VAE -------------------------------------------------------------------------------------

def test_vae_fit_logs_reconstructions_by_iteration(tmp_path):
    torch.manual_seed(0)
    objective = ELBOObjective(MLP(4, 64, hidden=[16]), latent_dim=4, eval_samples=2)
    amortizer = SemiAmortizedVI(MLP(64, 8, hidden=[16]), steps=2, update=AdamStep(lr=0.01))
    model = VAEModule(objective, amortizer, refine=SVI(steps=5, lr=0.05), num_images=0)
    data = DigitsImages(batch_size=32, batches_per_epoch=4, val_size=24, test_size=24, eval_batch_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    figures = AmortizationFigures(num_contexts=12, solver=SVI(steps=10, lr=0.05))
    reconstructions = VAEReconstructions(num_contexts=3, solver=SVI(steps=8, lr=0.05), iterations=[0, 4, 8])
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2, logger=logger,
                           callbacks=[figures, reconstructions])
    trainer.fit(model, datamodule=data)

    events = read_events(logger.log_dir)
    assert {"figures/gap_histogram", "figures/solver_curves", "figures/vae_reconstructions"} <= set(
        events.Tags()["images"]
    )
    assert_drawn(decoded(events.Images("figures/vae_reconstructions")[-1]), 300, 150)
    assert_drawn(decoded(events.Images("figures/solver_curves")[-1]), 800, 300)
    gap = events.Histograms("val/gap_per_context")[-1].histogram_value
    assert gap.num == 12 and math.isfinite(gap.sum)

    # the columns: the data, SA-VAE's iterates, SVI from the prior at 0, 4 and 8 iterations, refined from ŷ
    x = next(iter(data.val_dataloader()))["x"][:3]
    model.eval()
    with torch.no_grad():
        columns = reconstructions.columns(model, x, None)
    assert [label for label, _ in columns] == ["data", "ŷ⁰", "ŷ¹", "ŷ²", "SVI 0", "SVI 4", "SVI 8", "ŷ + refine"]
    for _, images in columns:
        assert images.shape == x.shape
    torch.testing.assert_close(columns[0][1], x)
    prior = objective.decode_mean(torch.zeros(3, 8), x)  # SVI starts from λ = 0, the prior
    torch.testing.assert_close(columns[4][1], prior)
    assert not torch.allclose(columns[6][1], prior), "SVI's iterates should move away from the prior"


def test_drawing_figures_does_not_change_training(tmp_path):
    """The figures draw random numbers (SVI's fresh noise): a run with them must train exactly as one without."""

    def fit(with_figures: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        objective = ELBOObjective(MLP(4, 64, hidden=[16]), latent_dim=4, eval_samples=2)
        model = VAEModule(objective, FullyAmortized(MLP(64, 8, hidden=[16])), num_images=0)
        data = DigitsImages(batch_size=32, batches_per_epoch=6, val_size=16, test_size=16, eval_batch_size=16)
        figures = [AmortizationFigures(num_contexts=8, solver=SVI(steps=5, lr=0.05)),
                   VAEReconstructions(num_contexts=2, solver=SVI(steps=4, lr=0.05), iterations=[0, 4])]
        logger = TensorBoardLogger(str(tmp_path / f"figures_{with_figures}"), name="tb")
        trainer = make_trainer(tmp_path, max_steps=6, val_check_interval=2, logger=logger,
                               callbacks=figures if with_figures else [])
        trainer.fit(model, datamodule=data)
        if with_figures:
            assert "figures/vae_reconstructions" in read_events(logger.log_dir).Tags()["images"]
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, drawn = fit(False), fit(True)
    for name, value in plain.items():
        torch.testing.assert_close(drawn[name], value, rtol=0, atol=0, msg=f"{name} differs")


def test_vae_helpers():
    assert default_iterations(2000) == [0, 250, 500, 1000, 2000]
    assert default_iterations(0) == [0]
    assert as_images(torch.zeros(2, 16)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="B x C x H x W or B x D with D a square number"):
        as_images(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="between 0 and the solver's 8 steps"):
        VAEReconstructions(solver=SVI(steps=8), iterations=[0, 9])


# --- without TensorBoard, and bad settings ----------------------------------------------------------------------

class CountingFigures(AmortizationFigures):
    """AmortizationFigures that counts its drawings."""

    drawn = 0

    def draw(self, *args, **kwargs) -> None:
        CountingFigures.drawn += 1
        super().draw(*args, **kwargs)


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_a_tensorboard_logger_nothing_is_drawn(tmp_path, logger):
    CountingFigures.drawn = 0
    chosen = False if logger == "none" else CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2, logger=chosen,
                           callbacks=[CountingFigures(), SphereContours()])
    trainer.fit(make_model(), make_data(tmp_path))
    assert trainer.global_step == 2 and "val/objective" in trainer.callback_metrics
    assert CountingFigures.drawn == 0
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every_n_validations must be at least 1"):
        AmortizationFigures(every_n_validations=0)
    with pytest.raises(ValueError, match="num_contexts must be at least 1"):
        SphereContours(num_contexts=0)
    with pytest.raises(ValueError, match="projection must be one of"):
        SphereContours(projection="orthographic")
    with pytest.raises(TypeError, match="solver must be a lightning_amor.solvers.Solver"):
        AmortizationFigures(solver="adam")
    trainer = make_trainer(tmp_path, max_steps=1)
    quadratic = AmortizedModule(Quadratic(), FullyAmortized(MLP(4, 4)))
    with pytest.raises(ValueError, match="SphereContours draws objectives on the sphere"):
        SphereContours().setup(trainer, quadratic, "fit")
    with pytest.raises(TypeError, match="VAEReconstructions decodes posteriors with an ELBOObjective"):
        VAEReconstructions().setup(trainer, quadratic, "fit")


# --- the plotting helpers ---------------------------------------------------------------------------------------

def test_trace_solver_records_every_kth_iterate():
    objective, x = Quadratic(), torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    trace = trace_solver(GradientDescent(steps=20, lr=0.1), objective, x, record_every=5)
    assert trace.iterations.tolist() == [0, 5, 10, 15, 20]
    assert trace.values.shape == (5, 5)
    torch.testing.assert_close(trace.values[0], objective(objective.initial_point(x), x))
    assert bool((trace.values[1:] <= trace.values[:-1] + 1e-6).all()), "gradient descent should not go up"
    assert bool((trace.seconds[1:] >= trace.seconds[:-1]).all())


def test_curve_and_histogram_figures():
    x = np.arange(5)
    figure = curve_figure(x, {"mean ± std": np.ones((5, 3)), "single": np.arange(5.0)}, {"level": 0.5, "other": 1.0},
                          logy=False)
    (ax,) = figure.axes
    assert len(ax.lines) == 4  # two curves, two horizontal levels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean ± std", "single", "level", "other"]
    figure = curve_figure(x, {"runs": np.random.default_rng(0).random((5, 4))}, spread="lines", logy=True)
    assert len(figure.axes[0].lines) == 5 and figure.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="has shape \\(4,\\); expected \\(5,\\) or \\(5, B\\)"):
        curve_figure(x, {"short": np.zeros(4)})
    with pytest.raises(ValueError, match="spread must be one of"):
        curve_figure(x, {"a": np.zeros(5)}, spread="band")
    figure = histogram_figure([1.0, 2.0, float("nan")], title="gap")
    assert figure.axes[0].get_title() == "gap (2 values, 1 non-finite)"


# --- the progress bar of solving reference solutions -----------------------------------------------------------

@pytest.mark.parametrize("shown", [True, False])
def test_solving_references_shows_a_progress_bar(tmp_path, monkeypatch, capsys, shown):
    monkeypatch.setattr(context, "PROGRESS_DELAY_S", 0.0)  # show it at once, not only for long solves
    data = SphereContexts(val_size=24, eval_batch_size=8, cache_dir="none", progress_bar=shown)
    data.attach(cheap_sphere())
    fixed = data.fixed_set("val", 24)
    assert fixed["y_star"].shape == (24, 3)
    err = capsys.readouterr().err
    if shown:
        assert "SphereContexts: solving the val references" in err and "24/24" in err, err
    else:
        assert "solving" not in err, err
