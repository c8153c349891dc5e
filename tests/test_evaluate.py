"""``lightning-amor evaluate`` and :mod:`lightning_amor.evaluation`: a problem whose answers are known by hand, the NaN
and not-reached cases, the subcommand on a checkpoint, and every recipe under ``recipes/``.

The hand-computed problem: f(y; x) = ½‖y − x‖² on R^n, a model ŷ = (1 + c)·x, and gradient descent from y⁰ = 0 with
step ½, so that y_k − x = −2^{−k}·x exactly in floating point. Hence f(y_k) = ½·4^{−k}‖x‖² and f(ŷ) = ½c²‖x‖²: the
solver first reaches f(ŷ) (per context and on average) at the first k with 2^{−k} ≤ |c|; the certificate ‖∇f‖ =
‖y − x‖ is 2^{−k}‖x‖ from scratch and 2^{−k}|c|‖x‖ from ŷ, and the distance to the oracle's y* = x is |c|‖x‖.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import Tensor, nn

from lightning_amor import AmortizedModule, Fallback, FullyAmortized, Objective
from lightning_amor.cli import main
from lightning_amor.evaluation import NOT_REACHED, EvaluationError, evaluate, first_reached, with_budget
from lightning_amor.evaluation_figures import FIGURES, save_figures
from lightning_amor.solvers import Adam, GradientDescent
from tests.test_recipes import RECIPES, REPO, recipe_args, smoke_overrides

C = 0.1  # the model's relative error: 2^-k <= 0.1 first at k = 4
STEP = 0.5


class HalfSquaredDistance(Objective):
    """f(y; x) = ½‖y − x‖², minimised by y* = x (the oracle)."""

    dim = 4
    basin_threshold = 1.0

    def value(self, y: Tensor, x: Tensor) -> Tensor:
        return 0.5 * (y - x).pow(2).sum(-1)

    def solve(self, x: Tensor, init: Tensor | None = None) -> Tensor:
        return x.clone()


class Scaled(nn.Module):
    """ŷ = (1 + c)·x, with NaN in the rows whose first entry is negative when ``nan_where_negative``."""

    def __init__(self, c: float, nan_where_negative: bool = False) -> None:
        super().__init__()
        self.c = c
        self.nan_where_negative = nan_where_negative
        self.unused = nn.Parameter(torch.zeros(()))  # a module with a parameter, so it has a device

    def forward(self, x: Tensor) -> Tensor:
        y = (1 + self.c) * x + 0 * self.unused
        if self.nan_where_negative:
            y = torch.where(x[:, :1] < 0, torch.full_like(y, math.nan), y)
        return y


def module(c: float = C, nan_where_negative: bool = False, tolerance: float = 1e-3) -> AmortizedModule:
    return AmortizedModule(
        HalfSquaredDistance(), FullyAmortized(Scaled(c, nan_where_negative)),
        inference=Fallback(solver=GradientDescent(steps=40, lr=STEP), tolerance=tolerance),
    )


def contexts(num: int = 16) -> Tensor:
    return torch.randn(num, 4, generator=torch.Generator().manual_seed(0)) * 3.0


def test_first_reached_finds_the_first_iteration_at_or_below_the_target():
    values = torch.tensor([[5.0, 5.0, math.nan], [3.0, 5.0, math.nan], [1.0, 4.0, math.nan], [2.0, 4.0, math.nan]])
    assert first_reached(values, torch.tensor([3.0, 1.0, 0.0])).tolist() == [1, NOT_REACHED, NOT_REACHED]
    assert first_reached(values, 4.0).tolist() == [1, 2, NOT_REACHED]


def test_the_evaluation_matches_the_hand_computed_answers():
    x = contexts()
    report = evaluate(module(), x, repeats=2, warmup=1)
    norms = x.norm(dim=-1)
    assert report.contexts == 16 and report.nonfinite == 0
    # speed-up at matched quality: mean and per context at k = 4
    assert report.matched_iteration == 4
    assert report.per_context_matched.tolist() == [4] * 16
    assert report.speedup == pytest.approx(report.scratch.seconds_at(4) / report.prediction_seconds)
    assert bool((report.scratch.seconds.diff() >= 0).all())  # the clock only moves forward
    # the gap against the oracle, and the wrong-basin share in the problem's distance
    torch.testing.assert_close(report.gap, 0.5 * C**2 * norms**2)
    torch.testing.assert_close(report.distance, C * norms)
    assert report.wrong_basin_share == pytest.approx(float((C * norms > 1.0).double().mean()))
    assert 0 < report.wrong_basin_share < 1
    # warm-start saving: first k with 2^-k ||x|| <= tol (scratch) and 2^-k c ||x|| <= tol (from ŷ)
    scratch = torch.ceil(torch.log2(norms.double() / 1e-3)).long()
    warm = torch.ceil(torch.log2(C * norms.double() / 1e-3)).long()
    assert report.certified(report.scratch).tolist() == scratch.tolist()
    assert report.certified(report.warm).tolist() == warm.tolist()
    assert report.batch_certified(report.warm) == int(warm.max()) < report.batch_certified(report.scratch)
    summary = report.summary()
    json.dumps(summary)  # serialisable as it is
    assert summary["certified_from_scratch"]["median"] > summary["certified_from_prediction"]["median"]
    assert "4 iterations" in report.table()


def test_nan_predictions_are_counted_and_left_out():
    x = contexts()
    negative = int((x[:, 0] < 0).sum())
    assert 0 < negative < 16
    report = evaluate(module(nan_where_negative=True), x, repeats=1, warmup=0)
    assert report.nonfinite == negative and report.contexts == 16 - negative
    assert report.matched_iteration == 4  # measured on the finite predictions only
    table = report.table()
    assert f"{negative} NaN/inf predictions left out" in table and "nan" not in table.lower().replace("nan/inf", "")
    assert bool(torch.isfinite(report.gap).all())


def test_every_prediction_nan_is_an_error():
    with pytest.raises(EvaluationError, match="all 4 predictions .* NaN"):
        evaluate(module(nan_where_negative=True), -contexts(4).abs(), repeats=1, warmup=0)


def test_a_solver_that_never_reaches_the_quality_is_reported_as_not_reached(tmp_path):
    report = evaluate(module(c=1e-3), contexts(), max_iterations=3, repeats=1, warmup=0)
    assert report.matched_iteration is None and report.matched_seconds is None
    assert report.per_context_matched.tolist() == [NOT_REACHED] * 16
    assert report.batch_certified(report.scratch) is None
    summary = report.summary()
    assert summary["speedup_is_lower_bound"] and summary["matched_iteration"] is None
    table = report.table()
    assert "not reached within 3 iterations" in table and "lower bound" in table
    assert "none reached within 3 iterations" in table
    paths = save_figures(report, tmp_path, "never")
    assert sorted(paths) == sorted(FIGURES) and all(p.stat().st_size > 0 for p in paths.values())


def test_a_budget_is_set_on_the_solver_or_the_solver_it_wraps():
    from lightning_amor.apps.vae import SVI

    svi = SVI(steps=300)
    assert with_budget(svi, 7).adam.steps == 7 and svi.adam.steps == 300
    assert with_budget(Adam(steps=9), None).steps == 9
    with pytest.raises(EvaluationError, match="at least 1"):
        with_budget(Adam(), 0)

    class NoSteps(GradientDescent):
        def __init__(self) -> None:
            self.lr = 0.1

    with pytest.raises(EvaluationError, match="no `steps`"):
        with_budget(NoSteps(), 5)


def test_the_solver_runs_leave_the_callers_random_numbers_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    evaluate(module(), contexts(4), repeats=1, warmup=0)
    assert torch.equal(torch.rand(3), expected)


# --- the subcommand ---------------------------------------------------------------------------------------------

SPHERE = REPO / "recipes" / "sphere" / "semi_sum_regression.yaml"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from an empty folder, as the console script would."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    return tmp_path


def fast(tmp_path, name: str) -> list[str]:
    return ["--contexts", "8", "--max-iterations", "4", "--repeats", "1", "--warmup", "0", "--name", name,
            "--out", str(tmp_path / "figures"), "--results", str(tmp_path / "RESULTS.md")]


def test_the_subcommand_evaluates_a_checkpoint_with_and_without_its_recipe(in_tmp, capsys):
    tmp_path = in_tmp
    overrides = smoke_overrides(SPHERE, tmp_path)
    main(["fit", *recipe_args(SPHERE), *overrides, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_checkpointing", "true"])
    ckpt = max(tmp_path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## Evaluation: sphere\nold\n\n## Other\nkept\n")
    capsys.readouterr()

    main(["evaluate", *recipe_args(SPHERE), "--ckpt", str(ckpt), *overrides, *fast(tmp_path, "sphere")])
    out = capsys.readouterr().out
    assert f"weights of {ckpt}" in out and "speed-up at matched quality" in out and "wrong-basin share" in out
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.count("## Evaluation: sphere") == 1 and "old" not in results and "## Other\nkept" in results
    assert "| speed-up at matched quality |" in results and "evaluate --config" in results
    for name in FIGURES:
        assert (tmp_path / "figures" / f"sphere_{name}.png").stat().st_size > 0
    assert list((tmp_path / "figures" / "tensorboard" / "sphere").glob("events.out.tfevents.*"))
    numbers = json.loads((tmp_path / "figures" / "sphere_evaluation.json").read_text())
    assert numbers["contexts"] + numbers["nonfinite_predictions"] == 8 and numbers["solver"].startswith("LBFGS")

    # the checkpoint alone: the recipe and data module stored in it; another solver by name
    main(["evaluate", "--ckpt", str(ckpt), "--solver", "adam", "--solver-args", '{"lr": 0.05}',
          *fast(tmp_path, "from_ckpt")])
    numbers = json.loads((tmp_path / "figures" / "from_ckpt_evaluation.json").read_text())
    assert numbers["solver"].startswith("Adam(steps=4,") and "lr=0.05" in numbers["solver"]
    assert numbers["mean_f_prediction"] == pytest.approx(
        json.loads((tmp_path / "figures" / "sphere_evaluation.json").read_text())["mean_f_prediction"])


@pytest.mark.parametrize(("args", "message"), [
    (["--ckpt", "missing.ckpt"], "missing.ckpt does not exist"),
    (["--config", "missing.yaml"], "the recipe missing.yaml does not exist"),
    (["--config", str(SPHERE), "--solver", "newton"], "--solver newton: not `recipe`"),
    (["--config", str(SPHERE), "--solver", "adam", "--solver-args", "{lr: 1}"], "--solver-args is not JSON"),
    ([], "nothing to evaluate"),
    (["--data.init_args.test_size", "8"], "need a recipe"),
])
def test_bad_arguments_end_with_a_one_line_error(args, message, in_tmp, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-amor evaluate: error: ") and message in err[-1], err


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_recipe_evaluates(recipe, in_tmp, capsys):
    tmp_path = in_tmp
    main(["evaluate", *recipe_args(recipe), *smoke_overrides(recipe, tmp_path), *fast(tmp_path, recipe.stem)])
    out = capsys.readouterr().out
    assert "speed-up at matched quality" in out, out
    numbers = json.loads((tmp_path / "figures" / f"{recipe.stem}_evaluation.json").read_text())
    assert numbers["contexts"] + numbers["nonfinite_predictions"] == 8
    assert f"## Evaluation: {recipe.stem}" in (tmp_path / "RESULTS.md").read_text()
