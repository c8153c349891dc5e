"""How much faster is a VAE's encoder than solving the same posteriors from scratch? (tutorial Fig. 4.1)

For a trained checkpoint of ``recipes/vae/*.yaml`` and a batch of held-out images (the data module's
test split), this measures side by side, in one process and on one device:

* the encoder (the amortization model λ̂_θ(x); for SA-VAE its K inner steps included): time of one
  batch under ``torch.no_grad``, after warm-up, median of repeats, device synchronised;
* Adam from λ = 0 (q = prior) on the batch-mean −ELBO, lr 5e-3, one fresh reparameterised sample per
  image and step, as the reference; its iterates are scored every few iterations;
* "same quality": the first recorded Adam iterate whose batch-mean ELBO is at least the encoder's, both
  estimated with the same fixed noise (``--eval-samples`` samples per image, the same ε for both sides),
  which Adam never sees while optimising. Adam's time to get there is measured again by clean runs of
  exactly that many iterations, without any scoring, and the median is reported;
* the amortization gap: the mean ELBO after solving every image's problem from the encoder's
  prediction by SVI (Adam on fresh noise with a decaying step, to convergence), minus the encoder's.

Outputs (under ``--out``): ``vae_speedup.png`` (ELBO against Adam iterations and seconds, as Fig. 4.1),
``reconstructions.png`` (the data, the encoder's reconstructions and Adam's after 0/250/500/1000/2000
iterations, as the reference's sample figure), TensorBoard scalars and images (``tensorboard/``), and
``results.json`` and ``table.md``.

    python -m benchmarks.vae_speedup --ckpt runs/vae/vae_digits/tensorboard/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

SNAPSHOTS = (0, 250, 500, 1000, 2000)
QUALITY = (
    "same quality := the first Adam iterate (checked every {every} iterations) whose batch-mean ELBO is >= the "
    "encoder's batch-mean ELBO, "
    "both estimated on the same fixed noise ({samples} reparameterised samples per image, seed {seed}) that Adam "
    "never optimises on (Adam draws one fresh sample per image and step, as the reference)"
)


@dataclass
class Curve:
    """Adam's batch-mean ELBO (and its spread over images) at recorded iterations, with Adam's own seconds."""

    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    elbo_mean: list[float] = field(default_factory=list)
    elbo_std: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def time_encoder(predict: Callable[[], Tensor], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` synchronised calls of ``predict`` after ``warmup`` calls."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            predict()
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def run_adam(
    objective, x: Tensor, iterations: int, lr: float, seed: int,
    score: Optional[Callable[[Tensor], Tensor]] = None, record_every: int = 1,
    stop_at: Optional[float] = None, min_iterations: int = 0, snapshots: tuple[int, ...] = (),
    progress: Optional[str] = None,
) -> tuple[Tensor, Curve, dict[int, Tensor], Optional[int], float]:
    """Adam from λ = 0 on the batch-mean −ELBO with fresh noise (the global generator seeded with ``seed``).

    With ``score``, the iterate is scored every ``record_every`` iterations (its time is left out of the
    clock), and the run stops at the first recorded iterate whose mean ELBO reaches ``stop_at``, once
    ``min_iterations`` have run. Returns the last iterate, the curve, the snapshots (the iterate that reached
    ``stop_at`` under the key -1), the iteration where ``stop_at`` was reached (or ``None``) and Adam's own
    seconds. With ``progress``, a progress bar of that name counts the iterations (outside the clock).
    """
    device = x.device
    torch.manual_seed(seed)
    y = torch.zeros(x.shape[0], objective.dim, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([y], lr=lr)
    curve, saved, reached = Curve(), {}, None
    elapsed = 0.0

    def record(k: int) -> bool:
        nonlocal reached
        if k in snapshots:
            saved[k] = y.detach().clone()
        if score is None or (k % record_every and k != iterations):
            return False
        elbo = -score(y.detach())
        curve.iterations.append(k)
        curve.seconds.append(elapsed)
        curve.elbo_mean.append(float(elbo.mean()))
        curve.elbo_std.append(float(elbo.std()))
        if reached is None and stop_at is not None and curve.elbo_mean[-1] >= stop_at:
            reached = k
            saved[-1] = y.detach().clone()  # the iterate of same quality, to check the clean runs against
        return reached is not None and k >= min_iterations

    bar = tqdm(total=iterations, desc=progress, unit="it", disable=progress is None)
    with bar, objective.override_noise(samples=1, fixed=False):
        done = record(0)
        k = 0
        while not done and k < iterations:
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            objective(y, x).mean().backward()
            optimizer.step()
            synchronize(device)
            elapsed += time.perf_counter() - start
            k += 1
            bar.update()
            done = record(k)
    return y.detach(), curve, saved, reached, elapsed


def solve_svi(objective, x: Tensor, init: Tensor, steps: int, samples: int, lr: float) -> Tensor:
    """Every image's posterior solved by SVI from ``init``: ``B x 2L``."""
    from lightning_amor.apps.vae import SVI

    return SVI(steps=steps, lr=lr, samples=samples).solve(objective, x, init=init).y


def plot_curves(path: Path, curve: Curve, encoder_mean: float, encoder_std: float, encoder_ms: float,
                reached: Optional[int], title: str) -> None:
    """ELBO against Adam iterations and against seconds, Adam's mean ± std over images, the encoder dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    mean, std = torch.tensor(curve.elbo_mean), torch.tensor(curve.elbo_std)
    for ax, xs, label in ((axes[0], curve.iterations, "Adam iterations"), (axes[1], curve.seconds, "seconds")):
        ax.plot(xs, mean, color="tab:blue", label="Adam from λ = 0")
        ax.fill_between(xs, mean - std, mean + std, color="tab:blue", alpha=0.2)
        ax.axhline(encoder_mean, color="black", linestyle="--", label=f"encoder λ̂_θ(x), {encoder_ms:.3g} ms")
        ax.axhspan(encoder_mean - encoder_std, encoder_mean + encoder_std, color="grey", alpha=0.2)
        if reached is not None:
            at = xs[curve.iterations.index(reached)]
            ax.axvline(at, color="tab:red", linestyle=":", label="same quality")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ELBO (nats per image)")
    low = min(encoder_mean - 3 * max(encoder_std, 1.0), float(mean[len(mean) // 20 :].min()) if len(mean) else 0.0)
    axes[0].set_ylim(low, encoder_mean + 2 * max(encoder_std, 1.0))
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


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
    parser.add_argument("--iterations", type=int, default=2000, help="Adam iterations at least (the curve)")
    parser.add_argument("--max-iterations", type=int, default=20000, help="give up reaching the encoder after")
    parser.add_argument("--record-every", type=int, default=5, help="score Adam's iterate every this many")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples of the fixed evaluation noise")
    parser.add_argument("--eval-seed", type=int, default=12345, help="seed of the fixed evaluation noise")
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
    out.mkdir(parents=True, exist_ok=True)

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
    samples = args.eval_samples or objective.noise_policy.samples

    def score(y: Tensor) -> Tensor:
        """−ELBO per image on the fixed evaluation noise."""
        with torch.no_grad(), objective.override_noise(samples=samples, fixed=True, seed=args.eval_seed):
            return objective(y, x)

    # 1. the encoder
    def predict() -> Tensor:
        return module.amortizer(x, objective).y

    encoder_times = time_encoder(predict, device, args.warmup, args.repeats)
    encoder_s = statistics.median(encoder_times)
    q1, _, q3 = statistics.quantiles(encoder_times, n=4)
    with torch.no_grad():
        y_encoder = predict()
    encoder_elbo = -score(y_encoder)
    encoder_mean, encoder_std = float(encoder_elbo.mean()), float(encoder_elbo.std())

    # 2. Adam from zero, scored on the fixed noise: the curve and the iteration of same quality
    y_adam, curve, snapshots, reached, _ = run_adam(
        objective, x, args.max_iterations, args.lr, args.seed, score=score, record_every=args.record_every,
        stop_at=encoder_mean, min_iterations=args.iterations, snapshots=SNAPSHOTS, progress="Adam from λ = 0",
    )
    adam_final_mean = curve.elbo_mean[-1]

    # 3. clean timing of Adam up to same quality (or of every iteration run, when it never got there)
    target = reached if reached is not None else curve.iterations[-1]
    adam_times = []
    for _ in tqdm(range(args.adam_repeats), desc=f"timed Adam runs ({target} iterations)", unit="run"):
        y_timed, _, _, _, seconds = run_adam(objective, x, target, args.lr, args.seed)
        adam_times.append(seconds)
    adam_s = statistics.median(adam_times)
    reproduced = bool(torch.equal(y_timed, snapshots.pop(-1, y_adam)))

    # 4. the amortization gap, by SVI from the encoder's prediction
    y_svi = solve_svi(objective, x, y_encoder, args.svi_steps, args.svi_samples, args.svi_lr)
    svi_elbo = -score(y_svi)
    best_mean = max(float(svi_elbo.mean()), adam_final_mean)
    gap = best_mean - encoder_mean

    speedup = adam_s / encoder_s
    results = {
        "checkpoint": args.ckpt,
        "data": type(data).__name__,
        "images": int(x.shape[0]),
        "image_shape": list(x.shape[1:]),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "amortizer": type(module.amortizer).__name__,
        "same_quality": QUALITY.format(every=args.record_every, samples=samples, seed=args.eval_seed),
        "encoder_ms_median": 1000 * encoder_s,
        "encoder_ms_iqr": [1000 * q1, 1000 * q3],
        "encoder_elbo_mean": encoder_mean,
        "encoder_elbo_std": encoder_std,
        "adam_lr": args.lr,
        "adam_reached_at_iteration": reached,
        "adam_iterations_run": curve.iterations[-1],
        "adam_seconds_median": adam_s,
        "adam_seconds_runs": adam_times,
        "adam_timed_run_reproduces_curve": reproduced,
        "adam_final_elbo_mean": adam_final_mean,
        "speedup": speedup if reached is not None else None,
        "speedup_lower_bound": None if reached is not None else speedup,
        "svi_elbo_mean": float(svi_elbo.mean()),
        "svi": {"steps": args.svi_steps, "samples": args.svi_samples, "lr": args.svi_lr},
        "amortization_gap": gap,
        "amortization_gap_relative": gap / abs(encoder_mean),
        "curve": asdict(curve),
    }

    # 5. figures, TensorBoard and tables
    title = (f"{type(module.amortizer).__name__} on {x.shape[0]} held-out {type(data).__name__} images, "
             f"{device.type}, {torch.get_num_threads()} thread(s)")
    plot_curves(out / "vae_speedup.png", curve, encoder_mean, encoder_std, 1000 * encoder_s, reached, title)
    shown = (objective, x[: args.images], y_encoder[: args.images], {k: v[: args.images] for k, v in snapshots.items()})
    grid, labels = reconstruction_grid(*shown)
    save_grid(out / "reconstructions.png", reconstruction_grid(*shown, pad_value=0.0)[0], labels)
    write_tensorboard(out / "tensorboard", curve, encoder_mean, grid, table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"\nfigures: {out / 'vae_speedup.png'}, {out / 'reconstructions.png'}; "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return results


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


def write_tensorboard(folder: Path, curve: Curve, encoder_mean: float, grid: Tensor, text: str) -> None:
    """ELBO against iterations (step) and Adam's seconds (the event's wall time: TensorBoard's Relative axis)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    start = time.time()
    for k, seconds, mean in zip(curve.iterations, curve.seconds, curve.elbo_mean, strict=True):
        writer.add_scalar("vae_speedup/adam_elbo", mean, k, walltime=start + seconds)
        writer.add_scalar("vae_speedup/adam_elbo_vs_ms", mean, int(round(1000 * seconds)), walltime=start + seconds)
        writer.add_scalar("vae_speedup/encoder_elbo", encoder_mean, k, walltime=start + seconds)
    writer.add_image("vae_speedup/reconstructions", grid, 0)
    writer.add_text("vae_speedup/table", text.replace("\n", "  \n"), 0)
    writer.close()


def table(r: dict) -> str:
    """The results as a Markdown table, with the definition of same quality."""
    reached = r["adam_reached_at_iteration"]
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
        f"| encoder time (median of repeats, IQR) | {r['encoder_ms_median']:.3g} ms "
        f"({r['encoder_ms_iqr'][0]:.3g}–{r['encoder_ms_iqr'][1]:.3g}) |",
        f"| encoder ELBO (mean ± std over images) | {r['encoder_elbo_mean']:.3f} ± {r['encoder_elbo_std']:.2f} |",
        f"| (a) Adam time to the same quality (median of {len(r['adam_seconds_runs'])} clean runs) | {adam} |",
        f"| (b) speed-up at the same quality | {speed} |",
        f"| Adam ELBO after {r['adam_iterations_run']} iterations | {r['adam_final_elbo_mean']:.3f} |",
        f"| SVI ELBO from the encoder ({r['svi']['steps']} steps, {r['svi']['samples']} samples) | "
        f"{r['svi_elbo_mean']:.3f} |",
        f"| (d) amortization gap (best solved ELBO − encoder ELBO) | {r['amortization_gap']:.3f} nats "
        f"({100 * r['amortization_gap_relative']:.2f}% of −ELBO) |",
        "",
        r["same_quality"] + ".",
    ]
    if not r["adam_timed_run_reproduces_curve"]:
        lines.append("warning: the timed Adam runs did not reproduce the recorded trajectory bit for bit")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
