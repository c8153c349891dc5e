"""Tests of amortize-then-refine inference (lightning_amor.inference): certificates against hand computations,
refinement to the tolerance, the out-of-distribution fallback, per-context failures, and the calibration that
validation stores in checkpoints.

The model is real and trained here: a small MLP amortizing the quadratic f(y; x) = ½ (y − x)ᵀ A (y − x) (y* = x)
on contexts x ~ N(0, I), through a Trainer with a validation at its last step.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from datamodules import ContextDataModule, SphereContexts
from lightning_amor import MLP, AmortizedModule, Calibration, Fallback, FullyAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.inference import CALIBRATION_KEY, calibrate, certify, prediction_residuals, stationarity_residual
from lightning_amor.objective import Context
from lightning_amor.solvers import LBFGS, SolverResult
from tests.objectives import BoxQuadratic, Quadratic

TOL = 1e-4


class GaussianContexts(ContextDataModule):
    """x ~ N(0, I) in R^4."""

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        return torch.randn(num, 4, generator=generator)


def quadratic_module() -> AmortizedModule:
    torch.manual_seed(0)
    return AmortizedModule(Quadratic(), FullyAmortized(MLP(4, 4, hidden=[32])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quadratic amortizer trained for 150 steps, calibrated by its validation, and its checkpoint."""
    folder = tmp_path_factory.mktemp("inference")
    model = quadratic_module()
    data = GaussianContexts(batch_size=64, batches_per_epoch=150, val_size=256, test_size=16,
                            cache_dir=str(folder / "cache"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=150, val_check_interval=150, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=folder,
    )
    trainer.fit(model, data)
    checkpoint = folder / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    model.eval()
    return model, data, checkpoint


def in_distribution(num: int, seed: int = 1) -> Tensor:
    return torch.randn(num, 4, generator=torch.Generator().manual_seed(seed))


# --- certificates ------------------------------------------------------------------------------------------------


def test_certificate_of_the_quadratic_equals_the_closed_form():
    objective = Quadratic()
    x, y = in_distribution(5), in_distribution(5, seed=2)
    value, residual, violation = certify(objective, y, x)
    d = (y - x).double()
    a = objective.a.double()
    torch.testing.assert_close(value.double(), 0.5 * ((d @ a) * d).sum(-1), rtol=1e-5, atol=1e-6)
    # on R^n the residual is the gradient norm ‖A (y − x)‖
    torch.testing.assert_close(residual.double(), (d @ a).norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(violation, torch.zeros(5))


def test_certificate_on_a_box_is_the_projected_gradient_residual_with_dict_contexts():
    objective = BoxQuadratic()
    x = {"center": torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.4, 0.5]]), "scale": torch.tensor([1.0, 0.5])}
    y = torch.tensor([[1.0, 0.0, 0.5], [0.9, 0.1, 0.2]])
    _, residual, _ = certify(objective, y, x)
    gradient = x["scale"][:, None] * (y - x["center"])
    expected = (y - (y - gradient).clamp(0.0, 1.0)).norm(dim=-1)
    torch.testing.assert_close(residual, expected)
    # the first point is the box-constrained minimizer: its gradient is not zero, its residual is
    assert float(gradient[0].norm()) > 1.0 and float(residual[0]) == 0.0


def test_sphere_residual_matches_finite_differences():
    objective = SphereObjective().double()
    x = SphereContexts().sample(4, torch.Generator().manual_seed(3)).double()
    y = objective.project(torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    step = 1e-6
    gradient = torch.stack([
        (objective.value(y + step * e, x) - objective.value(y - step * e, x)) / (2 * step)
        for e in torch.eye(3, dtype=torch.float64)
    ], dim=-1)
    expected = (y - objective.project(y - gradient)).norm(dim=-1)
    torch.testing.assert_close(stationarity_residual(objective, y, x), expected, rtol=1e-6, atol=1e-8)


# --- refine and fall back ------------------------------------------------------------------------------------------


def test_predictions_above_the_tolerance_are_refined_to_it(trained):
    model, _, _ = trained
    x = in_distribution(64)
    before = prediction_residuals(model, x)
    assert bool((before > TOL).any()), "the model is too good for this test: no prediction needs refining"

    result = Fallback(tolerance=TOL)(model, x)
    assert len(result) == 64 and set(result.status) <= {"amortized", "refined"}, result.summary()
    refined = torch.tensor([s == "refined" for s in result.status])
    assert torch.equal(refined, before > TOL) and torch.equal(result.refined, refined)
    assert bool((result.residual <= TOL).all()) and bool(result.converged.all())
    assert bool((result.iterations[refined] > 0).all()) and bool((result.iterations[~refined] == 0).all())
    torch.testing.assert_close(result.y, x, atol=1e-3, rtol=0)  # y*(x) = x
    # the certificate columns are those of the returned solutions
    value, residual, _ = certify(model.objective, result.y, x)
    torch.testing.assert_close(result.value, value)
    torch.testing.assert_close(result.residual, residual)
    torch.testing.assert_close(result.ood_score, before)


def test_a_context_far_outside_the_training_distribution_falls_back(trained):
    model, _, _ = trained
    policy = Fallback(tolerance=TOL)
    threshold = policy.threshold(model.calibration)
    assert threshold == pytest.approx(max(3.0 * model.calibration.quantile(0.99), TOL))
    x = torch.cat([in_distribution(8), torch.full((1, 4), 1000.0), in_distribution(8, seed=5)])

    result = policy(model, x)
    assert result.threshold == pytest.approx(threshold)
    assert result.status[8] == "fell_back" and bool(result.fell_back[8]) and bool(result.ood[8])
    assert not bool(result.refined[8]) and float(result.ood_score[8]) > threshold
    assert int(result.iterations[8]) == -1, "the objective's oracle solved it"
    torch.testing.assert_close(result.y[8], x[8])
    assert float(result.residual[8]) <= TOL
    others = [i for i in range(17) if i != 8]
    assert not bool(result.fell_back[others].any()) and not bool(result.ood[others].any())
    assert result.counts()["fell_back"] == 1 and result.counts()["failed"] == 0

    # with an explicit solver from scratch instead of the oracle; and with fallback off it is refined instead
    scratch = Fallback(tolerance=TOL, from_scratch_solver=LBFGS(steps=100, tol=1e-6))(model, x)
    assert scratch.status[8] == "fell_back" and int(scratch.iterations[8]) > 0
    assert float(scratch.residual[8]) <= TOL
    no_fallback = Fallback(tolerance=TOL, fallback=False)(model, x)
    assert no_fallback.status[8] == "refined" and not bool(no_fallback.fell_back.any())
    assert no_fallback.threshold is None and not bool(no_fallback.ood[8])


def test_nan_and_inf_contexts_are_reported_by_index_while_the_others_are_solved(trained):
    model, _, _ = trained
    x = in_distribution(6)
    x[2, 1] = math.nan
    x[4, 3] = math.inf
    result = Fallback(tolerance=TOL)(model, x)
    assert len(result) == 6
    assert [i for i, _ in result.failures()] == [2, 4]
    assert "NaN or infinite" in result.reason[2] and "position(s) 1" in result.reason[2]
    assert "position(s) 3" in result.reason[4]
    assert bool(torch.isnan(result.y[[2, 4]]).all()) and not bool(result.converged[[2, 4]].any())
    ok = [0, 1, 3, 5]
    assert bool(result.converged[ok].all()) and all(result.status[i] in ("amortized", "refined") for i in ok)
    assert "context 2 failed" in result.summary() and "failed:                                 2" in result.summary()


class PickyQuadratic(Quadratic):
    """The quadratic, but it raises for contexts whose first coordinate exceeds 50 (a user objective's bug)."""

    def value(self, y: Tensor, x: Context) -> Tensor:
        if bool((x[:, 0] > 50).any()):
            raise ValueError("cannot evaluate contexts with x_0 > 50")
        return super().value(y, x)


class PickyLBFGS(LBFGS):
    """L-BFGS that raises for contexts whose second coordinate exceeds 2.5."""

    def solve(self, objective, x, init=None, callback=None) -> SolverResult:
        if bool((x[:, 1] > 2.5).any()):
            raise RuntimeError("the solver diverged")
        return super().solve(objective, x, init, callback)


def test_a_context_on_which_the_objective_or_the_solver_raises_fails_alone(trained):
    model, _, _ = trained
    picky = AmortizedModule(PickyQuadratic(), model.amortizer).eval()
    x = in_distribution(9)
    x[3, 0] = 60.0  # the objective raises on it
    x[6, 1] = 3.0  # the solver raises on it (its prediction needs refining: a context at the edge of p(x))
    x[6, 0] = 0.0
    result = Fallback(solver=PickyLBFGS(steps=200, tol=1e-6), tolerance=1e-6, fallback=False)(picky, x)
    assert [i for i, _ in result.failures()] == [3, 6]
    assert "the model or the objective raised" in result.reason[3] and "x_0 > 50" in result.reason[3]
    assert "solver started from the prediction raised" in result.reason[6] and "diverged" in result.reason[6]
    assert all(result.status[i] != "failed" for i in (0, 1, 2, 4, 5, 7, 8))


def test_without_refinement_predictions_are_only_certified(trained):
    model, _, _ = trained
    x = in_distribution(32)
    result = Fallback(tolerance=TOL, refine=False, fallback=False)(model, x)
    assert result.status == ["amortized"] * 32 and bool((result.iterations == 0).all())
    torch.testing.assert_close(result.y, model(x).detach())
    above = result.residual > TOL
    assert bool(above.any()) and torch.equal(result.converged, ~above)
    assert all(("above the tolerance" in r) == bool(a) for r, a in zip(result.reason, above, strict=True))


def test_a_dict_context_model_with_a_box_domain():
    class CentreNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MLP(4, 3, hidden=[8])

        def forward(self, x: dict[str, Tensor]) -> Tensor:
            return self.mlp(torch.cat([x["center"], x["scale"][:, None]], dim=1))

    torch.manual_seed(0)
    model = AmortizedModule(BoxQuadratic(), FullyAmortized(CentreNet())).eval()
    generator = torch.Generator().manual_seed(0)
    x = {"center": 2.0 * torch.randn(6, 3, generator=generator), "scale": 0.5 + torch.rand(6, generator=generator)}
    x["scale"][1] = math.nan
    result = Fallback(tolerance=1e-5)(model, x)
    assert result.failures()[0][0] == 1 and "'scale'" in result.reason[1]
    ok = [0, 2, 3, 4, 5]
    assert bool(result.converged[ok].all()), result.summary()
    torch.testing.assert_close(result.y[ok], x["center"][ok].clamp(0.0, 1.0), atol=1e-4, rtol=0)
    assert result.threshold is None, "an uncalibrated model flags nothing as out of distribution"


# --- calibration ------------------------------------------------------------------------------------------------


def test_validation_calibrates_on_the_validation_residuals(trained):
    model, data, _ = trained
    calibration = model.calibration
    assert calibration is not None and calibration.count == 256 and calibration.step == 150
    again = calibrate(model, data._sets["val"]["x"])
    torch.testing.assert_close(again.quantiles, calibration.quantiles, rtol=1e-5, atol=1e-7)
    residuals = prediction_residuals(model, data._sets["val"]["x"]).double()
    assert calibration.quantile(0.5) == pytest.approx(float(residuals.median()), rel=1e-3)
    assert calibration.quantile(1.0) == pytest.approx(float(residuals.max()), rel=1e-5)


def test_the_calibration_survives_a_checkpoint_round_trip(trained, tmp_path):
    model, _, checkpoint = trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved[CALIBRATION_KEY]["step"] == saved["global_step"] == 150

    loaded = AmortizedModule.load_from_checkpoint(
        checkpoint, objective=Quadratic(), amortizer=FullyAmortized(MLP(4, 4, hidden=[32])))
    assert loaded.calibration is not None and loaded.calibration.matches_weights
    torch.testing.assert_close(loaded.calibration.quantiles, model.calibration.quantiles, rtol=0, atol=0)
    assert Fallback().threshold(loaded.calibration) == Fallback().threshold(model.calibration)

    # a checkpoint of an older version has no calibration: it loads, and nothing is flagged
    del saved[CALIBRATION_KEY]
    torch.save(saved, tmp_path / "old.ckpt")
    old = AmortizedModule.load_from_checkpoint(
        tmp_path / "old.ckpt", objective=Quadratic(), amortizer=FullyAmortized(MLP(4, 4, hidden=[32])))
    assert old.calibration is None

    # a calibration of other weights (a last.ckpt saved between validations) is marked and warned about
    saved[CALIBRATION_KEY] = {**model.calibration.to_dict(), "step": 100}
    torch.save(saved, tmp_path / "stale.ckpt")
    stale = AmortizedModule.load_from_checkpoint(
        tmp_path / "stale.ckpt", objective=Quadratic(), amortizer=FullyAmortized(MLP(4, 4, hidden=[32])))
    assert not stale.calibration.matches_weights
    with pytest.warns(UserWarning, match="calibration was measured at step 100"):
        Fallback(tolerance=TOL)(stale, in_distribution(4))


def test_calibration_quantiles_interpolate_and_reject_bad_input():
    calibration = Calibration.from_residuals(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, math.nan]), step=7)
    assert (calibration.count, calibration.nonfinite, calibration.step) == (5, 1, 7)
    assert calibration.quantile(0.0) == 1.0 and calibration.quantile(1.0) == 5.0
    assert calibration.quantile(0.5) == pytest.approx(3.0) and calibration.quantile(0.125) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="none of which is finite"):
        Calibration.from_residuals(torch.tensor([math.nan, math.inf]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration.quantile(1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tolerance": 0.0}, "tolerance must be positive"), ({"ood_quantile": 0.0}, "ood_quantile"),
     ({"ood_margin": 0.5}, "ood_margin must be at least 1"), ({"batch_size": 0}, "batch_size"),
     ({"solver": "lbfgs"}, "solver must be a Solver")],
)
def test_bad_policy_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Fallback(**kwargs)


def test_replace_keeps_the_rest_and_a_default_solver_follows_the_tolerance():
    policy = Fallback(tolerance=1e-3, ood_margin=2.0)
    changed = policy.replace(tolerance=1e-5, refine=False)
    assert (changed.tolerance, changed.ood_margin, changed.refine) == (1e-5, 2.0, False)
    assert changed.solver.tol == pytest.approx(1e-6)
    custom = Fallback(solver=LBFGS(steps=5, tol=0.5)).replace(tolerance=1e-5)
    assert custom.solver.tol == 0.5 and custom.solver.steps == 5
    with pytest.raises(TypeError, match="unknown argument"):
        policy.replace(tolerence=1.0)


def test_contexts_of_the_wrong_width_are_each_reported_not_raised(trained):
    model, _, _ = trained
    result = Fallback(tolerance=TOL)(model, torch.zeros(5, 3))
    assert result.status == ["failed"] * 5 and len(result.failures()) == 5
    assert all(r.startswith("the model or the objective raised on this context: ValueError: MLP expects inputs with "
                            "4 features") for r in result.reason), result.reason
