"""Training that must not end "successfully" with nothing learned: skipped steps, NaN held-out metrics, runs that
train nothing, inner step sizes that raise f, and the warnings of the README's first run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from lightning_amor import MLP, AmortizedModule, FullyAmortized, GradientStep, LearnedConstant, SemiAmortized
from lightning_amor.cli import EXIT_NONFINITE_METRICS, main
from lightning_amor.lipschitz import hessian_lipschitz
from lightning_amor.module import NonFiniteLossError
from lightning_amor.objective import Context, Objective
from tests.objectives import spd_matrix
from tests.test_module import PoisonedSphere, batches_loader, make_model, make_trainer, sphere_batches
from tests.test_recipes import recipe_args, smoke_overrides

REPO = Path(__file__).resolve().parents[1]


class StiffQuadratic(Objective):
    """f(y; x) = ½ (y − x)ᵀ A (y − x) on R^4, A with eigenvalues 1, 4, 7, 10: L = 10, y*(x) = x."""

    dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", spd_matrix(self.dim, low=1.0, high=10.0).float())

    def value(self, y: Tensor, x: Context) -> Tensor:
        """``B``."""
        d = y - x
        return 0.5 * ((d @ self.a.to(d.dtype)) * d).sum(-1)


def quadratic_batches(num: int, size: int = 16) -> list[Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(size, 4, generator=generator) for _ in range(num)]


def semi_model(update: GradientStep, steps: int = 3) -> AmortizedModule:
    torch.manual_seed(0)
    return AmortizedModule(StiffQuadratic(), SemiAmortized(MLP(4, 4, hidden=[16]), steps=steps, update=update))


# --- skipped steps -----------------------------------------------------------------------------------------


def test_skipped_steps_are_logged_and_kept_by_a_checkpoint(tmp_path):
    model = make_model(PoisonedSphere(), nonfinite="skip", max_skipped_share=0.5, skip_window=10)
    trainer = make_trainer(tmp_path, max_steps=6, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=batches_loader(sphere_batches(6, poisoned={1: [0], 3: [2]})))
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = make_model(PoisonedSphere(), nonfinite="skip", max_skipped_share=0.5, skip_window=10)
    resumed.on_load_checkpoint(torch.load(tmp_path / "run.ckpt", weights_only=False))
    assert resumed.skipped_steps == 2, "a resumed run must keep counting its skipped steps"


def test_too_many_skipped_steps_stop_training_with_the_option_to_change(tmp_path):
    model = make_model(PoisonedSphere(), nonfinite="skip", max_skipped_share=0.2, skip_window=10)
    trainer = make_trainer(tmp_path, max_steps=8)
    poisoned = {index: [0] for index in range(8)}
    with pytest.raises(NonFiniteLossError, match=r"3 of the last 10 .*max_skipped_share"):
        trainer.fit(model, train_dataloaders=batches_loader(sphere_batches(8, poisoned=poisoned)))
    assert model.skipped_steps == 3, "more than 20% of a 10-step window is 3 skips: stop at the third"


def test_skips_spread_thinner_than_the_share_train_on(tmp_path):
    model = make_model(PoisonedSphere(), nonfinite="skip", max_skipped_share=0.2, skip_window=10)
    trainer = make_trainer(tmp_path, max_steps=16)
    poisoned = {0: [0], 5: [0], 10: [0], 15: [0]}  # at most 2 (20%) skips in any 10 consecutive steps
    trainer.fit(model, train_dataloaders=batches_loader(sphere_batches(16, poisoned=poisoned)))
    assert model.skipped_steps == 4 and trainer.global_step == 16


@pytest.mark.parametrize(("share", "window"), [(1.5, 100), (-0.1, 100), (0.1, 0)])
def test_a_bad_skip_limit_is_refused(share, window):
    with pytest.raises(ValueError, match="max_skipped_share|skip_window"):
        make_model(nonfinite="skip", max_skipped_share=share, skip_window=window)


# --- the command line: NaN held-out metrics and runs that train nothing ----------------------------------------


class NaNPredictions(AmortizedModule):
    """An AmortizedModule whose held-out predictions are NaN (training is unaffected)."""

    def timed_prediction(self, x: Context) -> tuple[Tensor, float]:
        """NaN predictions ``B x 3``."""
        y, elapsed = super().timed_prediction(x)
        return torch.full_like(y, torch.nan), elapsed


def tiny_recipe(tmp_path: Path, model_class: str = "lightning_amor.AmortizedModule") -> Path:
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {"class_path": model_class, "init_args": {
            "objective": {"class_path": "lightning_amor.apps.sphere.SphereObjective",
                          "init_args": {"grid_points": 256, "starts": 2}},
            "amortizer": {"class_path": "lightning_amor.FullyAmortized", "init_args": {
                "net": {"class_path": "lightning_amor.MLP", "init_args": {"in_features": 16, "out_features": 3}}}},
        }},
        "data": {"class_path": "datamodules.SphereContexts", "init_args": {
            "batch_size": 8, "batches_per_epoch": 4, "val_size": 16, "test_size": 16, "eval_batch_size": 16,
            "cache_dir": str(tmp_path / "cache")}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_nan_held_out_metrics_are_flagged_and_exit_non_zero(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, "tests.test_training_safety.NaNPredictions")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(recipe)])
    assert stopped.value.code == EXIT_NONFINITE_METRICS != 0
    out = capsys.readouterr()
    assert "val/objective" in out.out and "NOT FINITE" in out.out
    assert "the held-out objective is NaN" in out.err and "\n" not in out.err.strip()


def test_finite_held_out_metrics_exit_zero(tmp_path, capsys):
    main(["fit", "--config", str(tiny_recipe(tmp_path))])
    assert "NOT FINITE" not in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--trainer.max_steps=0", "--trainer.max_epochs=0",
                                    "--trainer.limit_train_batches=0"])
def test_settings_that_train_nothing_are_refused_in_one_line(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(tiny_recipe(tmp_path)), option])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert option.split("=")[0].removeprefix("--") in err and "nothing" in err and "\n" not in err
    assert not (tmp_path / "run").exists(), "a refused run writes nothing"


# --- the inner step size -------------------------------------------------------------------------------------


def test_power_iteration_finds_the_lipschitz_constant_of_a_quadratic():
    objective, x = StiffQuadratic(), torch.randn(8, 4)
    estimate = hessian_lipschitz(lambda y: objective(y, x).sum(), torch.zeros(8, 4))
    assert float(estimate) == pytest.approx(10.0, rel=1e-3)


def test_an_auto_step_is_one_over_the_lipschitz_constant_and_kept_by_the_state_dict():
    model = semi_model(GradientStep(lr="auto"))
    model(torch.randn(16, 4))
    assert float(model.amortizer.update.lr) == pytest.approx(0.1, rel=1e-3)
    state = model.state_dict()
    fresh = semi_model(GradientStep(lr="auto"))
    fresh.load_state_dict(state)
    fresh(10 * torch.randn(16, 4))  # a loaded estimate is kept, not re-estimated on other contexts
    assert float(fresh.amortizer.update.lr) == pytest.approx(0.1, rel=1e-3)


def test_the_auto_estimate_leaves_the_global_random_stream_alone():
    model = semi_model(GradientStep(lr="auto"))
    x = torch.randn(16, 4)
    torch.manual_seed(1)
    model(x)
    after_estimate = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after_estimate, torch.rand(1)), "estimating the step must not draw from the global generator"


def test_an_auto_step_trains_where_a_fixed_step_too_large_diverges(tmp_path):
    losses = {}
    for name, update in (("auto", GradientStep(lr="auto")), ("large", GradientStep(lr=0.5, learnable=False))):
        model = semi_model(update, steps=5)
        make_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=batches_loader(quadratic_batches(1)))
        x = quadratic_batches(1)[0]
        losses[name] = float(model.objective(model(x), x).mean())
    assert losses["auto"] < 1.0 < losses["large"]


def test_an_unknown_step_size_name_is_refused():
    with pytest.raises(ValueError, match="'auto'"):
        GradientStep(lr="fast")


def test_inner_f_before_and_after_are_logged_and_a_rise_warns_once(tmp_path):
    model = semi_model(GradientStep(lr=0.5, learnable=False))  # 0.5 > 2/L = 0.2: the steps raise f
    trainer = make_trainer(tmp_path, max_steps=4, log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"raised f on average.*lr='auto'") as record:
        trainer.fit(model, train_dataloaders=batches_loader(quadratic_batches(4)))
    assert sum("raised f on average" in str(w.message) for w in record) == 1, "warn once, not every step"
    metrics = trainer.callback_metrics
    assert float(metrics["train/inner_f_after"]) > float(metrics["train/inner_f_before"])


def test_inner_steps_that_lower_f_do_not_warn(tmp_path):
    model = semi_model(GradientStep(lr="auto"))
    trainer = make_trainer(tmp_path, max_steps=4, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*raised f on average.*")
        trainer.fit(model, train_dataloaders=batches_loader(quadratic_batches(4)))
    metrics = trainer.callback_metrics
    assert float(metrics["train/inner_f_after"]) < float(metrics["train/inner_f_before"])


def test_a_fully_amortized_model_logs_no_inner_f(tmp_path):
    model = AmortizedModule(StiffQuadratic(), FullyAmortized(MLP(4, 4, hidden=[8])))
    trainer = make_trainer(tmp_path, max_steps=2, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=batches_loader(quadratic_batches(2)))
    assert "train/inner_f_before" not in trainer.callback_metrics


def test_a_learned_constant_start_with_an_auto_step_trains(tmp_path):
    model = AmortizedModule(StiffQuadratic(), SemiAmortized(LearnedConstant(4), steps=2, update=GradientStep("auto")))
    make_trainer(tmp_path, max_steps=2).fit(model, train_dataloaders=batches_loader(quadratic_batches(2)))
    assert math.isfinite(float(model.amortizer.update.lr))


# --- the README's first run is clean ----------------------------------------------------------------------


def test_the_default_recipes_fit_warns_of_neither_leafspec_nor_the_logging_interval(tmp_path, recwarn, capsys):
    recipe = REPO / "recipes" / "sphere" / "semi_sum_regression.yaml"
    # The recipe's pool gives 16 training batches per epoch, as the README's run does (16384 / 1024).
    args = [*recipe_args(recipe), *smoke_overrides(recipe, tmp_path), "--data.init_args.batch_size", "4",
            "--trainer.max_steps", "20"]
    main(["fit", *args])
    messages = [str(w.message) for w in recwarn] + capsys.readouterr().err.splitlines()
    assert not [m for m in messages if "LeafSpec" in m or "smaller than the logging interval" in m]
