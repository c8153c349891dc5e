"""Real two-process DDP on CPU (gloo): ranks see distinct contexts, end with identical weights, and
report the same validation metrics as one process on the same validation set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Trainer

from datamodules import SphereContexts
from lightning_amor import MLP, AmortizedModule, FullyAmortized
from lightning_amor.apps.sphere import SphereObjective

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pytorch_lightning import Callback, Trainer, seed_everything
    from datamodules import SphereContexts
    from lightning_amor import MLP, AmortizedModule, FullyAmortized
    from lightning_amor.apps.sphere import SphereObjective

    out, mode = sys.argv[1], sys.argv[2]

    class NaNOnOneRank(SphereObjective):
        # NaN for one context of the third training batch of rank 1 (mode "skip"), finite otherwise.
        def __init__(self):
            super().__init__()
            self.calls = 0
        def value(self, y, x):
            out = super().value(y, x)
            if mode == "skip" and torch.is_grad_enabled() and self.trainer_rank == 1:
                self.calls += 1
                if self.calls == 3:
                    out = out.clone()
                    out[2] = float("nan")
            return out

    class RecordContexts(Callback):
        def __init__(self):
            self.seen = []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(batch["x"].clone())

    seed_everything(0)
    objective = NaNOnOneRank()
    module = AmortizedModule(objective, FullyAmortized(MLP(16, 3, hidden=[32])), nonfinite="skip")
    data = SphereContexts(batch_size=16, batches_per_epoch=3, val_size=50, test_size=50, eval_batch_size=8,
                          cache_dir=out + "/cache")
    record = RecordContexts()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, callbacks=[record],
                      enable_model_summary=False)
    objective.trainer_rank = trainer.global_rank
    trainer.fit(module, data)
    rank = trainer.global_rank
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    torch.save({"state": module.state_dict(), "seen": torch.cat(record.seen), "val": val,
                "skipped": module.skipped_steps, "step": trainer.global_step}, f"{out}/rank{rank}.pt")
    """
)


def _run_ddp(tmp_path: Path, mode: str) -> tuple[dict, dict]:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def test_ddp_skips_a_step_on_every_rank_when_one_rank_has_a_nan(tmp_path: Path) -> None:
    r0, r1 = _run_ddp(tmp_path, "skip")  # a hang here would end in the subprocess timeout
    assert r0["skipped"] == r1["skipped"] == 1
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"rank weights differ in {name}"


def test_ddp_two_processes(tmp_path: Path) -> None:
    r0, r1 = _run_ddp(tmp_path, "plain")

    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), f"rank weights differ in {name}"

    seen0, seen1 = r0["seen"], r1["seen"]
    assert seen0.shape == seen1.shape == (6 * 16, 16)
    assert not (seen0[:, None, :] == seen1[None, :, :]).all(-1).any(), "the ranks drew a common context"

    # The same weights, validated by one process on the same validation set, give the same metrics.
    module = AmortizedModule(SphereObjective(), FullyAmortized(MLP(16, 3, hidden=[32])))
    module.load_state_dict(r0["state"])
    data = SphereContexts(batch_size=16, batches_per_epoch=3, val_size=50, test_size=50, eval_batch_size=8,
                          cache_dir=str(tmp_path / "cache"))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    (single,) = trainer.validate(module, data, verbose=False)
    for key in ("val/objective", "val/gap", "val/distance"):
        assert r0["val"][key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
        assert r1["val"][key] == r0["val"][key]
