"""The standard VAE evaluation on binarised Fashion-MNIST: test ELBO, IWAE log-likelihood and the gap split.

For the trained checkpoints of ``recipes/vae/vae_fashion.yaml`` (a VAE) and ``recipes/vae/savae_fashion.yaml`` (an
SA-VAE trained with K = 5 inner steps), on the fixed binarisation of the Fashion-MNIST test set:

- **test ELBO** of every model's own posterior (the VAE's encoder, the SA-VAE's K = 5 refinement) on all 10000
  test images (``--elbo-samples-all`` fixed reparameterised samples per image);
- on the first ``--images`` test images (1000 by default: IWAE with k = 1000 and SVI on all 10000 take too long
  on this CPU):
  - for K ∈ ``--ks`` (0, 5, 10, 20) **inner steps applied at test time** from the encoder's output, with the
    SA-VAE's own trained inner update (Adam-style steps with its learned step size, its own seeded noise stream):
    the SA-VAE's model with K steps, and the VAE's encoder followed by the very same K steps (the fair row: the
    same refinement, only the encoder and decoder differ). K = 0 is the bare encoder. ELBO(q_K) is scored with
    ``--elbo-samples`` fixed samples per image, the same noise for every K;
  - q*: SVI from the encoder's output (``--svi-steps`` Adam steps on fresh noise, decaying step size), the best
    Gaussian posterior, and its ELBO;
  - the **IWAE log-likelihood** log p̂(x) with k = ``--iwae-samples`` importance samples from q* (chunked, float64
    log-mean-exp: :mod:`lightning_amor.apps.vae_likelihood`), with its effective sample size;
  - the **gap split** (Cremer et al. 2018): approximation log p̂(x) − ELBO(q*) and amortization
    ELBO(q*) − ELBO(q_K), which add up to log p̂(x) − ELBO(q_K);
- from each run's TensorBoard events: the training wall time and the step at which the validation ELBO stopped
  improving (the step of its best value; "still improving" when that is the last validation).

Writes the section "## VAE: Fashion-MNIST" of ``benchmarks/RESULTS.md`` (with the fit commands) and
``benchmarks/figures/vae_fashion.json``; ``--quick`` (few images, small k) writes into a temporary folder only.

    OMP_NUM_THREADS=1 python -m benchmarks.vae_fashion
    OMP_NUM_THREADS=1 python -m benchmarks.vae_fashion --quick
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from benchmarks.results import cpu_name, write_section

SECTION = "## VAE: Fashion-MNIST"
RECIPES = {"VAE": "vae_fashion", "SA-VAE": "savae_fashion"}


def load_module(ckpt: str):
    """The trained module of a checkpoint, in evaluation mode with frozen weights."""
    import lightning_amor.apps.vae  # noqa: F401 - registers VAEModule for the safe checkpoint loader
    from lightning_amor import AmortizedModule

    module = AmortizedModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return module.eval().requires_grad_(False)


def load_test_images(ckpt: str, root: Optional[str]) -> Tensor:
    """The fixed-binarised test images of the data module the checkpoint was trained with: ``N x 1 x 28 x 28``."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    path = saved.get("_class_path", "")
    if not path.startswith("datamodules."):
        raise SystemExit(f"{ckpt} does not name a data module of this project (found {path!r})")
    module_name, _, class_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    args = {k: v for k, v in saved.items() if not k.startswith("_")}
    if root is not None:
        args["root"] = root
    return cls(**args).images("test")


def training_history(ckpt: str) -> dict[str, Any]:
    """The training run of a checkpoint ``runs/<app>/<recipe>/checkpoints/*.ckpt``: its steps (from the checkpoint),
    wall time (first to last event of the latest TensorBoard version) and validation ELBO history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, Any] = {"steps": torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")}
    run = Path(ckpt).resolve().parents[1]
    versions = sorted((run / "tensorboard").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        return out
    times = [event.wall_time for f in sorted(versions[-1].glob("events.out.tfevents.*"))
             for event in EventFileLoader(str(f)).Load()]
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    history = [(e.step + 1, e.value) for e in events.Scalars("val/elbo")] if "val/elbo" in scalars else []
    out.update(version=versions[-1].name, wall_s=max(times) - min(times) if times else None, val_elbo=history)
    if history:
        best_step, best = max(history, key=lambda h: h[1])
        out.update(best_step=best_step, best_val_elbo=best, still_improving=best_step == history[-1][0])
    return out


def refine(module, encoder_module, x: Tensor, steps: int) -> Tensor:
    """``encoder_module``'s encoder output refined by ``steps`` inner steps of ``module``'s SA-VAE update."""
    from lightning_amor.amortizers import FullyAmortized
    from lightning_amor.apps.vae import SemiAmortizedVI

    encoder = encoder_module.amortizer
    net = encoder.net if isinstance(encoder, FullyAmortized) else encoder.init
    inner = SemiAmortizedVI(init=net, steps=steps, update=module.amortizer.update, gradient="unroll").eval()
    with torch.enable_grad():  # the inner steps differentiate the objective in y
        return inner(x, encoder_module.objective).y.detach()


def batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``n``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def evaluate(name: str, module, savae, x_all: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Every number of one model (see the module docstring)."""
    from lightning_amor.apps.vae import SVI
    from lightning_amor.apps.vae_likelihood import elbo_estimate, iwae_log_likelihood

    objective = module.objective
    started = time.perf_counter()

    def own_posterior(x: Tensor) -> Tensor:
        with torch.enable_grad():
            return module.amortizer(x, objective).y.detach()

    def elbos(y: Tensor, x: Tensor, samples: int) -> Tensor:
        parts = [elbo_estimate(objective, y[b], x[b], samples, args.seed) for b in batches(len(x), args.batch)]
        return torch.cat(parts)

    def per_batch(fn, x: Tensor) -> Tensor:
        return torch.cat([fn(x[b]) for b in batches(len(x), args.batch)])

    result: dict[str, Any] = {"test_images_all": len(x_all)}
    y_own = per_batch(own_posterior, x_all)
    result["test_elbo_all"] = float(elbos(y_own, x_all, args.elbo_samples_all).mean())
    x = x_all[: args.images]
    y0 = per_batch(lambda xb: refine(savae, module, xb, 0), x)
    elbo_k = {}
    for k in args.ks:
        y_k = y0 if k == 0 else per_batch(lambda xb, k=k: refine(savae, module, xb, k), x)
        elbo_k[k] = elbos(y_k, x, args.elbo_samples)
    svi = SVI(steps=args.svi_steps, lr=args.svi_lr, samples=args.svi_samples)
    t = time.perf_counter()
    y_star = torch.cat([svi.solve(objective, x[b], y0[b]).y for b in batches(len(x), args.batch)])
    result["svi_s"] = time.perf_counter() - t
    elbo_star = elbos(y_star, x, args.elbo_samples)
    t = time.perf_counter()
    estimates = [iwae_log_likelihood(objective, y_star[b], x[b], args.iwae_samples, args.chunk, args.seed)
                 for b in batches(len(x), args.batch)]
    result["iwae_s"] = time.perf_counter() - t
    log_p = torch.cat([e.log_likelihood for e in estimates])
    ess = torch.cat([e.effective_sample_size for e in estimates])
    result.update(
        images=len(x), log_likelihood=float(log_p.mean()), elbo_optimal=float(elbo_star.mean()),
        approximation=float((log_p - elbo_star).mean()), ess_median=float(ess.median()),
        rows={k: {"elbo": float(v.mean()), "amortization": float((elbo_star - v).mean()),
                  "total": float((log_p - v).mean())} for k, v in elbo_k.items()},
    )
    result["eval_s"] = time.perf_counter() - started
    sweep = ", ".join(f"K={k}: ELBO {r['elbo']:.2f} amortization {r['amortization']:.2f}"
                      for k, r in result["rows"].items())
    print(f"{name}: test ELBO (all {len(x_all)}) {result['test_elbo_all']:.2f}; first {len(x)}: log p̂ "
          f"{result['log_likelihood']:.2f}, ELBO(q*) {result['elbo_optimal']:.2f}, approximation gap "
          f"{result['approximation']:.2f}; {sweep}", flush=True)
    return result


def report(results: dict[str, Any], args: argparse.Namespace, load: tuple[float, float]) -> str:
    """The RESULTS.md section."""
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS=1 python -m benchmarks.vae_fashion{' --quick' if args.quick else ''}` "
        f"({datetime.date.today().isoformat()}, {cpu_name()}, one thread). The checkpoints come from",
        "",
        "    lightning-amor fit --config recipes/_base/trainer.yaml --config recipes/vae/vae_fashion.yaml",
        "    lightning-amor fit --config recipes/_base/trainer.yaml --config recipes/vae/savae_fashion.yaml",
        "",
    ]
    trained = [(n, r["training"]) for n, r in results["models"].items() if r.get("training")]
    if trained:
        lines += ["| model | steps trained | wall time | best validation ELBO | at step |", "|---|---|---|---|---|"]
        for name, h in trained:
            wall = f"{h['wall_s'] / 60:.1f} min" if h.get("wall_s") else "n/a"
            at = (f"{h['best_step']}" + (" (still improving)" if h.get("still_improving") else "")
                  if "best_step" in h else "n/a")
            lines.append(f"| {name} | {h.get('steps')} | {wall} | {h.get('best_val_elbo', float('nan')):.2f} | {at} |")
        lines.append("")
        histories = {name: dict(map(tuple, h.get("val_elbo", []))) for name, h in trained}
        common = sorted(set.intersection(*(set(v) for v in histories.values()))) if len(histories) > 1 else []
        if common:
            lines += [
                "Validation ELBO at equal numbers of training steps (" + ", ".join(map(str, common)) + "): "
                + "; ".join(f"{n} " + " / ".join(f"{v[s]:.2f}" for s in common) for n, v in histories.items())
                + ". A step of the SA-VAE (5 unrolled inner steps) costs several VAE steps ("
                + ", ".join(f"{n} {h['wall_s'] / h['steps']:.2f} s per step" for n, h in trained
                            if h.get("wall_s") and h.get("steps"))
                + " here), so the SA-VAE recipe trains fewer steps.",
                "",
            ]
    first = next(iter(results["models"].values()))
    lines += [
        f"Test ELBO on all {first['test_images_all']} binarised test images (each model's own posterior, "
        f"{args.elbo_samples_all} samples per image): "
        + "; ".join(f"{n} {r['test_elbo_all']:.2f} nats" for n, r in results["models"].items()) + ".",
        "",
        f"On the first {first['images']} test images (k = {args.iwae_samples} importance samples from q* per image; "
        f"q* = SVI from the encoder, {args.svi_steps} steps, lr {args.svi_lr}, {args.svi_samples} samples per step; "
        f"ELBOs with {args.elbo_samples} fixed samples per image). K = inner steps applied at test time from the "
        f"encoder's output with the SA-VAE's trained inner update (the SA-VAE was trained with K = 5); the VAE rows "
        f"apply the same steps to the VAE's encoder. Gaps in nats, per image:",
        "",
        "| model | K | ELBO(q_K) | IWAE log p̂(x) | ELBO(q*) | approximation gap | amortization gap | total gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        for k, row in r["rows"].items():
            lines.append(
                f"| {name} | {k} | {row['elbo']:.2f} | {r['log_likelihood']:.2f} | {r['elbo_optimal']:.2f} | "
                f"{r['approximation']:.2f} | {row['amortization']:.2f} | {row['total']:.2f} |"
            )
    lines += [""] + [
        f"{n}: median effective sample size of the IWAE estimate {r['ess_median']:.0f} of {args.iwae_samples}; "
        f"SVI {r['svi_s']:.0f} s, IWAE {r['iwae_s']:.0f} s." for n, r in results["models"].items()
    ]
    lines += [
        "",
        f"The 2-core machine was shared with other jobs (load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
        f"end): wall times are slower than on an idle machine.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="runs/vae/vae_fashion/checkpoints/last.ckpt")
    parser.add_argument("--savae", default="runs/vae/savae_fashion/checkpoints/last.ckpt")
    parser.add_argument("--root", default=None, help="IDX folder, if not the one in the checkpoints")
    parser.add_argument("--images", type=int, default=1000, help="test images for IWAE, SVI and the K sweep")
    parser.add_argument("--iwae-samples", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=100, help="IWAE samples per decoder call")
    parser.add_argument("--elbo-samples", type=int, default=100)
    parser.add_argument("--elbo-samples-all", type=int, default=10)
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--svi-lr", type=float, default=0.01)
    parser.add_argument("--svi-samples", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 images, small k; no RESULTS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the RESULTS.md section from the JSON of the last full run (no evaluation)")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/figures; a temp folder "
                                                    "with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.iwae_samples, args.svi_steps, args.elbo_samples, args.ks = 64, 50, 20, 10, [0, 5]
        args.batch = 64
    out = Path(args.out or (tempfile.mkdtemp(prefix="vae_fashion_quick_") if args.quick else "benchmarks/figures"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return rewrite_report(out / "vae_fashion.json", args)
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()[0]
    savae = load_module(args.savae)
    x_all = load_test_images(args.vae, args.root)
    if args.quick:
        x_all = x_all[:256]
    results: dict[str, Any] = {"models": {}}
    for name, ckpt in (("VAE", args.vae), ("SA-VAE", args.savae)):
        module = savae if name == "SA-VAE" else load_module(ckpt)
        r = evaluate(name, module, savae, x_all, args)
        r["checkpoint"] = ckpt
        r["training"] = training_history(ckpt)
        results["models"][name] = r
    results["load"] = [load_start, os.getloadavg()[0]]
    results["args"] = {k: v for k, v in vars(args).items() if k not in ("out", "results", "report_only")}
    text = report(results, args, tuple(results["load"]))
    print(text)
    (out / "vae_fashion.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.quick:
        write_section(Path(args.results), SECTION, text)
    print(f"wrote {out / 'vae_fashion.json'}" + ("" if args.quick else f" and the section of {args.results}"))
    return results


def rewrite_report(saved: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The RESULTS.md section again from a full run's JSON (its settings and load averages included)."""
    results = json.loads(saved.read_text())
    for name, value in results.get("args", {}).items():
        setattr(args, name, value)
    for r in results["models"].values():
        r["rows"] = {int(k): v for k, v in r["rows"].items()}
    text = report(results, args, tuple(results["load"]))
    print(text)
    write_section(Path(args.results), SECTION, text)
    return results


if __name__ == "__main__":
    main()
