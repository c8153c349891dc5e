"""A context's answer never depends on the other contexts in its batch: :class:`~lightning_amor.Fallback` and
``lightning-amor solve`` give each context of a batch the solution and status it gets when solved alone, with or
without a NaN row in the batch; and the default tolerance is one the dtype can reach.

BLAS picks its kernels (and so its summation orders) by the shape of a product, so a float32 network's prediction
for one context differs in its last bits between a batch of 1, 3 or 9; a float32 solver stopped by rounding turns
such differences into answers 1e-4 apart. Calls of a fixed shape make every context's arithmetic the same.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from datamodules import SphereContexts
from lightning_amor import MLP, AmortizedModule, Fallback, FullyAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.calibration import calibrate
from lightning_amor.cli import main
from lightning_amor.fallback import DEFAULT_TOLERANCES, default_tolerance
from lightning_amor.solvers import LBFGS

NAN_ROW = 3


def sphere_module(dtype: torch.dtype = torch.float32) -> AmortizedModule:
    """An untrained sphere amortizer: its predictions are poor, so the solver refines almost every context."""
    torch.manual_seed(0)
    module = AmortizedModule(SphereObjective(grid_points=256, starts=2), FullyAmortized(MLP(16, 3, hidden=[32])))
    return module.to(dtype).eval()


def contexts(num: int = 9, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return SphereContexts().sample(num, torch.Generator().manual_seed(7)).to(dtype)


def with_nan_row(x: torch.Tensor) -> torch.Tensor:
    nan = torch.full_like(x[:1], math.nan)
    return torch.cat([x[:NAN_ROW], nan, x[NAN_ROW:]])


def assert_same_answers(batch, alone, rows) -> None:
    """Rows ``rows`` of the batch's result equal the results of the contexts solved one by one."""
    for row, single in zip(rows, alone, strict=True):
        assert batch.status[row] == single.status[0], (row, batch.status[row], single.status[0])
        assert batch.reason[row] == single.reason[0]
        torch.testing.assert_close(batch.y[row], single.y[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.residual[row], single.residual[0], rtol=1e-6, atol=1e-9)
        assert bool(batch.converged[row]) == bool(single.converged[0])
        assert int(batch.iterations[row]) == int(single.iterations[0])


@pytest.mark.parametrize("tolerance", [None, 1e-5])
def test_fallback_solves_each_context_of_a_batch_as_it_solves_it_alone(tolerance):
    """With a tolerance float32 reaches (the default) and with one it cannot (the solver stops on rounding)."""
    module = sphere_module()
    x = contexts()
    policy = Fallback(tolerance=tolerance, batch_size=16)
    alone = [policy(module, x[i:i + 1]) for i in range(len(x))]
    batch = policy(module, x)
    assert batch.counts()["refined"] >= 8
    assert_same_answers(batch, alone, range(len(x)))
    nan = policy(module, with_nan_row(x))
    assert nan.status[NAN_ROW] == "failed" and "NaN" in nan.reason[NAN_ROW]
    assert_same_answers(nan, alone, [i if i < NAN_ROW else i + 1 for i in range(len(x))])


def test_the_answer_does_not_depend_on_the_chunking_nor_on_the_out_of_distribution_check():
    module = sphere_module()
    calibration = calibrate(module, SphereContexts().sample(256, torch.Generator().manual_seed(1)))
    x = contexts(20)
    x[5, 12:] = 30.0  # far outside the training offsets: falls back to the oracle
    whole = Fallback(batch_size=8)(module, x, calibration=calibration)
    assert whole.status[5] == "fell_back" and whole.counts()["refined"] >= 10
    alone = [Fallback(batch_size=8)(module, x[i:i + 1], calibration=calibration) for i in range(len(x))]
    assert_same_answers(whole, alone, range(len(x)))
    torch.testing.assert_close(whole.context_distance, torch.cat([a.context_distance for a in alone]))


def test_the_default_tolerance_follows_the_dtype_and_is_reached():
    assert DEFAULT_TOLERANCES[torch.float64] == 1e-4 and DEFAULT_TOLERANCES[torch.float32] == 1e-3
    assert default_tolerance(torch.float16) > default_tolerance(torch.float32) > default_tolerance(torch.float64)
    for dtype in (torch.float32, torch.float64):
        result = Fallback()(sphere_module(dtype), contexts(32, dtype))
        assert result.tolerance == DEFAULT_TOLERANCES[dtype]
        assert bool(result.converged.all()), result.summary()
    explicit = Fallback(tolerance=1e-5)
    assert explicit.tolerance_for(torch.float32) == 1e-5 and explicit.solver.tol == pytest.approx(1e-6)
    assert Fallback().replace(ood_margin=2.0).tolerance is None, "replace keeps the dtype-aware default"
    assert isinstance(Fallback().solver, LBFGS)


RECIPE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 5
  val_check_interval: 5
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {dirpath: checkpoints, filename: best, monitor: val/objective, mode: min}
model:
  class_path: lightning_amor.AmortizedModule
  init_args:
    objective:
      class_path: lightning_amor.apps.sphere.SphereObjective
      init_args: {grid_points: 256, starts: 2}
    amortizer:
      class_path: lightning_amor.FullyAmortized
      init_args:
        net:
          class_path: lightning_amor.MLP
          init_args: {in_features: 16, out_features: 3, hidden: [32]}
data:
  class_path: datamodules.SphereContexts
  init_args: {batch_size: 64, batches_per_epoch: 5, val_size: 64, test_size: 8, cache_dir: cache}
"""


def test_the_solve_command_answers_each_context_as_it_answers_it_alone(tmp_path, capsys):
    """The recipe sets no inference policy: the defaults (tolerance by the dtype) are used."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr(sys, "argv", ["lightning-amor"])
        patch.setenv("LIGHTNING_AMOR_CACHE", str(tmp_path / "cache"))
        main(["fit", "--config", "recipe.yaml"])
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    x = contexts()

    def solve(batch: torch.Tensor, name: str) -> dict:
        torch.save(batch, tmp_path / f"{name}.pt")
        main(["solve", "--ckpt", str(ckpt), "--contexts", str(tmp_path / f"{name}.pt"), "--out",
              str(tmp_path / f"{name}_out.pt")])
        return torch.load(tmp_path / f"{name}_out.pt", weights_only=True)

    whole, nan = solve(x, "whole"), solve(with_nan_row(x), "nan")
    alone = [solve(x[i:i + 1], f"alone{i}") for i in range(len(x))]
    assert "tolerance 0.001;" in capsys.readouterr().out
    assert whole["tolerance"] == 1e-3 and nan["status"][NAN_ROW] == "failed"
    for i, single in enumerate(alone):
        for result, row in ((whole, i), (nan, i if i < NAN_ROW else i + 1)):
            assert result["status"][row] == single["status"][0] and bool(result["converged"][row])
            torch.testing.assert_close(result["y"][row], single["y"][0], rtol=0, atol=1e-6)
