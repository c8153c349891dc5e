"""Export to TorchScript and ONNX: round trips against eager, the CLI on a real `fit` checkpoint, and errors."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest
import torch
from torch import nn

from datamodules import DigitsImages, SphereContexts
from lightning_amor import MLP, AdamStep, AmortizedModule, FullyAmortized, GradientStep, SemiAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.apps.vae import ELBOObjective, SemiAmortizedVI, VAEModule
from lightning_amor.cli import main
from lightning_amor.export import (
    FORMATS,
    SUFFIXES,
    ExportedAmortizer,
    ExportError,
    ExportMismatchError,
    check_export,
    export,
    export_onnx,
    export_torchscript,
)
from tests.test_recipes import recipe_args

REPO = Path(__file__).resolve().parents[1]
CHECK_SIZES = (1, 5, 300)  # none of them the export's batch of 8


def sphere_contexts(num: int = 300) -> torch.Tensor:
    """Held-out sphere contexts ``num x 16``: the data module's seeded test split."""
    return SphereContexts().fixed_set("test", num, with_targets=False)["x"]


def sphere_module(semi: bool) -> AmortizedModule:
    torch.manual_seed(0)
    net = MLP(16, 3, hidden=[32, 32])
    amortizer = SemiAmortized(net, steps=2, update=GradientStep(0.5)) if semi else FullyAmortized(net)
    return AmortizedModule(SphereObjective(grid_points=64, starts=1), amortizer).eval()


def vae_module(semi: bool = False, fixed_noise: str = "eval") -> VAEModule:
    torch.manual_seed(0)
    objective = ELBOObjective(MLP(4, 64, hidden=[32]), latent_dim=4, eval_samples=4, fixed_noise=fixed_noise)
    encoder = MLP(64, 8, hidden=[32])
    amortizer = SemiAmortizedVI(encoder, steps=2, update=AdamStep(0.01)) if semi else FullyAmortized(encoder)
    return VAEModule(objective, amortizer).eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", ["sphere_full", "sphere_semi", "vae_encoder"])
def test_round_trip_dynamic_batch(model, fmt, tmp_path):
    """Exported with a batch of 8, the file agrees with eager to 1e-5 at batches 1, 5 and 300 of held-out contexts."""
    if model == "vae_encoder":
        module, contexts = vae_module(), DigitsImages(test_size=300).fixed_set("test", 300, with_targets=False)["x"]
    else:
        module, contexts = sphere_module(semi=model == "sphere_semi"), sphere_contexts()
    path = export(module, tmp_path / f"model{SUFFIXES[fmt]}", contexts[:8], fmt)
    error = check_export(path, module, contexts, atol=1e-5, batch_sizes=CHECK_SIZES)
    assert 0 <= error <= 1e-5
    exported = ExportedAmortizer(path)
    assert exported.batch is None and exported.metadata["solution_dim"] == module.objective.dim
    y = exported.predict(contexts[:300])
    assert y.shape == (300, module.objective.dim) and torch.isfinite(y).all()


def test_semi_amortized_export_runs_the_inner_steps(tmp_path):
    """The exported semi-amortized model reproduces the refined iterate, not just the initial network's guess."""
    module, contexts = sphere_module(semi=True), sphere_contexts(64)
    path = export_torchscript(module, tmp_path / "semi.pt", contexts[:8])
    with torch.no_grad():
        first = module.objective.project(module.amortizer.init(contexts))
        refined = module(contexts)
    assert (refined - first).abs().max() > 1e-3  # the two inner steps move the prediction
    torch.testing.assert_close(ExportedAmortizer(path).predict(contexts), refined, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_export_detects_a_changed_model(fmt, tmp_path):
    module, contexts = sphere_module(semi=False), sphere_contexts(64)
    path = export(module, tmp_path / f"model{SUFFIXES[fmt]}", contexts[:8], fmt)
    assert check_export(path, module, contexts) <= 1e-5
    with torch.no_grad():
        module.amortizer.net.layers[0].weight[0, 0] += 0.5
    with pytest.raises(ExportMismatchError, match=r"differs from the eager AmortizedModule by .* > atol=1e-05"):
        check_export(path, module, contexts)


def test_dict_contexts_are_refused_clearly(tmp_path):
    module, contexts = sphere_module(semi=False), sphere_contexts(8)
    with pytest.raises(ExportError, match="only tensor contexts can be exported.*got a dict"):
        export_torchscript(module, tmp_path / "m.pt", {"x": contexts})
    path = export_torchscript(module, tmp_path / "m.pt", contexts)
    with pytest.raises(ExportError, match="only tensor contexts"):
        check_export(path, module, {"x": contexts})


def test_exported_torchscript_checks_its_input(tmp_path):
    module, contexts = sphere_module(semi=False), sphere_contexts(8)
    scripted = torch.jit.load(str(export_torchscript(module, tmp_path / "m.pt", contexts)))
    with pytest.raises(Exception, match=r"takes contexts of shape \(B, 16\), got \[8, 12\]"):
        scripted(contexts[:, :12])


@pytest.mark.parametrize("fmt", FORMATS)
def test_sa_vae_exports_with_a_dynamic_batch(fmt, tmp_path):
    """SA-VAE's eval noise is one seeded draw shared by the batch: the exported inner SVI steps match eager at any
    batch size, and a fixed-batch export still works where a batch size is wanted."""
    module = vae_module(semi=True)
    images = DigitsImages(test_size=300).fixed_set("test", 300, with_targets=False)["x"]
    path = export(module, tmp_path / f"savae{SUFFIXES[fmt]}", images[:8], fmt)
    assert check_export(path, module, images, batch_sizes=CHECK_SIZES) <= 1e-5
    fixed = export(module, tmp_path / f"savae16{SUFFIXES[fmt]}", images[:16], fmt, dynamic_batch=False)
    assert check_export(fixed, module, images[:48], batch_sizes=(16,)) <= 1e-5
    if fmt == "torchscript":
        with pytest.raises(Exception, match="fixed batch size 16"):
            torch.jit.load(str(fixed))(images[:3])


class SeededJitter(nn.Module):
    """A net that adds seeded noise drawn for the whole batch: its values depend on the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(0))
        return self.linear(x) + 0.01 * noise


def test_seeded_draws_that_depend_on_the_batch_need_a_fixed_batch(tmp_path):
    module = AmortizedModule(SphereObjective(grid_points=64, starts=1), FullyAmortized(SeededJitter())).eval()
    contexts = sphere_contexts(32)
    with pytest.raises(ExportError, match="depend on the batch size.*--static-batch"):
        export_torchscript(module, tmp_path / "m.pt", contexts[:16])
    path = export_torchscript(module, tmp_path / "m.pt", contexts[:16], dynamic_batch=False)
    assert check_export(path, module, contexts, batch_sizes=(16,)) <= 1e-5


def test_fresh_random_draws_are_refused(tmp_path):
    """With fixed_noise='never', the eval prediction draws from the global generator: not exportable."""
    module = vae_module(semi=True, fixed_noise="never")
    images = DigitsImages().fixed_set("test", 8, with_targets=False)["x"]
    with pytest.raises(ExportError, match="draws fresh random numbers in eval mode"):
        export_onnx(module, tmp_path / "m.onnx", images)


@pytest.fixture(scope="module")
def fit_checkpoint(tmp_path_factory):
    """A real `lightning-amor fit` of the default recipe, shrunk to 10 steps and a few dozen contexts."""
    root = tmp_path_factory.mktemp("fit")
    patch = pytest.MonkeyPatch()
    patch.chdir(root)  # the recipe writes runs/... relative to the working directory
    patch.setenv("LIGHTNING_AMOR_CACHE", str(root / "cache"))
    patch.setattr("sys.argv", ["lightning-amor"])
    try:
        main([
            "fit", *recipe_args(REPO / "recipes" / "sphere" / "semi_sum_regression.yaml"),
            "--trainer.max_steps=10", "--trainer.val_check_interval=10", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            "--model.init_args.lr_scheduler.init_args.T_max=10",
            "--model.init_args.objective.init_args.grid_points=256", "--model.init_args.objective.init_args.starts=2",
            "--data.init_args.batch_size=32", "--data.init_args.train_size=64", "--data.init_args.val_size=32",
            "--data.init_args.test_size=32",
        ])
    finally:
        patch.undo()
    checkpoints = sorted((root / "runs" / "sphere" / "semi_sum_regression" / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the fit wrote no checkpoint"
    return checkpoints[0]


def test_cli_exports_and_checks_a_fit_checkpoint(fit_checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(fit_checkpoint), "--out", str(out), "--check-batch-sizes", "1", "3", "40"])
    printed = capsys.readouterr().out
    assert "SemiAmortized on SphereObjective" in printed
    for fmt in FORMATS:
        path = out / f"amortizer{SUFFIXES[fmt]}"
        assert path.is_file() and f"wrote {path} ({fmt}" in printed
    assert printed.count("max |exported - eager| = ") == 2 and "on batches [1, 3, 40]" in printed
    x = sphere_contexts(5).numpy()
    session = onnxruntime.InferenceSession(str(out / "amortizer.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    torch.testing.assert_close(torch.from_numpy(y), torch.jit.load(str(out / "amortizer.pt"))(torch.from_numpy(x)),
                               atol=1e-5, rtol=0)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # a bad checkpoint is bad input: exit status 2
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)])
    assert exited.value.code == 2 and "lightning-amor export: error: " in capsys.readouterr().err
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exited:
        main(["export", "--ckpt", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path)])
    assert exited.value.code == 2 and "is not a PyTorch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # jsonargparse: an unknown format is a usage error
        main(["export", "--ckpt", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path), "--format", "tflite"])


def test_a_wrong_dtype_is_named_not_numbered(tmp_path):
    module, x = sphere_module(semi=False), sphere_contexts(16)
    exported = ExportedAmortizer(export_torchscript(module, tmp_path / "a.pt", x[:8]))
    with pytest.raises(ValueError, match=r"takes float32 contexts, got float64; convert them first") as info:
        exported.predict(x.double())
    assert "Traceback" not in str(info.value)
