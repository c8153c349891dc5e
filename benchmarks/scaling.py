"""Lightning's per-step overhead against a hand-written PyTorch loop, and throughput of 1 vs 2 DDP processes.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --recipe recipes/sphere/full_objective.yaml --steps 300

Both loops train the recipe's own model on the recipe's own data stream (the same batches, drawn by the
data module's dataset in both) with the recipe's optimizer; the hand-written loop does exactly the
math of `AmortizedModule.training_step` and `optimizer_step` (forward, loss, finiteness checks of the
loss and the gradients, backward, step) and nothing else. Step time is measured after a warm-up, from
the first timed step's start to the last one's end. The DDP part launches the recipe with
`--trainer.devices 2 --trainer.strategy ddp` on the CPU (gloo) and compares contexts per second with
one process.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.context import ContextDataModule  # noqa: E402
from lightning_amor.cli import PROGRESS_REFRESH, AmortCLI  # noqa: E402
from lightning_amor.commands.recipes import recipe_configs  # noqa: E402
from lightning_amor.module import AmortizedModule, unpack_batch  # noqa: E402


class StepTimer(Callback):
    """Wall time of training steps ``warmup .. warmup+timed-1``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.count = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.end = time.perf_counter()
            self.count += 1


def config_args(recipe: str) -> list[str]:
    """The ``--config`` arguments that run ``recipe`` (the shared trainer settings first, as its comment says)."""
    return [arg for config in recipe_configs(Path(recipe)) for arg in ("--config", str(config))]


def build(recipe: str, overrides: list[str]) -> tuple[AmortizedModule, ContextDataModule, dict]:
    cli = AmortCLI(
        AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[*config_args(recipe), *overrides], auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule, cli.config.as_dict()


def lightning_step_ms(module, data, steps: int, warmup: int, lean: bool, root: Path) -> float:
    timer = StepTimer(warmup)
    # as `lightning-amor` runs a recipe: its progress bar (PROGRESS_REFRESH) and the TensorBoard logger
    callbacks = [timer] if lean else [timer, TQDMProgressBar(refresh_rate=PROGRESS_REFRESH)]
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
        enable_progress_bar=not lean, logger=not lean, log_every_n_steps=50,
    )
    trainer.fit(module, data)
    return 1000.0 * (timer.end - timer.start) / timer.count


def plain_step_ms(module: AmortizedModule, data: ContextDataModule, steps: int, warmup: int) -> float:
    """The same steps without Lightning: the data module's batches, the module's amortizer, loss and optimizer."""
    data.attach(module.objective, module.needs_target)
    data.setup("fit")
    loader = data.train_dataloader()
    optimizer = module.optimizer(module.parameters())
    batches = iter(loader)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        x, y_star = unpack_batch(batch)
        output = module.amortizer(x, module.objective)
        per_context = module.loss(output, x, module.objective, y_star)
        if not bool(torch.isfinite(per_context).all()):
            raise FloatingPointError("non-finite loss")
        loss = per_context.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not module._gradients_finite():  # the module's own check, so both loops do the same work
            raise FloatingPointError("non-finite gradient")
        optimizer.step()
    return 1000.0 * (time.perf_counter() - start) / steps


def ddp_throughput(recipe: str, devices: int, steps: int, batch: int, root: Path) -> float:
    """Contexts per second of a `lightning-amor fit` run with ``devices`` CPU processes (timed in-process)."""
    script = root / "ddp_probe.py"
    script.write_text(
        "import sys, time\n"
        "from pytorch_lightning import Callback\n"
        "from lightning_amor.cli import main\n"
        "class T(Callback):\n"
        "    def on_train_batch_start(self, tr, m, b, i):\n"
        "        if tr.global_step == 20: self.t0 = time.perf_counter()\n"
        "    def on_train_end(self, tr, m):\n"
        "        if tr.is_global_zero: print('ELAPSED', time.perf_counter() - self.t0, tr.global_step - 20)\n"
        "main(sys.argv[1:])\n"
    )
    args = [
        sys.executable, str(script), "fit", *config_args(recipe), "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.max_steps", str(20 + steps), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks",
        "__main__.T", "--trainer.default_root_dir", str(root), "--data.init_args.batch_size", str(batch),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ELAPSED")), None)
    if line is None:
        raise RuntimeError(f"the {devices}-process run failed:\n{out.stderr[-3000:]}")
    _, elapsed, done = line.split()
    return int(done) * batch * devices / float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes/sphere/full_objective.yaml"))
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each loop (median taken)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--root", default="runs/benchmarks/scaling")
    args = parser.parse_args()
    args.recipe = str(Path(args.recipe).resolve())
    torch.set_num_threads(1)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    overrides = ["--data.init_args.batch_size", str(args.batch_size), "--data.init_args.cache_dir", str(root / "cache")]
    module, data, _ = build(args.recipe, overrides)
    initial = copy.deepcopy(module.state_dict())

    plain, lean, full = [], [], []
    for _ in tqdm(range(args.repeats), desc="repeats (plain, lean, full loops)", unit="repeat"):
        module.load_state_dict(initial)
        plain.append(plain_step_ms(module, data, args.steps, args.warmup))
        module.load_state_dict(initial)
        lean.append(lightning_step_ms(module, data, args.steps, args.warmup, lean=True, root=root))
        module.load_state_dict(initial)
        full.append(lightning_step_ms(module, data, args.steps, args.warmup, lean=False, root=root))
    med = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    p, lo, fu = med(plain), med(lean), med(full)
    rows = [
        ("hand-written PyTorch loop", p, "—"),
        ("Lightning, no logger/progress bar", lo, f"{100 * (lo - p) / lo:.1f}%"),
        ("Lightning as `lightning-amor` runs it (TensorBoard, progress bar)", fu, f"{100 * (fu - p) / fu:.1f}%"),
    ]
    print(f"\nrecipe {args.recipe}, batch {args.batch_size}, {args.steps} timed steps, median of {args.repeats}")
    print("| loop | ms per step | Lightning overhead (share of its step time) |")
    print("|---|---|---|")
    for name, ms, share in rows:
        print(f"| {name} | {ms:.2f} | {share} |")

    if not args.skip_ddp:
        one = ddp_throughput(args.recipe, 1, args.steps, args.batch_size, root)
        two = ddp_throughput(args.recipe, 2, args.steps, args.batch_size, root)
        print("\n| processes | contexts per second | speed-up |")
        print("|---|---|---|")
        print(f"| 1 | {one:,.0f} | 1.00 |")
        print(f"| 2 (DDP, gloo) | {two:,.0f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
