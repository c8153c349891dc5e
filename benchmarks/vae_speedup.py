"""How much faster is a VAE's encoder than solving the same posteriors from scratch? (tutorial Fig. 4.1)

For a trained checkpoint of ``recipes/vae/*.yaml`` and a batch of held-out images (the data module's test split),
the common measurements come from the library's evaluation (:func:`lightning_amor.evaluation.evaluate`, as
``lightning-amor evaluate``), run side by side in one process and on one device:

* the encoder (the amortization model λ̂_θ(x); for SA-VAE its K inner steps included): time of one batch under
  ``torch.no_grad``, after warm-up, median of repeats, device synchronised;
* the speed-up at matched quality against Adam from λ = 0 (q = prior) on the batch-mean −ELBO, lr 5e-3, one fresh
  reparameterised sample per image and step as the reference (:class:`FreshNoiseAdam`, what is specific here):
  "same quality" is the first Adam iterate whose batch-mean ELBO, estimated on the objective's fixed evaluation
  noise (which Adam never optimises on), is at least the encoder's; Adam's time is the median of clean runs that
  only read the clock;
* the warm-start saving: Adam's iterations to the recipe's residual tolerance from λ = 0 and from the encoder's λ;
* the amortization gap, against references specific to the VAE: every image's problem solved by SVI from the
  encoder's prediction (Adam on fresh noise with a decaying step, to convergence); the gap is the best mean ELBO
  (SVI's or Adam's after its whole budget) minus the encoder's.

Outputs (under ``--out``): the evaluation's figures ``vae_speedup.png`` (−ELBO against Adam iterations and
seconds, the encoder's level dashed: Fig. 4.1), ``vae_gap.png`` and ``vae_warm_start.png``;
``reconstructions.png`` (the data, the encoder's reconstructions and Adam's after 0/250/500/1000/2000 iterations, as
the reference's sample figure; specific to the VAE), TensorBoard events (``tensorboard/``), and ``results.json`` and
``table.md``.

    python -m benchmarks.vae_speedup --ckpt runs/vae/vae_digits/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from lightning_amor.evaluation import EvaluationReport, evaluate
from lightning_amor.evaluation_figures import log_to_tensorboard, render_figures, save_figures
from lightning_amor.objective import Context, Objective
from lightning_amor.results import write_atomically
from lightning_amor.runtime import evaluation_mode
from lightning_amor.solvers import Adam, Callback, Solver, SolverResult

SNAPSHOTS = (0, 250, 500, 1000, 2000)
QUALITY = (
    "same quality := the first Adam iterate whose batch-mean ELBO is >= the encoder's batch-mean ELBO, both "
    "estimated on the objective's fixed evaluation noise ({samples} reparameterised samples per image) that Adam "
    "never optimises on (Adam draws one fresh sample per image and step, as the reference)"
)


class FreshNoiseAdam(Solver):
    """Adam on the −ELBO drawing ``samples`` fresh reparameterised samples per image and step, at a constant step
    size: the reference's baseline from scratch. (The evaluation scores its iterates on the objective's fixed noise.)

    Args:
        steps: Adam iterations.
        lr: the step size (the reference's 5e-3).
        samples: fresh samples per image and step.
    """

    def __init__(self, steps: int = 3000, lr: float = 5e-3, samples: int = 1) -> None:
        self.steps = steps
        self.lr = lr
        self.samples = samples

    def _solve(self, objective: Objective, x: Context, init: Optional[Tensor],
               callback: Optional[Callback]) -> SolverResult:
        with objective.override_noise(samples=self.samples, fixed=False):
            return Adam(steps=self.steps, lr=self.lr)._solve(objective, x, init, callback)


def load_module(ckpt: str, device: torch.device):
    """The trained module of a checkpoint, in evaluation mode with frozen weights."""
    import lightning_amor.apps.vae  # noqa: F401 - registers VAEModule for the safe checkpoint loader
    from lightning_amor import AmortizedModule

    module = AmortizedModule.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
    module.eval().requires_grad_(False)
    return module.to(device)


def load_data(ckpt: str, root: Optional[str]):
    """The image data module the checkpoint was trained with (class and arguments from the checkpoint)."""
    from datamodules.images import ImageDataModule

    saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    path = saved.get("_class_path")
    if not path or not path.startswith("datamodules."):
        raise SystemExit(f"{ckpt} does not name a data module of this project (found {path!r})")
    module_name, _, class_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
        raise SystemExit(f"{ckpt} was trained on {path}, which is not an image data module")
    args = {k: v for k, v in saved.items() if not k.startswith("_")}
    if root is not None:
        args["root"] = root
    return cls(**args)


def solve_svi(objective, x: Tensor, init: Tensor, steps: int, samples: int, lr: float) -> Tensor:
    """Every image's posterior solved by SVI from ``init``: ``B x 2L``."""
    from lightning_amor.apps.vae import SVI

    return SVI(steps=steps, lr=lr, samples=samples).solve(objective, x, init=init).y


def adam_snapshots(solver: Solver, objective: Objective, x: Tensor, seed: int) -> dict[int, Tensor]:
    """Adam's iterates ``B x 2L`` from λ = 0 at the :data:`SNAPSHOTS` iterations within its budget, on the same
    noise as the evaluated run (the same seed)."""
    saved: dict[int, Tensor] = {}

    def keep(k: int, y: Tensor) -> None:
        if k in SNAPSHOTS:
            saved[k] = y.clone()

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        solver.solve(objective, x, callback=keep)
    return saved


def save_grid(path: Path, grid: Tensor, labels: list[str]) -> None:
    """The reconstruction grid as a PNG with a label per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(grid.shape[2] / 20 + 1.5, grid.shape[1] / 20))
    ax.imshow(1.0 - grid[0], cmap="gray", vmin=0, vmax=1)  # inverted, as the reference's figure
    rows = len(labels)
    ax.set_yticks([(i + 0.5) * grid.shape[1] / rows for i in range(rows)], labels, fontsize=7)
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of a VAE or SA-VAE recipe")
    parser.add_argument("--root", default=None, help="image folder (MNIST), if not the one in the checkpoint")
    parser.add_argument("--batch", type=int, default=1024, help="held-out images (the first of the test split)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam's step size (the reference's 5e-3)")
    parser.add_argument("--iterations", type=int, default=3000, help="Adam's iteration budget")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="residual tolerance of the warm-start saving (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200, help="timed encoder calls")
    parser.add_argument("--adam-repeats", type=int, default=3, help="clean timed Adam runs")
    parser.add_argument("--svi-steps", type=int, default=2000)
    parser.add_argument("--svi-samples", type=int, default=8)
    parser.add_argument("--svi-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="seed of Adam's fresh noise")
    parser.add_argument("--images", type=int, default=15, help="images in the reconstruction figure")
    parser.add_argument("--out", default="runs/vae_speedup", help="folder of the figures, tables and events")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    out = Path(args.out)

    module = load_module(args.ckpt, device)
    objective = module.objective
    data = load_data(args.ckpt, args.root)
    held_out = data.images("test")
    if args.batch > held_out.shape[0]:
        raise SystemExit(
            f"the test split of {type(data).__name__} holds {held_out.shape[0]} images, fewer than --batch "
            f"{args.batch}; lower --batch or train with a larger data.init_args.test_size"
        )
    x = held_out[: args.batch].to(device)

    # the VAE's references: SVI from the encoder's prediction, to convergence
    with evaluation_mode(module), torch.no_grad():
        y_encoder = module(x)
    y_svi = solve_svi(objective, x, y_encoder, args.svi_steps, args.svi_samples, args.svi_lr)

    adam = FreshNoiseAdam(steps=args.iterations, lr=args.lr)
    report = evaluate(module, x, references=y_svi, solver=adam, tolerance=args.tolerance, repeats=args.adam_repeats,
                      warmup=args.warmup, prediction_repeats=args.repeats, seed=args.seed, name="vae")
    results = summarise(report, args, type(data).__name__, list(x.shape[1:]), objective.noise_policy.samples)

    # figures, TensorBoard and tables
    rendered = render_figures(report)
    save_figures(report, out, "vae", rendered)
    with evaluation_mode(module):
        snapshots = adam_snapshots(adam, objective, x[: args.images], args.seed)
    shown = (objective, x[: args.images], y_encoder[: args.images], snapshots)
    grid, labels = reconstruction_grid(*shown)
    save_grid(out / "reconstructions.png", reconstruction_grid(*shown, pad_value=0.0)[0], labels)
    log_to_tensorboard(report, out / "tensorboard", rendered)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_image("vae_speedup/reconstructions", grid, 0)
    write_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(out / "table.md", table(results) + "\n")
    print(table(results))
    print(f"\nfigures: {out / 'vae_speedup.png'}, {out / 'reconstructions.png'}; "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return results


def summarise(report: EvaluationReport, args: argparse.Namespace, data: str, image_shape: list[int],
              samples: int) -> dict:
    """The benchmark's numbers (ELBO = −f) from the evaluation, with its whole summary under ``evaluation``."""
    reached = report.matched_iteration
    encoder_elbo = -report.f_pred
    adam_final = -float(report.scratch.objective[-1].mean())
    svi_mean = -float(report.f_ref.mean())
    gap = max(svi_mean, adam_final) - float(encoder_elbo.mean())
    adam_seconds = report.matched_seconds if reached is not None else float(report.scratch.seconds[-1])
    return {
        "checkpoint": args.ckpt,
        "data": data,
        "images": report.contexts + report.nonfinite,
        "image_shape": image_shape,
        "device": report.device,
        "torch_threads": torch.get_num_threads(),
        "amortizer": report.model.split(" on ")[0],
        "same_quality": QUALITY.format(samples=samples),
        "encoder_ms_median": 1000 * report.prediction_seconds,
        "encoder_elbo_mean": float(encoder_elbo.mean()),
        "encoder_elbo_std": float(encoder_elbo.std()),
        "nonfinite_predictions": report.nonfinite,
        "adam_lr": args.lr,
        "adam_timed_runs": args.adam_repeats,
        "adam_reached_at_iteration": reached,
        "adam_iterations_run": report.scratch.iterations_run,
        "adam_seconds_median": adam_seconds,
        "adam_final_elbo_mean": adam_final,
        "speedup": report.speedup if reached is not None else None,
        "speedup_lower_bound": None if reached is not None else report.speedup,
        "svi_elbo_mean": svi_mean,
        "svi": {"steps": args.svi_steps, "samples": args.svi_samples, "lr": args.svi_lr},
        "amortization_gap": gap,
        "amortization_gap_relative": gap / abs(float(encoder_elbo.mean())),
        "evaluation": report.summary(),
        "curve": {"iterations": report.scratch.iterations.tolist(), "seconds": report.scratch.seconds.tolist(),
                  "elbo_mean": (-report.scratch.objective.mean(1)).tolist()},
    }


def reconstruction_grid(objective, x: Tensor, y_encoder: Tensor, snapshots: dict[int, Tensor], pad_value: float = 1.0):
    """Rows: the data, the encoder's reconstructions, Adam's after each snapshot iteration."""
    from lightning_amor.apps.vae import image_grid

    with torch.no_grad():
        rows = [x, objective.decode_mean(y_encoder, x)]
        labels = ["data", "encoder"]
        for k in sorted(snapshots):
            rows.append(objective.decode_mean(snapshots[k], x))
            labels.append(f"Adam {k}")
    return image_grid([r.cpu() for r in rows], pad_value=pad_value), labels


def table(r: dict) -> str:
    """The results as a Markdown table, with the definition of same quality."""
    reached = r["adam_reached_at_iteration"]
    evaluation = r["evaluation"]
    scratch, warm = evaluation["certified_from_scratch"], evaluation["certified_from_prediction"]
    if reached is not None:
        adam = f"{r['adam_seconds_median']:.3g} s ({reached} iterations)"
        speed = f"{r['speedup']:,.0f}×"
    else:
        adam = f"> {r['adam_seconds_median']:.3g} s (not reached in {r['adam_iterations_run']} iterations)"
        speed = f"> {r['speedup_lower_bound']:,.0f}× (lower bound)"
    lines = [
        f"VAE speed-up: {r['amortizer']} vs Adam from λ = 0 (lr {r['adam_lr']:g}), {r['images']} held-out "
        f"{r['data']} images {tuple(r['image_shape'])}, {r['device']}, {r['torch_threads']} thread(s)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| encoder time (median of repeats) | {r['encoder_ms_median']:.3g} ms |",
        f"| encoder ELBO (mean ± std over images) | {r['encoder_elbo_mean']:.3f} ± {r['encoder_elbo_std']:.2f} |",
        f"| (a) Adam time to the same quality (median of {r['adam_timed_runs']} clean runs) | {adam} |",
        f"| (b) speed-up at the same quality | {speed} |",
        f"| Adam ELBO after {r['adam_iterations_run']} iterations | {r['adam_final_elbo_mean']:.3f} |",
        f"| SVI ELBO from the encoder ({r['svi']['steps']} steps, {r['svi']['samples']} samples) | "
        f"{r['svi_elbo_mean']:.3f} |",
        f"| (d) amortization gap (best solved ELBO − encoder ELBO) | {r['amortization_gap']:.3f} nats "
        f"({100 * r['amortization_gap_relative']:.2f}% of −ELBO) |",
        f"| warm start: Adam iterations to residual ≤ {evaluation['tolerance']:g}, median from λ = 0 / from the "
        f"encoder (reached) | {_median(scratch)} / {_median(warm)} |",
        "",
        r["same_quality"] + ".",
    ]
    if r["nonfinite_predictions"]:
        lines.append(f"warning: {r['nonfinite_predictions']} NaN/inf predictions of the encoder were left out")
    return "\n".join(lines)


def _median(stats: dict) -> str:
    if stats["median"] is None:
        return f"none reached in {stats['iterations_run']} iterations"
    return f"{stats['median']:.0f} ({stats['reached']}/{stats['of']})"


if __name__ == "__main__":
    main()
