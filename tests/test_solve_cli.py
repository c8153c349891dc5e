"""Tests of ``lightning-amor solve``, run in-process on a checkpoint of a real (short) ``lightning-amor fit``:
contexts from .npy, .pt and .csv files, the written certificates, the summary, the fallback, and clear errors for
unusable files."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import SphereContexts
from lightning_amor.cli import main
from lightning_amor.inference import CALIBRATION_KEY
from lightning_amor.loading import load_module

TOLERANCE = 1e-3

RECIPE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 20
  val_check_interval: 20
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint  # after the validation: calibrated
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
    inference:
      class_path: lightning_amor.Fallback
      init_args:
        tolerance: 1.0e-3
        solver:
          class_path: lightning_amor.solvers.LBFGS
          init_args: {steps: 200, tol: 1.0e-4}
data:
  class_path: datamodules.SphereContexts
  init_args: {batch_size: 64, batches_per_epoch: 20, val_size: 64, test_size: 8, cache_dir: cache}
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The folder of one short ``lightning-amor fit`` of a small sphere recipe, with its checkpoints."""
    folder = tmp_path_factory.mktemp("solve")
    (folder / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(sys, "argv", ["lightning-amor"])
        patch.setenv("LIGHTNING_AMOR_CACHE", str(folder / "cache"))
        main(["fit", "--config", "recipe.yaml"])
    assert (folder / "checkpoints" / "best.ckpt").is_file()
    return folder


@pytest.fixture()
def contexts(tmp_path) -> torch.Tensor:
    """10 sphere contexts; context 3 has a NaN."""
    x = SphereContexts().sample(10, torch.Generator().manual_seed(7))
    x[3, 5] = math.nan
    return x


def solve(*args: str) -> None:
    main(["solve", *map(str, args)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_solve_reads_npy_pt_and_csv_and_writes_every_format(fitted, contexts, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "best.ckpt"
    np.save(tmp_path / "x.npy", contexts.numpy())
    torch.save(contexts, tmp_path / "x.pt")
    header = ",".join(f"x{j}" for j in range(16))
    np.savetxt(tmp_path / "x.csv", contexts.numpy(), delimiter=",", header=header, comments="")

    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.npy", "--out", tmp_path / "out.csv")
    out = capsys.readouterr().out
    assert "10 contexts; tolerance 0.001" in out and "failed:                                 1" in out
    assert "context 3 failed: the context holds NaN" in out and "wrote 10 rows" in out
    rows = read_csv(tmp_path / "out.csv")
    assert len(rows) == 10 and list(rows[0])[:4] == ["y_0", "y_1", "y_2", "value"]
    assert rows[3]["status"] == "failed" and "NaN" in rows[3]["reason"] and rows[3]["y_0"] == "nan"
    for i, row in enumerate(rows):
        if i != 3:
            assert row["status"] in ("amortized", "refined", "fell_back") and row["converged"] == "true", row
            assert float(row["residual"]) <= TOLERANCE and row["feasible"] == "true"

    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "out.pt")
    from_pt = torch.load(tmp_path / "out.pt", weights_only=True)
    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.csv", "--out", tmp_path / "out.npy")
    from_csv = np.load(tmp_path / "out.npy", allow_pickle=False)
    capsys.readouterr()

    y_csv = np.array([[float(row[f"y_{j}"]) for j in range(3)] for row in rows])
    np.testing.assert_allclose(from_pt["y"].numpy(), y_csv, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.stack([from_csv[f"y_{j}"] for j in range(3)], 1), y_csv, rtol=1e-5, atol=1e-6)
    assert from_pt["status"] == [row["status"] for row in rows] == list(from_csv["status"])
    assert list(from_csv["reason"])[3].startswith("the context holds NaN")
    assert from_pt["tolerance"] == TOLERANCE and from_pt["threshold"] > TOLERANCE
    # the certificate is that of the written solution: f at y, on the sphere
    y = from_pt["y"][[0, 1, 2, 4]]
    value = load_module(ckpt).objective(y, contexts[[0, 1, 2, 4]])
    torch.testing.assert_close(from_pt["value"][[0, 1, 2, 4]], value.detach())
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(4))


def test_the_threshold_stored_by_fit_routes_contexts_to_the_oracle(fitted, contexts, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    module = load_module(ckpt)
    assert module.inference.tolerance == TOLERANCE, "the recipe's option is stored with the model"
    torch.testing.assert_close(module.calibration.quantiles, saved[CALIBRATION_KEY]["quantiles"].double())
    torch.save(contexts, tmp_path / "x.pt")
    # the median of the validation residuals as the threshold: about half of the contexts fall back
    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "out.pt", "--ood_quantile", "0.5",
          "--ood_margin", "1")
    capsys.readouterr()
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["threshold"] == pytest.approx(max(module.calibration.quantile(0.5), TOLERANCE))
    fell_back = [s == "fell_back" for s in result["status"]]
    assert result["distance_threshold"] == pytest.approx(module.calibration.distance_quantile(0.5))
    ood = ((result["ood_score"] > result["threshold"])
           | (result["context_distance"] > result["distance_threshold"])).tolist()
    assert any(fell_back) and fell_back == [o and i != 3 for i, o in enumerate(ood)]
    assert result["fell_back"].tolist() == fell_back and all(result["iterations"][fell_back] == -1)
    assert bool((result["residual"][fell_back] <= TOLERANCE).all())


def test_a_context_far_outside_p_x_falls_back_even_where_its_prediction_looks_fine(fitted, tmp_path, capsys):
    """Offsets α far above the training range [0, 0.7]: the model still returns some point, but the context's
    distance to the validation contexts flags it, and the objective's oracle solves it from scratch."""
    ckpt = fitted / "checkpoints" / "best.ckpt"
    x = SphereContexts().sample(8, torch.Generator().manual_seed(11))
    x[5, 12:] = torch.tensor([20.0, 0.0, 40.0, 10.0])
    torch.save(x, tmp_path / "x.pt")
    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "out.pt")
    capsys.readouterr()
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    module = load_module(ckpt)
    assert result["distance_threshold"] == pytest.approx(3.0 * module.calibration.distance_quantile(0.99))
    assert result["status"][5] == "fell_back" and bool(result["ood"][5]) and int(result["iterations"][5]) == -1
    assert float(result["context_distance"][5]) > result["distance_threshold"]
    assert float(result["residual"][5]) <= TOLERANCE
    torch.testing.assert_close(result["y"][5], module.objective.solve(x[5:6])[0])
    others = [i for i in range(8) if i != 5]
    assert not result["ood"][others].any() and all(result["status"][i] != "fell_back" for i in others)
    assert bool((result["context_distance"][others] <= result["distance_threshold"]).all())


def test_options_override_the_recipe(fitted, contexts, tmp_path, capsys):
    torch.save(contexts, tmp_path / "x.pt")
    solve("--ckpt", fitted / "checkpoints" / "best.ckpt", "--contexts", tmp_path / "x.pt", "--out",
          tmp_path / "out.pt", "--no-refine", "--no-fallback", "--tolerance", "1e-9", "--batch-size", "3")
    out = capsys.readouterr().out
    assert "tolerance 1e-09; out-of-distribution threshold on the residual none" in out
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["status"] == ["amortized"] * 3 + ["failed"] + ["amortized"] * 6
    assert not result["converged"].any() and (result["iterations"] == 0).all()
    assert all("above the tolerance 1e-09" in result["reason"][i] for i in (0, 1, 2, 4))


def test_a_checkpoint_without_calibration_is_calibrated_on_the_validation_split(fitted, contexts, tmp_path, capsys):
    saved = torch.load(fitted / "checkpoints" / "best.ckpt", weights_only=True)
    del saved[CALIBRATION_KEY]  # as in a checkpoint of an older version
    ckpt = tmp_path / "old.ckpt"
    torch.save(saved, ckpt)
    np.save(tmp_path / "x.npy", contexts.numpy())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(fitted)  # the recipe's cache folder is relative
        solve("--ckpt", ckpt, "--contexts", tmp_path / "x.npy")
    captured = capsys.readouterr()
    assert "calibrated on the 64 validation contexts of its data module" in captured.err
    assert "threshold on the residual none" not in captured.out and "nothing written" in captured.out

    solve("--ckpt", ckpt, "--contexts", tmp_path / "x.npy", "--no-calibrate")
    captured = capsys.readouterr()
    assert "out-of-distribution detection is off" in captured.err and "threshold on the residual none" in captured.out

    # a calibration of other weights (a last.ckpt saved between two validations) is measured again
    saved[CALIBRATION_KEY] = {**torch.load(fitted / "checkpoints" / "best.ckpt")[CALIBRATION_KEY], "step": 5}
    torch.save(saved, ckpt)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(fitted)
        solve("--ckpt", ckpt, "--contexts", tmp_path / "x.npy")
    assert "was calibrated at step 5, not on its own weights; calibrated on the 64" in capsys.readouterr().err


def run_failing(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        solve(*args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unusable_context_files_give_clear_errors(fitted, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "best.ckpt"
    row = ",".join(["0.5"] * 16)
    (tmp_path / "word.csv").write_text("\n".join([",".join(f"c{j}" for j in range(16)), row,
                                                  row.replace("0.5", "abc", 1), row]) + "\n")
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "word.csv")
    assert "word.csv, line 3, column 1 ('c0'): 'abc', not a number" in err

    (tmp_path / "empty_cell.csv").write_text(row + "\n" + row.replace("0.5", "", 1) + "\n")
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "empty_cell.csv")
    assert "line 2, column 1: an empty cell" in err

    (tmp_path / "ragged.csv").write_text(row + "\n" + row + ",0.5\n")
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "ragged.csv")
    assert "line 2: 17 cells, but the first row has 16" in err

    (tmp_path / "narrow.csv").write_text(",".join(["0.5"] * 15) + "\n")
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "narrow.csv")
    assert "15 numbers per context" in err and "the model expects 16" in err

    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "missing.npy")
    assert "missing.npy does not exist" in err
    err = run_failing(capsys, "--ckpt", tmp_path / "missing.ckpt", "--contexts", tmp_path / "narrow.csv")
    assert "missing.ckpt does not exist" in err
    (tmp_path / "x.txt").write_text(row)
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "x.txt")
    assert "unknown format '.txt'" in err
    np.save(tmp_path / "x.npy", np.zeros((2, 16)))
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "x.npy", "--out", tmp_path / "out.json")
    assert "unknown format '.json'" in err
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "words.npy")
    assert "holds <U1 values (text)" in err and "real numbers" in err
    np.save(tmp_path / "complex.npy", np.zeros((2, 16), dtype=np.complex64))
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "complex.npy")
    assert "complex" in err
    torch.save({"a": 1}, tmp_path / "bad.pt")
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "bad.pt")
    assert "holds a dict" in err and "N x ... tensor" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        solve("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--ckpt", "--contexts", "--out", "--tolerance", "--no-refine", "--no-fallback", "--ood_quantile",
                   "--ood_margin", "--ood_threshold", "--no-calibrate", "--batch_size", "--device"):
        assert option in out, option


def test_an_unusable_out_path_is_refused_before_any_work(fitted, contexts, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "best.ckpt"
    torch.save(contexts, tmp_path / "x.pt")
    (tmp_path / "a_file").write_text("not a folder")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        solve("--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "a_file" / "y.csv")
    captured = capsys.readouterr()
    assert "cannot be written" in captured.err and "a_file" in captured.err
    assert "contexts;" not in captured.out  # refused before solving: no summary was printed
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "x.pt")
    assert "is the contexts file itself" in err
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True).nan_to_num(), contexts.nan_to_num())
    (tmp_path / "folder.csv").mkdir()
    err = run_failing(capsys, "--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / "folder.csv")
    assert "is a directory" in err


def test_results_are_written_atomically(fitted, contexts, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "best.ckpt"
    torch.save(contexts, tmp_path / "x.pt")
    for suffix in (".csv", ".npy", ".pt"):
        solve("--ckpt", ckpt, "--contexts", tmp_path / "x.pt", "--out", tmp_path / f"out{suffix}")
        assert (tmp_path / f"out{suffix}").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
