"""How much faster is a VAE's encoder than solving the same posteriors from scratch? (tutorial Fig. 4.1)

For trained checkpoints of ``recipes/vae/*.yaml`` and a batch of held-out images (the first ``--batch`` images of
the data module's test split: 1024 fixed-binarised Fashion-MNIST test images for ``vae_fashion``), the common
measurements come from the library's evaluation (:func:`lightning_amor.evaluation.evaluate`, as
``lightning-amor evaluate``), run side by side in one process and on one device:

* the encoder (the amortization model λ̂_θ(x); for SA-VAE its K inner steps included), eager: time of one batch
  under ``torch.no_grad``, after warm-up, median of repeats, device synchronised;
* the same encoder through the files the project exports (:mod:`lightning_amor.export`: TorchScript and ONNX
  Runtime, each checked against eager on the batch), timed in interleaved rounds with eager (so the shared
  machine's load affects all alike), median of the rounds;
* the speed-up at matched quality against Adam from λ = 0 (q = prior) on the batch-mean −ELBO, lr 5e-3, one
  fresh reparameterised sample per image and step as the reference (:class:`FreshNoiseAdam`, what is specific here):
  "same quality" is the first Adam iterate whose batch-mean ELBO, estimated on the objective's fixed evaluation
  noise (which Adam never optimises on), is at least the encoder's; Adam's time is the median of clean runs that
  only read the clock; the ratio is given for eager and for each exported file;
* where Adam ends after its budget (``--iterations``, 2000 for Fashion-MNIST), against the encoder and against
  SVI from the encoder;
* the warm-start saving: Adam's iterations to the recipe's residual tolerance from λ = 0 and from the encoder's λ;
* the amortization gap, against references specific to the VAE: every image's problem solved by SVI from the
  encoder's prediction (Adam on fresh noise with a decaying step, to convergence); the gap is the best mean ELBO
  (SVI's or Adam's after its whole budget) minus the encoder's.

Outputs (under ``--out``, one subfolder per checkpoint when there are several): the evaluation's figures
``vae_speedup.png`` (−ELBO against Adam iterations and seconds, the encoder's level dashed: Fig. 4.1),
``vae_gap.png`` and ``vae_warm_start.png``; ``elbo_time.png`` (the ELBO against seconds on a log axis, with the
encoder's eager and exported times marked); ``reconstructions.png`` (the data, the encoder's reconstructions and
Adam's after 0/250/500/1000/2000 iterations, as the reference's sample figure); ``prior_samples.png`` and, for a
2-D latent, ``latent_traversal.png`` (:mod:`lightning_amor.apps.vae_pictures`); TensorBoard events
(``tensorboard/``), ``results.json`` and ``table.md``. For Fashion-MNIST data the section
"VAE: Fashion-MNIST speed-up" of ``benchmarks/RESULTS.md`` is rewritten and the figures are copied to
``benchmarks/figures/<run>_*.png`` (``--section``/``--figures`` choose otherwise); ``--quick`` is a tiny run that
writes to a temporary folder only.

    python -m benchmarks.vae_speedup --ckpt runs/vae/vae_digits/checkpoints/last.ckpt
    OMP_NUM_THREADS=1 python -m benchmarks.vae_speedup --iterations 2000 \
        --ckpt runs/vae/vae_fashion/checkpoints/last.ckpt runs/vae/savae_fashion/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from benchmarks.results import cpu_name, write_section
from lightning_amor.apps.vae import image_grid
from lightning_amor.apps.vae_pictures import run_name
from lightning_amor.evaluation import EvaluationReport, evaluate, synchronize
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
FASHION_SECTION = "## VAE: Fashion-MNIST speed-up"
TARGET = 1e4
"""The issue's target speed-up at matched quality (Fashion-MNIST, this CPU)."""
FORMATS = ("torchscript", "onnx")
FIGURES = ("elbo_time", "speedup", "reconstructions", "prior_samples", "latent_traversal")
"""Figures copied to ``--figures`` as ``<run>_<name>.png`` (``speedup``: the evaluation's Fig. 4.1)."""


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


class _Stop(Exception):
    """Raised by :func:`adam_until`'s callback to end Adam's run early."""


def adam_until(objective, x: Tensor, target: float, seconds: float, lr: float, seed: int,
               check_every: int = 50) -> dict:
    """Adam from λ = 0 as :class:`FreshNoiseAdam` (lr ``lr``, the seed's fresh noise), run until its batch-mean ELBO on
    the objective's fixed noise reaches ``target`` or its own time (the scoring excluded) reaches ``seconds``: every
    ``check_every`` iterations the ELBO is scored and the clock paused. Returns the iterations run, Adam's seconds,
    whether it reached, and the ``(iteration, seconds, ELBO)`` checks."""
    checks: list[tuple[int, float, float]] = []
    clock = {"adam": 0.0, "since": time.perf_counter()}

    def check(k: int, y: Tensor) -> None:
        if k == 0 or k % check_every:
            return
        synchronize(y.device)  # Adam's queued work is Adam's time, not the scoring's
        clock["adam"] += time.perf_counter() - clock["since"]
        with torch.no_grad():
            elbo = -float(objective(y, x).mean())
        checks.append((k, clock["adam"], elbo))
        clock["since"] = time.perf_counter()
        if elbo >= target or clock["adam"] >= seconds:
            raise _Stop

    with evaluation_mode(objective), torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            clock["since"] = time.perf_counter()
            FreshNoiseAdam(steps=10**9, lr=lr).solve(objective, x, callback=check)
        except _Stop:
            pass
    k, spent, elbo = checks[-1]
    return {"iterations": k, "seconds": spent, "elbo": elbo, "reached": elbo >= target, "checks": checks,
            "target_elbo": target, "seconds_budget": seconds}


def same_load_ratio(module, x: Tensor, exported: dict, lr: float, rounds: int = 30, steps: int = 10) -> dict:
    """Adam's time per iteration over the encoder's time, measured in the same interleaved rounds (one call of each
    encoder, then ``steps`` Adam iterations from λ = 0, per round; medians over ``rounds`` after 3 warm-up rounds), so
    that a shared machine's changing load cancels out of the ratio. Returns the medians (seconds) and the ratios."""
    runs = {"eager": lambda: module.timed_prediction(x)}
    for fmt, (file, _) in exported.items():
        runs[fmt] = lambda file=file: file.predict(x)
    adam = FreshNoiseAdam(steps=steps, lr=lr)
    times: dict[str, list[float]] = {name: [] for name in [*runs, "adam_iteration"]}
    with evaluation_mode(module), torch.random.fork_rng():
        for _ in range(3 + rounds):
            for name, run in runs.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    run()
                    synchronize(x.device)
                    times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            adam.solve(module.objective, x)
            synchronize(x.device)
            times["adam_iteration"].append((time.perf_counter() - start) / steps)
    median = {name: statistics.median(t[3:]) for name, t in times.items()}
    return {"seconds": median, "iteration_over_encoder": {k: median["adam_iteration"] / median[k] for k in runs}}


def beyond_budget(module, x: Tensor, results: dict, seed: int) -> dict:
    """Where Adam's budget ended short of the encoder's ELBO: run Adam on until 10⁴ × the slowest encoder time
    (:data:`TARGET`) or until it reaches the encoder, and say for each encoder time whether the speed-up at matched
    quality is at least 10⁴ (Adam had not reached it by 10⁴ × that time). Adds ``beyond`` to ``results``."""
    times = results["encoder_seconds_interleaved"]
    run = adam_until(module.objective, x, results["encoder_elbo_mean"], TARGET * max(times.values()),
                     results["adam_lr"], seed)
    reached_at = run["seconds"] if run["reached"] else math.inf
    run["target_met"] = {kind: reached_at > TARGET * s and run["seconds"] >= TARGET * s for kind, s in times.items()}
    results["beyond"] = run
    return run


def add_same_load(module, x: Tensor, results: dict, exported: dict) -> None:
    """Add :func:`same_load_ratio` to ``results`` (``same_load``)."""
    results["same_load"] = same_load_ratio(module, x, exported, results["adam_lr"])


def export_encoder(module, x: Tensor, folder: Path, formats: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """Export the encoder (``module``'s eval-mode prediction, dynamic batch) in each format under ``folder`` with
    :func:`lightning_amor.export.export`, and check every file against eager on ``x``: the loaded
    :class:`~lightning_amor.export.ExportedAmortizer` and the largest |exported − eager| by format, and the reason
    by format for those that could not be exported (e.g. ONNX without onnxruntime)."""
    from lightning_amor.export import SUFFIXES, ExportedAmortizer, ExportError, check_export, export

    loaded, failed = {}, {}
    for fmt in formats:
        try:
            path = export(module, folder / f"encoder{SUFFIXES[fmt]}", x[:8], fmt)
            error = check_export(path, module, x, math.inf, batch_sizes=[x.shape[0]])
        except ExportError as err:
            failed[fmt] = str(err).splitlines()[0]
            continue
        loaded[fmt] = (ExportedAmortizer(path), error)
    return loaded, failed


def time_encoders(module, x: Tensor, exported: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of one prediction of the batch ``x``, eager (``module.timed_prediction`` under
    ``torch.no_grad``) and by each exported file, in ``repeats`` interleaved rounds after ``warmup`` rounds."""
    runs = {"eager": lambda: module.timed_prediction(x)}
    for fmt, (file, _) in exported.items():
        runs[fmt] = lambda file=file: file.predict(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with evaluation_mode(module), torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                synchronize(x.device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, nargs="+", help="checkpoints of VAE or SA-VAE recipes")
    parser.add_argument("--root", default=None, help="image folder (MNIST), if not the one in the checkpoint")
    parser.add_argument("--batch", type=int, default=1024, help="held-out images (the first of the test split)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam's step size (the reference's 5e-3)")
    parser.add_argument("--iterations", type=int, default=3000, help="Adam's iteration budget")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="residual tolerance of the warm-start saving (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200, help="timed encoder calls (eager and each export)")
    parser.add_argument("--adam-repeats", type=int, default=3, help="clean timed Adam runs")
    parser.add_argument("--svi-steps", type=int, default=2000)
    parser.add_argument("--svi-samples", type=int, default=8)
    parser.add_argument("--svi-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="seed of Adam's fresh noise")
    parser.add_argument("--images", type=int, default=15, help="images in the reconstruction figure")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS,
                        help="exported files to time next to eager (none: eager only)")
    parser.add_argument("--out", default="runs/vae_speedup", help="folder of the figures, tables and events")
    parser.add_argument("--section", default=None,
                        help="the RESULTS.md section (a '## ' title) to rewrite (default: "
                             f"'{FASHION_SECTION[3:]}' for Fashion-MNIST data, none otherwise)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"),
                        help="the markdown file of --section")
    parser.add_argument("--figures", default=None,
                        help="folder the figures are copied to as <run>_<name>.png (default: benchmarks/figures when "
                             "a section is written, none otherwise)")
    parser.add_argument("--beyond", action="store_true",
                        help="where Adam does not reach the encoder's ELBO within --iterations, run it on from λ = 0 "
                             "until 10⁴ × the slowest encoder time (the target) or until it does")
    parser.add_argument("--include", nargs="*", default=[], metavar="RESULTS_JSON",
                        help="results.json files of earlier runs of this benchmark whose rows the section keeps "
                             "(one checkpoint per run, measured at another time)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (64 images, 60 iterations, few repeats) into a temporary folder only")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.iterations, args.svi_steps = min(args.batch, 64), min(args.iterations, 60), 10
        args.warmup, args.repeats, args.adam_repeats, args.images = 1, 3, 1, min(args.images, 4)
        args.out = tempfile.mkdtemp(prefix="vae_speedup_quick_")
        args.section = args.figures = None
        args.beyond = False
    if min(args.batch, args.iterations, args.repeats, args.adam_repeats, args.images) < 1 or args.warmup < 0:
        parser.error("--batch, --iterations, --repeats, --adam-repeats and --images must be at least 1, --warmup >= 0")
    if args.section is not None and not args.section.startswith("## "):
        args.section = f"## {args.section}"
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark on every ``--ckpt``; returns the results of the one checkpoint, or ``{"runs": [...]}`` (one
    entry per checkpoint, in order) when there are several."""
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    out = Path(args.out)
    names = [run_name(c) for c in args.ckpt]
    if len(set(names)) < len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    started = time.perf_counter()
    runs = []
    for ckpt, name in zip(args.ckpt, names, strict=True):
        folder = out if len(args.ckpt) == 1 else out / name
        before, begun = _load_average()[0], time.perf_counter()
        runs.append(run_checkpoint(ckpt, name, args, device, folder))
        runs[-1]["wall_seconds"] = time.perf_counter() - begun
        runs[-1]["command"] = command(args, ckpt, folder)
        runs[-1]["date"] = datetime.date.today().isoformat()
        runs[-1]["load_average"] = [before, _load_average()[0]]
        write_atomically(folder / "results.json", json.dumps(runs[-1], indent=2) + "\n")
    for path in args.include:
        earlier = json.loads(Path(path).read_text())
        if "encoder_seconds_interleaved" not in earlier:
            raise SystemExit(f"{path} is not a results.json of this benchmark's current version; rerun it")
        runs.append(earlier)
    quick = args.quick
    fashion = all("Fashion" in r["data"] for r in runs)
    section = args.section or (FASHION_SECTION if fashion and not quick else None)
    figures = args.figures or (str(Path(__file__).resolve().parent / "figures") if section else None)
    if figures:
        for r, name in zip(runs[: len(names)], names, strict=True):  # included runs copied theirs
            for figure in FIGURES:
                source = Path(r["outputs"][figure]) if figure in r["outputs"] else None
                if source is not None and source.is_file():
                    Path(figures).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, Path(figures) / f"{name}_{figure}.png")
    if section:
        text = results_section(section, runs, args, time.perf_counter() - started, figures)
        write_section(args.results, section, text)
        print(f"\nwrote the section {section[3:]!r} of {args.results}")
    return runs[0] if len(runs) == 1 else {"runs": runs}


def run_checkpoint(ckpt: str, name: str, args: argparse.Namespace, device: torch.device, out: Path) -> dict:
    """The benchmark on one checkpoint, its outputs under ``out``; returns its results (also ``results.json``)."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_amor.apps.vae_pictures import VAEPictures, save_grid_png

    module = load_module(ckpt, device)
    objective = module.objective
    data = load_data(ckpt, args.root)
    held_out = data.images("test")
    if args.batch > held_out.shape[0]:
        raise SystemExit(
            f"the test split of {type(data).__name__} holds {held_out.shape[0]} images, fewer than --batch "
            f"{args.batch}; lower --batch or train with a larger data.init_args.test_size"
        )
    x = held_out[: args.batch].to(device)

    # the encoder through the exported files, checked against eager, and all timed in interleaved rounds
    exported, failed = export_encoder(module, x, out / "exported", tuple(args.formats)) if device.type == "cpu" \
        else ({}, {fmt: "exported files run on the CPU only" for fmt in args.formats})
    encoder_seconds = time_encoders(module, x, exported, args.warmup, args.repeats)

    # the VAE's references: SVI from the encoder's prediction, to convergence
    with evaluation_mode(module), torch.no_grad():
        y_encoder = module(x)
    y_svi = solve_svi(objective, x, y_encoder, args.svi_steps, args.svi_samples, args.svi_lr)

    adam = FreshNoiseAdam(steps=args.iterations, lr=args.lr)
    report = evaluate(module, x, references=y_svi, solver=adam, tolerance=args.tolerance, repeats=args.adam_repeats,
                      warmup=args.warmup, prediction_repeats=args.repeats, seed=args.seed, name=name)
    results = summarise(report, args, type(data).__name__, list(x.shape[1:]), objective.noise_policy.samples)
    results["checkpoint"] = ckpt
    results["latent_dim"] = objective.latent_dim
    add_exported(results, encoder_seconds, exported, failed)
    if args.beyond and results["adam_reached_at_iteration"] is None and not args.quick:
        beyond_budget(module, x, results, args.seed)
        add_same_load(module, x, results, exported)

    # figures, TensorBoard and tables
    rendered = render_figures(report)
    outputs = {k: str(v) for k, v in save_figures(report, out, "vae", rendered).items()}
    outputs["speedup"] = str(out / "vae_speedup.png")
    with evaluation_mode(module):
        snapshots = adam_snapshots(adam, objective, x[: args.images], args.seed)
    shown = (objective, x[: args.images], y_encoder[: args.images], snapshots)
    rows, labels = reconstruction_rows(*shown)  # decoded once: a white-padded grid for TensorBoard, a black one
    grid = image_grid(rows)                       # for the inverted PNG
    outputs["reconstructions"] = str(save_grid_png(out / "reconstructions.png", image_grid(rows, pad_value=0.0),
                                                   labels, invert=True))
    pictures = VAEPictures(traversal="auto").pictures(objective, x.shape[1:])
    for tag, picture in pictures.items():
        key = tag.removeprefix("vae_")
        outputs[key] = str(save_grid_png(out / f"{key}.png", picture, title=f"{name}: {key.replace('_', ' ')}"))
    curve = elbo_time_figure(results, name)
    outputs["elbo_time"] = str(out / "elbo_time.png")
    curve.savefig(outputs["elbo_time"], dpi=120)
    log_to_tensorboard(report, out / "tensorboard", rendered)
    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_image("vae_speedup/reconstructions", grid, 0)
        for tag, picture in pictures.items():
            writer.add_image(f"vae_speedup/{tag.removeprefix('vae_')}", picture, 0)
        writer.add_figure("vae_speedup/elbo_time", curve, 0)  # closes the figure
    results["outputs"] = outputs
    write_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(out / "table.md", table(results) + "\n")
    print(table(results))
    print(f"\nfigures: {out / 'vae_speedup.png'}, {out / 'elbo_time.png'}, {out / 'reconstructions.png'}; "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return results


def summarise(report: EvaluationReport, args: argparse.Namespace, data: str, image_shape: list[int],
              samples: int) -> dict:
    """The benchmark's numbers (ELBO = −f) from the evaluation, with its whole summary under ``evaluation``."""
    reached = report.matched_iteration
    encoder_elbo = -report.f_pred
    elbo_curve = -report.scratch.objective.mean(1)
    adam_final = float(elbo_curve[-1])
    svi_mean = -float(report.f_ref.mean())
    gap = max(svi_mean, adam_final) - float(encoder_elbo.mean())
    adam_seconds = report.matched_seconds if reached is not None else float(report.scratch.seconds[-1])
    return {
        "checkpoint": None,
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
        "adam_seconds_per_iteration": float(report.scratch.seconds[-1]) / max(1, report.scratch.iterations_run),
        "adam_final_elbo_mean": adam_final,
        "adam_final_minus_encoder": adam_final - float(encoder_elbo.mean()),
        "adam_final_minus_svi": adam_final - svi_mean,
        "adam_elbo_at": {k: float(elbo_curve[k]) for k in SNAPSHOTS if k < len(elbo_curve)},
        "speedup": report.speedup if reached is not None else None,
        "speedup_lower_bound": None if reached is not None else report.speedup,
        "svi_elbo_mean": svi_mean,
        "svi": {"steps": args.svi_steps, "samples": args.svi_samples, "lr": args.svi_lr},
        "amortization_gap": gap,
        "amortization_gap_relative": gap / abs(float(encoder_elbo.mean())),
        "evaluation": report.summary(),
        "curve": {"iterations": report.scratch.iterations.tolist(), "seconds": report.scratch.seconds.tolist(),
                  "elbo_mean": elbo_curve.tolist()},
    }


def add_exported(results: dict, seconds: dict[str, float], exported: dict, failed: dict[str, str]) -> None:
    """Add the interleaved encoder times (eager and exported), the export checks and the speed-up of each."""
    adam = results["adam_seconds_median"]
    results["encoder_seconds_interleaved"] = seconds
    results["export_max_abs_error"] = {fmt: error for fmt, (_, error) in exported.items()}
    results["export_failed"] = failed
    results["speedups"] = {name: adam / s for name, s in seconds.items()}
    results["speedup_is_lower_bound"] = results["adam_reached_at_iteration"] is None
    results["target"] = TARGET


def elbo_time_figure(r: dict, name: str):
    """Fig. 4.1 in one panel: Adam's batch-mean ELBO against seconds (log axis) with the encoder's ELBO and its
    eager and exported times marked, and SVI's level."""
    from lightning_amor.figures import new_figure

    figure = new_figure(6.4, 4.0)
    ax = figure.subplots()
    seconds = torch.tensor(r["curve"]["seconds"])[1:]
    elbo = torch.tensor(r["curve"]["elbo_mean"])[1:]
    ax.plot(seconds.numpy(), elbo.numpy(), color="tab:blue", label=f"Adam from λ = 0 (lr {r['adam_lr']:g})")
    ax.axhline(r["encoder_elbo_mean"], color="black", linestyle="--", linewidth=1, label="encoder's ELBO")
    ax.axhline(r["svi_elbo_mean"], color="tab:green", linestyle=":", linewidth=1, label="SVI from the encoder")
    markers = {"eager": "*", "torchscript": "s", "onnx": "D"}
    for kind, s in r["encoder_seconds_interleaved"].items():
        ax.plot([s], [r["encoder_elbo_mean"]], markers.get(kind, "o"), markersize=8,
                label=f"encoder, {kind}: {1000 * s:.3g} ms ({r['speedups'][kind]:,.0f}×)")
    if r["adam_reached_at_iteration"] is not None:
        ax.axvline(r["adam_seconds_median"], color="tab:red", linestyle=":", linewidth=1,
                   label=f"Adam matches at {r['adam_reached_at_iteration']} it, {r['adam_seconds_median']:.3g} s")
    ax.set_xscale("log")
    # Adam's first iterates (from the prior) lie far below: show it from about 5% of its budget on
    level, high = r["encoder_elbo_mean"], max(float(elbo.max()), r["svi_elbo_mean"])
    low = min(float(elbo[len(elbo) // 20]), level - 0.05 * abs(level)) if len(elbo) else level - 1.0
    ax.set_ylim(low, high + 0.02 * abs(level) + 0.5)
    ax.set_xlabel("seconds (log scale)")
    ax.set_ylabel(f"batch-mean ELBO ({r['images']} test images)")
    ax.set_title(f"{name}: amortized vs solved from scratch", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return figure


def reconstruction_rows(objective, x: Tensor, y_encoder: Tensor, snapshots: dict[int, Tensor]
                        ) -> tuple[list[Tensor], list[str]]:
    """The rows of the reconstruction grid (``N x ...`` images each, on the CPU) and their labels: the data, the
    encoder's reconstructions, Adam's after each snapshot iteration."""
    with torch.no_grad():
        rows = [x, objective.decode_mean(y_encoder, x)]
        labels = ["data", "encoder"]
        for k in sorted(snapshots):
            rows.append(objective.decode_mean(snapshots[k], x))
            labels.append(f"Adam {k}")
    return [r.cpu() for r in rows], labels


def _adam_text(r: dict) -> str:
    reached = r["adam_reached_at_iteration"]
    if reached is not None:
        return f"{r['adam_seconds_median']:.3g} s ({reached} iterations)"
    return f"> {r['adam_seconds_median']:.3g} s (not reached in {r['adam_iterations_run']} iterations)"


def _ratio(r: dict, kind: str) -> str:
    if kind not in r["speedups"]:
        return "—"
    bound = "> " if r["speedup_is_lower_bound"] else ""
    return f"{bound}{r['speedups'][kind]:,.0f}×"


def table(r: dict) -> str:
    """The results as a Markdown table, with the definition of same quality."""
    evaluation = r["evaluation"]
    scratch, warm = evaluation["certified_from_scratch"], evaluation["certified_from_prediction"]
    times = r["encoder_seconds_interleaved"]
    encoder = ", ".join(f"{kind} {1000 * s:.3g} ms" for kind, s in times.items())
    speed = ", ".join(f"{kind} {_ratio(r, kind)}" for kind in times)
    lines = [
        f"VAE speed-up: {r['amortizer']} vs Adam from λ = 0 (lr {r['adam_lr']:g}), {r['images']} held-out "
        f"{r['data']} images {tuple(r['image_shape'])}, {r['device']}, {r['torch_threads']} thread(s)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| encoder time (median of interleaved rounds) | {encoder} |",
        f"| encoder time in the evaluation (eager, median of repeats) | {r['encoder_ms_median']:.3g} ms |",
        f"| exported files: max abs difference to eager | "
        f"{_errors(r) or 'none exported'} |",
        f"| encoder ELBO (mean ± std over images) | {r['encoder_elbo_mean']:.3f} ± {r['encoder_elbo_std']:.2f} |",
        f"| (a) Adam time to the same quality (median of {r['adam_timed_runs']} clean runs) | {_adam_text(r)} |",
        f"| (b) speed-up at the same quality | {speed} |",
        f"| Adam ELBO after {r['adam_iterations_run']} iterations (− encoder / − SVI) | "
        f"{r['adam_final_elbo_mean']:.3f} ({r['adam_final_minus_encoder']:+.3f} / {r['adam_final_minus_svi']:+.3f}) |",
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
    for fmt, why in r["export_failed"].items():
        lines.append(f"{fmt}: not exported ({why})")
    return "\n".join(lines)


def _errors(r: dict) -> str:
    return ", ".join(f"{fmt} {error:.1e}" for fmt, error in r["export_max_abs_error"].items())


def results_section(title: str, runs: list[dict], args: argparse.Namespace, seconds: float,
                    figures: Optional[str]) -> str:
    """The RESULTS.md section: the command, the machine and its load, one row per checkpoint of times and ratios
    (eager and exported) and one of quality, whether the target is met, and the figures."""
    first = runs[0]
    kinds = list(first["encoder_seconds_interleaved"])
    times = " | ".join(f"encoder {k}" for k in kinds)
    ratios = " | ".join(f"speed-up {k}" for k in kinds)
    lines = [
        title,
        "",
        f"The tutorial's Figure 4.1 on Fashion-MNIST: {first['images']} fixed-binarised test images "
        f"{tuple(first['image_shape'])}, the encoder (eager, and through the exported TorchScript and ONNX files of "
        "`lightning_amor.export`, each checked against eager) against Adam from λ = 0 (lr "
        f"{first['adam_lr']:g}, one fresh sample per image and step, {args.iterations} iterations). "
        "Written by `benchmarks/vae_speedup.py` (one run per checkpoint):",
        "",
        *(f"    {r['command']}" for r in runs),
        "",
        f"Machine: {cpu_name()}, CPU only, {first['torch_threads']} intra-op thread(s) (ONNX Runtime the same), "
        f"torch {torch.__version__}; {first.get('date', datetime.date.today().isoformat())}; wall time per run "
        + ", ".join(f"{_name(r)} {r['wall_seconds'] / 60:.0f} min" for r in runs if "wall_seconds" in r)
        + ". **The 2-core machine was shared with other jobs** (other engineers' trainings "
        "and tests): load average (1 min) at the start and end of each run "
        + ", ".join(f"{_name(r)} {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f}" for r in runs
                    if "load_average" in r)
        + ", so every time is slower and noisier than on a quiet machine; encoder times are medians of "
        f"{args.repeats} interleaved rounds (eager, TorchScript, ONNX in turn, so load affects all alike), Adam's the "
        f"median of {args.adam_repeats} clean timed run(s) that only read the clock.",
        "",
        f"| model | {times} | Adam to the encoder's ELBO | {ratios} | target ≥ 10⁴× |",
        "|---|" + "--:|" * (2 * len(kinds) + 1) + "---|",
    ]
    for r in runs:
        cells = " | ".join(f"{1000 * r['encoder_seconds_interleaved'][k]:.3g} ms" if k in
                           r["encoder_seconds_interleaved"] else "—" for k in kinds)
        speed = " | ".join(_ratio(r, k) for k in kinds)
        best = max(r["speedups"].values())
        met = ("met" if best >= TARGET and not r["speedup_is_lower_bound"] else
               "lower bound" if r["speedup_is_lower_bound"] else f"**missed** (best {best:,.0f}×)")
        if "beyond" in r:
            hits = [kind for kind, ok in r["beyond"]["target_met"].items() if ok]
            same = r.get("same_load")
            met = f"met for {', '.join(hits)} (see below)" if hits else "**missed** (see below)"
            if same and r["beyond"]["reached"] and not hits:
                best = max(r["beyond"]["iterations"] * q for q in same["iteration_over_encoder"].values())
                met = f"**missed** as measured, met under one load ({best:,.0f}×); see below"
        lines.append(f"| {_label(r)} | {cells} | {_adam_text(r)} | {speed} | {met} |")
    for r in runs:
        if "beyond" in r:
            lines += ["", _beyond_text(r)]
    lines += [
        "",
        f"| model | encoder ELBO | Adam ELBO at {', '.join(str(k) for k in SNAPSHOTS if k <= args.iterations)} it "
        "| Adam at the end − encoder | SVI from the encoder | Adam at the end − SVI | amortization gap | "
        "exported max abs diff |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in runs:
        at = " / ".join(f"{v:.2f}" for v in r["adam_elbo_at"].values())
        lines.append(
            f"| {_label(r)} | {r['encoder_elbo_mean']:.2f} | {at} | {r['adam_final_minus_encoder']:+.2f} | "
            f"{r['svi_elbo_mean']:.2f} ({r['svi']['steps']} steps, {r['svi']['samples']} samples) | "
            f"{r['adam_final_minus_svi']:+.2f} | {r['amortization_gap']:.2f} nats | {_errors(r) or '—'} |"
        )
    lines += [
        "",
        first["same_quality"][0].upper() + first["same_quality"][1:]
        + ". ELBOs in nats per image, batch means on that fixed noise; the speed-up "
        "is Adam's time to the same quality over the encoder's time for one batch (a lower bound, marked >, where "
        "Adam did not reach it within its budget). Adam costs "
        + ", ".join(f"{1000 * r['adam_seconds_per_iteration']:.3g} ms" for r in runs)
        + " per iteration here, so a ratio of 10⁴ needs Adam to take about 10⁴ × (encoder time / iteration time) "
        "iterations to match the encoder.",
    ]
    if figures:
        shown = f"{Path(figures).parent.name}/{Path(figures).name}"
        names = ", ".join(f"`{shown}/{_name(r)}_*.png`" for r in runs)
        lines += ["", f"Figures: {names}: `elbo_time` (the ELBO against seconds, the encoder's eager and exported "
                  "times marked), `speedup` (the evaluation's Fig. 4.1, against iterations and seconds), "
                  "`reconstructions` (data, encoder, Adam after 0/250/500/1000/2000 iterations), `prior_samples`. "
                  "The 2-D latent traversal of `vae_fashion_2d`: `python -m lightning_amor.apps.vae_pictures --ckpt "
                  f"runs/vae/vae_fashion_2d/checkpoints/last.ckpt --out {shown}` "
                  f"(`{shown}/vae_fashion_2d_latent_traversal.png`, `..._prior_samples.png`)."]
    return "\n".join(lines) + "\n"


def _beyond_text(r: dict) -> str:
    b = r["beyond"]
    met = [kind for kind, ok in b["target_met"].items() if ok]
    missed = [kind for kind, ok in b["target_met"].items() if not ok]
    direct = ", ".join(f"{kind} {b['seconds'] / t:,.0f}×" for kind, t in r["encoder_seconds_interleaved"].items())
    where = (f"reached the encoder's ELBO at about iteration {b['iterations']} ({b['seconds']:.0f} s of Adam; over "
             f"the encoder times above: {direct})"
             if b["reached"] else
             f"had not reached it after {b['iterations']} iterations and {b['seconds']:.0f} s of Adam: ELBO "
             f"{b['elbo']:.2f}, {b['elbo'] - b['target_elbo']:+.2f} nats from the encoder's {b['target_elbo']:.2f}")
    verdict = (f"the speed-up at matched quality is ≥ 10⁴× for {', '.join(met)}" if met else "")
    verdict += ("; " if met and missed else "") + (f"< 10⁴× for {', '.join(missed)}" if missed else "")
    same = r.get("same_load")
    if same and b["reached"]:
        ratios = ", ".join(f"{kind} {b['iterations'] * q:,.0f}×" for kind, q in same["iteration_over_encoder"].items())
        verdict += (f". Measured under one load instead (Adam's time per iteration over the encoder's, "
                    f"{', '.join(f'{kind} {q:.2f}' for kind, q in same['iteration_over_encoder'].items())}, in "
                    f"interleaved rounds: {1000 * same['seconds']['adam_iteration']:.0f} ms per iteration, "
                    f"{1000 * same['seconds']['eager']:.0f} ms per eager encoder call), the {b['iterations']} "
                    f"iterations to the encoder's ELBO give speed-ups of {ratios} at matched quality")
    return (f"**Beyond the budget** (`{_name(r)}`, `--beyond`): Adam, run on from λ = 0 on the same noise until 10⁴ × "
            f"the slowest encoder time ({b['seconds_budget']:.0f} s of Adam, the ELBO scored every 50 iterations "
            f"with the clock paused), {where}: {verdict}.")


def command(args: argparse.Namespace, ckpt: str, out: Path) -> str:
    """The command that reruns this benchmark on ``ckpt`` with the settings that matter for its numbers."""
    return (f"OMP_NUM_THREADS=1 python -m benchmarks.vae_speedup --ckpt {ckpt} --batch {args.batch} "
            f"--iterations {args.iterations} --adam-repeats {args.adam_repeats} --svi-steps {args.svi_steps} "
            f"--svi-samples {args.svi_samples} --repeats {args.repeats}{' --beyond' if args.beyond else ''} "
            f"--out {out}")


def _name(r: dict) -> str:
    return run_name(r["checkpoint"])


def _label(r: dict) -> str:
    return f"`{_name(r)}` ({r['amortizer']}, L = {r['latent_dim']})"


def _median(stats: dict) -> str:
    if stats["median"] is None:
        return f"none reached in {stats['iterations_run']} iterations"
    return f"{stats['median']:.0f} ({stats['reached']}/{stats['of']})"


def _load_average() -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, ValueError):
        return (float("nan"),) * 3


if __name__ == "__main__":
    main()
