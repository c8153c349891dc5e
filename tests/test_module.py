"""Tests of AmortizedModule under a real Trainer on CPU, and of AmortizationMetrics."""

from __future__ import annotations

import functools
import math
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules import SphereContexts
from lightning_amor import (
    MLP,
    AmortizationMetrics,
    AmortizedModule,
    FullyAmortized,
    LearnedConstant,
    NonFiniteLossError,
    ObjectiveShapeError,
    RegressionLoss,
    SemiAmortized,
)
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.objective import Context

VAL_KEYS = ("val/objective", "val/gap", "val/distance", "val/inference_ms")


def cheap_sphere() -> SphereObjective:
    """The sphere objective with a small oracle (a coarse grid and two L-BFGS starts)."""
    return SphereObjective(grid_points=256, starts=2)


class PoisonedSphere(SphereObjective):
    """The sphere objective, but NaN for every context whose first offset is negative (a poisoned context)."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        return torch.where(x[:, 12] < 0, torch.nan, super().value(y, x))


class ColumnSphere(SphereObjective):
    """A broken objective: one value per context, but as a ``B x 1`` column."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        return super().value(y, x).unsqueeze(-1)


def make_model(objective=None, hidden=(16,), **kwargs) -> AmortizedModule:
    torch.manual_seed(0)
    objective = objective if objective is not None else cheap_sphere()
    return AmortizedModule(objective, FullyAmortized(MLP(16, 3, hidden=list(hidden))), **kwargs)


def make_data(tmp_path, **kwargs) -> SphereContexts:
    config = dict(batch_size=16, batches_per_epoch=20, val_size=24, test_size=20, eval_batch_size=16)
    config.update(kwargs)
    return SphereContexts(cache_dir=str(tmp_path / "cache"), **config)


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    config = dict(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    config.update(kwargs)
    return pl.Trainer(**config)


def batches_loader(batches: list[dict[str, Tensor]]) -> DataLoader:
    """A loader that yields the given whole batches in order."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def sphere_batches(num: int, size: int = 8, poisoned: Optional[dict[int, list[int]]] = None) -> list[dict]:
    """``num`` batches of sphere contexts; ``poisoned[i]`` lists the rows of batch ``i`` to poison."""
    data = SphereContexts()
    generator = torch.Generator().manual_seed(5)
    batches = [{"x": data.sample(size, generator)} for _ in range(num)]
    for index, rows in (poisoned or {}).items():
        batches[index]["x"][rows, 12] = -1.0
    return batches


def hand_metrics(model: AmortizedModule, data: SphereContexts, split: str) -> dict[str, float]:
    """Mean f(ŷ), gap and distance over a whole fixed set, computed directly."""
    fixed = data._sets[split]
    x, y_star = fixed["x"], fixed["y_star"]
    with torch.no_grad():
        y = model(x)
        f_pred, f_star = model.objective(y, x), model.objective(y_star, x)
        distance = model.objective.distance(y, y_star)
    return {"objective": float(f_pred.mean()), "gap": float((f_pred - f_star).mean()),
            "distance": float(distance.mean())}


# --- fit, logging and TensorBoard -----------------------------------------------------------------------


def test_fit_logs_training_and_validation_metrics_to_tensorboard(tmp_path):
    model, data = make_model(), make_data(tmp_path)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, max_steps=4, val_check_interval=2, log_every_n_steps=1, logger=logger)
    trainer.fit(model, data)

    metrics = trainer.callback_metrics
    for key in ("train/loss", *VAL_KEYS):
        assert key in metrics, f"{key} was not logged"
        assert math.isfinite(float(metrics[key]))
    assert float(metrics["val/inference_ms"]) > 0
    assert 0 <= float(metrics["val/distance"]) <= math.pi
    assert float(metrics["val/gap"]) >= -1e-4, "the references are global minimizers, so the gap is not negative"
    # the logged values are the means over the whole validation set (two batches of 16 and 8)
    expected = hand_metrics(model, data, "val")
    for name, value in expected.items():
        assert float(metrics[f"val/{name}"]) == pytest.approx(value, abs=1e-5)

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", *VAL_KEYS} <= scalars
    for key in VAL_KEYS:
        steps = [event.step for event in events.Scalars(key)]
        assert len(steps) == 2, f"{key} should be written at each of the two validations, got steps {steps}"
    assert events.Scalars("val/objective")[-1].value == pytest.approx(float(metrics["val/objective"]), abs=1e-6)
    assert len(events.Scalars("train/loss")) == 4


def test_training_decreases_the_objective(tmp_path):
    model = make_model(hidden=(32, 32), optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    data = make_data(tmp_path, batch_size=32, batches_per_epoch=100, val_size=64, eval_batch_size=64)
    (before,) = make_trainer(tmp_path).validate(model, data, verbose=False)
    make_trainer(tmp_path, max_steps=50, limit_val_batches=0).fit(model, data)
    (after,) = make_trainer(tmp_path).validate(model, data, verbose=False)
    assert after["val/objective"] < before["val/objective"] - 0.2
    assert after["val/gap"] < 0.5 * before["val/gap"]
    assert after["val/distance"] < before["val/distance"]


def test_regression_loss_trains_on_a_pool_with_cached_targets(tmp_path):
    model = make_model(loss=RegressionLoss())
    data = make_data(tmp_path, train_size=32)
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.global_step == 3
    # the regression loss logs the objective of its predictions next to the loss
    assert {"train/loss", "train/objective"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("gradient", ["unroll", "first_order", "truncated", "implicit"])
def test_semi_amortized_models_train_and_evaluate(tmp_path, gradient):
    torch.manual_seed(0)
    amortizer = SemiAmortized(LearnedConstant(3, init_scale=1.0), steps=2, gradient=gradient, shrinkage=0.1)
    model = AmortizedModule(cheap_sphere(), amortizer)
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, make_data(tmp_path))
    assert all(math.isfinite(float(trainer.callback_metrics[key])) for key in ("train/loss", *VAL_KEYS))


# --- non-finite losses and bad objectives -------------------------------------------------------------


def test_a_nan_objective_stops_training_naming_the_step_and_the_contexts(tmp_path):
    model = make_model(PoisonedSphere())
    trainer = make_trainer(tmp_path, max_steps=5)
    loader = batches_loader(sphere_batches(5, poisoned={2: [1, 5]}))
    with pytest.raises(NonFiniteLossError, match=r"global step 2 .*2 of 8 contexts, batch indices \[1, 5\]"):
        trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_skip_mode_skips_non_finite_steps_and_counts_them(tmp_path):
    model = make_model(PoisonedSphere(), nonfinite="skip")
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(model, train_dataloaders=batches_loader(sphere_batches(6, poisoned={1: [0], 3: [2, 7]})))
    assert model.skipped_steps == 2
    assert trainer.global_step == 6, "a skipped step still counts as a training step"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # a skipped step leaves the weights and the optimizer state alone: the same as never seeing those batches
    clean = [b for i, b in enumerate(sphere_batches(6)) if i not in (1, 3)]
    reference = make_model(PoisonedSphere())
    make_trainer(tmp_path, max_steps=4).fit(reference, train_dataloaders=batches_loader(clean))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_unknown_nonfinite_mode_is_rejected():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        make_model(nonfinite="ignore")


def test_an_objective_of_the_wrong_output_shape_is_named(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ObjectiveShapeError, match=r"ColumnSphere\.value\(y, x\) must return one value per context"):
        trainer.fit(make_model(ColumnSphere()), train_dataloaders=batches_loader(sphere_batches(2)))


def test_a_model_of_the_wrong_output_size_is_named(tmp_path):
    torch.manual_seed(0)
    model = AmortizedModule(cheap_sphere(), FullyAmortized(MLP(16, 4, hidden=[8])))
    trainer = make_trainer(tmp_path, max_steps=2)
    expected = r"SphereObjective expects solutions y of shape \(B, 3\), got \(8, 4\)"
    with pytest.raises(ObjectiveShapeError, match=expected):
        trainer.fit(model, train_dataloaders=batches_loader(sphere_batches(2)))


# --- optimizers, schedulers, checkpoints, precision, test and predict ------------------------------------


def test_optimizer_and_scheduler_are_injected_as_callables(tmp_path):
    model = make_model(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, make_data(tmp_path))
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.5
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.interval == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3), "the scheduler is not stepped every step"
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))


def test_the_default_optimizer_is_adam_without_a_scheduler(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(make_model(), make_data(tmp_path))
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.lr_scheduler_configs == []


def test_a_checkpoint_reloads_with_the_same_predictions(tmp_path):
    model, data = make_model(), make_data(tmp_path)
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # a module built in Python stores no objects in its hyperparameters (torch's safe loader refuses them):
    # they are passed again; checkpoints written by the CLI rebuild them from the recipe (test_recipes.py)
    loaded = AmortizedModule.load_from_checkpoint(
        path, objective=SphereObjective(), amortizer=FullyAmortized(MLP(16, 3, hidden=[16]))
    )
    assert isinstance(loaded.objective, SphereObjective) and isinstance(loaded.amortizer, FullyAmortized)
    x = data.fixed_set("test", 20, with_targets=False)["x"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        fresh = make_model()
        assert not torch.allclose(fresh(x), model(x)), "training did not change the predictions"


def test_float64_training_gives_float64_predictions(tmp_path):
    model, data = make_model(), make_data(tmp_path)
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=2, precision="64-true")
    trainer.fit(model, data)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(math.isfinite(float(trainer.callback_metrics[key])) for key in VAL_KEYS)
    predictions = trainer.predict(model, data)
    assert predictions and all(p.dtype == torch.float64 for p in predictions)


def test_test_and_predict_stages(tmp_path):
    model, data = make_model(), make_data(tmp_path)
    make_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, data)
    trainer = make_trainer(tmp_path)
    (results,) = trainer.test(model, data, verbose=False)
    assert set(results) == {"test/objective", "test/gap", "test/distance", "test/inference_ms"}
    for name, value in hand_metrics(model, data, "test").items():
        assert results[f"test/{name}"] == pytest.approx(value, abs=1e-5)

    predictions = torch.cat(trainer.predict(model, data))
    x = data.fixed_set("test", 20, with_targets=False)["x"]
    assert predictions.shape == (20, 3)
    torch.testing.assert_close(predictions.norm(dim=-1), torch.ones(20))
    with torch.no_grad():
        torch.testing.assert_close(predictions, model(x))


class LearnableShiftSphere(SphereObjective):
    """The sphere objective plus (s − 0.5)² for a learnable context parameter s (as a VAE decoder or a critic)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def value(self, y: Tensor, x: Context) -> Tensor:
        return super().value(y, x) + (self.shift - 0.5) ** 2


@pytest.mark.parametrize("stop", [2, 4, 5])
@pytest.mark.parametrize("objective", [SphereObjective, LearnableShiftSphere], ids=["static", "learnable"])
def test_resuming_from_a_checkpoint_continues_exactly(tmp_path, stop, objective):
    """Stopping at the end of an epoch (4) or within one (2, 5) and resuming reproduces the uninterrupted run,
    learnable context parameters included."""
    data = functools.partial(make_data, tmp_path, batch_size=8, batches_per_epoch=4)
    straight = make_model(objective())
    make_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(straight, data())
    first = make_trainer(tmp_path, max_steps=stop, limit_val_batches=0)
    first.fit(make_model(objective()), data())
    first.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = make_model(objective())
    make_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(resumed, data(), ckpt_path=tmp_path / "stop.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if objective is LearnableShiftSphere:
        assert 0.0 < float(resumed.objective.shift) < 0.5, "the context parameter must have trained"


# --- AmortizationMetrics --------------------------------------------------------------------------------


def metric_batches() -> list[dict]:
    """Two batches of unequal size (so a mean of the two batch means differs from the mean over contexts)."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for size, ms in ((3, 2.0), (5, 6.0)):
        f_star = torch.randn(size, generator=generator)
        batches.append(dict(
            f_pred=f_star + torch.rand(size, generator=generator), f_star=f_star,
            distance=torch.rand(size, generator=generator), violation=torch.rand(size, generator=generator),
            inference_ms=ms,
        ))
    return batches


def test_metrics_are_means_over_contexts():
    batches = metric_batches()
    metric = AmortizationMetrics()
    for batch in batches:
        metric.update(**batch)
    values = metric.compute()

    def cat(key: str) -> Tensor:
        return torch.cat([b[key] for b in batches])

    torch.testing.assert_close(values["objective"], cat("f_pred").mean())
    torch.testing.assert_close(values["gap"], (cat("f_pred") - cat("f_star")).mean())
    torch.testing.assert_close(values["distance"], cat("distance").mean())
    torch.testing.assert_close(values["violation"], cat("violation").mean())
    torch.testing.assert_close(values["inference_ms"], torch.tensor(4.0), msg="inference time is counted per batch")
    metric.reset()
    metric.update(torch.tensor([1.0, 3.0]))
    assert metric.compute() == {"objective": torch.tensor(2.0)}, "quantities never given must be left out"


def test_metric_states_of_two_ranks_merge_to_the_single_process_result():
    first_half, second_half = metric_batches()
    rank0, rank1, single = AmortizationMetrics(), AmortizationMetrics(), AmortizationMetrics()
    rank0.update(**first_half)
    rank1.update(**second_half)
    single.update(**first_half)
    single.update(**second_half)
    for name in ("objective", "gap", "distance", "violation", "inference_ms"):
        for suffix in ("sum", "count"):
            state = f"{name}_{suffix}"
            torch.testing.assert_close(getattr(rank0, state) + getattr(rank1, state), getattr(single, state))
    # the reduction torchmetrics applies across ranks (dist_reduce_fx) gives the single-process means
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), single.compute()
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])


class InfiniteSlopeSphere(SphereObjective):
    """Finite values, but a non-finite gradient for contexts whose first offset is negative."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        offset = (x[:, 12] >= 0).to(y.dtype)  # sqrt at 0 (infinite slope) for poisoned contexts only
        return super().value(y, x) + (y[:, 0] * 0.0 + offset).sqrt()


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_non_finite_gradient_raises_or_skips(tmp_path, mode):
    model = make_model(InfiniteSlopeSphere(), nonfinite=mode)
    trainer = make_trainer(tmp_path, max_steps=4)
    loader = batches_loader(sphere_batches(4, poisoned={2: [3]}))
    if mode == "raise":
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at global step 2 .*amortizer\.net"):
            trainer.fit(model, train_dataloaders=loader)
    else:
        trainer.fit(model, train_dataloaders=loader)
        assert model.skipped_steps == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_refine_measures_the_gap_against_a_solver_run_from_the_prediction(tmp_path):
    """Without reference solutions in the batch, the gap is f(ŷ) − f(refined ŷ) and never negative."""
    from lightning_amor.solvers import LBFGS

    model = make_model(refine=LBFGS(steps=50))
    batches = sphere_batches(2)
    trainer = make_trainer(tmp_path)
    (results,) = trainer.validate(model, dataloaders=batches_loader(batches), verbose=False)
    x = torch.cat([b["x"] for b in batches])
    with torch.no_grad():
        y = model(x)
        refined = LBFGS(steps=50).solve(model.objective, x, init=y).y
        gap = (model.objective(y, x) - model.objective(refined, x)).mean()
    assert results["val/gap"] == pytest.approx(float(gap), abs=1e-5)
    assert results["val/gap"] > 0.01, "an untrained model should be far from its refined solution"
    assert {"val/objective", "val/distance"} <= set(results)
