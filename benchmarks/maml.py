"""MAML, first-order MAML and iMAML as semi-amortized optimization, side by side with TorchOpt.

Everything runs in one process on one device, on the same task batches, from the same initial weights:

* **held-out quality at equal meta-iterations** (sinusoid regression, Finn et al.'s protocol: amplitude in [0.1, 5],
  phase in [0, π], inputs in [−5, 5], a 1-40-40-1 ReLU MLP, inner step 0.01, a meta-batch of 25 tasks, Adam 1e-3 on
  the initial weights): our MAML (second order through one inner step, ``SemiAmortized(gradient= "unroll")``),
  first-order MAML, iMAML (the proximal problem, λ = 10, solved per task to ‖∇F(w)‖ ≤ 1e-3·‖∇F(θ)‖ by accelerated
  gradient with a backtracking line search, ``ToleranceSemiAmortized``, on the same MLP with SiLU instead of ReLU so
  that ∇F is differentiable; implicit gradient by 10 CG steps; the share of tasks meeting the tolerance, in training
  and on the held-out tasks, is reported), the fully amortized hypernetwork, Finn et al.'s
  pre-trained-then-fine-tuned baseline (0 inner steps in training), and TorchOpt's MAML in its two forms: the per-task
  loop of ``torchopt.MetaSGD`` (as TorchOpt's MAML example) and a batched functional form (``torch.func.vmap`` over
  ``torch.func.grad`` inner steps with ``torchopt.sgd`` as the functional inner optimizer). The score: the query MSE
  of 1000 fixed held-out tasks (100 query points each) after 0, 1, 5 and 10 gradient steps of 0.01 on the support set
  from each method's initial weights (the hypernetwork's prediction), with 95% confidence intervals; K = 10 shots, and
  K = 5 for MAML;
* **time and memory per meta-step** as the inner steps grow from 1 to 20, for each gradient mode and both TorchOpt
  forms: the median wall time of a meta-step (forward, backward, Adam step), and the bytes of the tensors autograd
  saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``): those alive when the loss is
  computed (what the backward needs) and the peak (the transient graphs of first-order and implicit inner
  gradients included); on a GPU also the peak CUDA memory;
* **few-shot digits** (3-way 5-shot, digits 7-9 held out for meta-test, a 64-64-64-3 MLP, 5 inner steps of 0.4):
  query accuracy after 0, 1, 5, 10 steps for MAML, first-order MAML, the hypernetwork and the fine-tuned baseline;
* learn2learn 0.2.0 is not run: its source distribution does not build on Python 3.11 (quoted in the results).

    OMP_NUM_THREADS=1 python -m benchmarks.maml            # the full run (about 8-10 minutes on 2 shared cores)
    OMP_NUM_THREADS=1 python -m benchmarks.maml --quick    # a smoke run: a few meta-iterations, no RESULTS.md
    OMP_NUM_THREADS=1 python -m benchmarks.maml --only imaml  # rerun the iMAML row into the last full run's results
    OMP_NUM_THREADS=1 python -m benchmarks.maml --only timing  # rerun the time and memory part (and gradient check)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

from benchmarks.results import cpu_name, write_atomically, write_section
from datamodules.context import seeded_generator
from datamodules.few_shot_digits import FewShotDigits
from datamodules.sinusoid import SinusoidTasks
from lightning_amor import MLP, AdamStep, FullyAmortized, GradientStep, SemiAmortized
from lightning_amor.apps.maml import MAMLModule, NetworkInit, SupportSetHypernetwork, TaskLoss, mean_ci95
from lightning_amor.structure import parameters_vector
from lightning_amor.tolerance_solve import ToleranceSemiAmortized

SECTION = "## MAML, FOMAML, iMAML (benchmarks/maml.py)"
CURVE = (0, 1, 5, 10)
IMAML = {"shrinkage": 10.0, "tolerance": 1e-3, "max_steps": 100, "cg_steps": 10, "activation": "silu"}
"""iMAML's settings (as recipes/maml/imaml_sinusoid.yaml)."""
IMAML_SCALING = {"lr": 0.01, "shrinkage": 10.0, "cg_steps": 5}
"""The scaling part's implicit mode: K fixed Adam steps (the memory's flatness in K is what it measures)."""
L2L_ERROR = (
    "`pip install learn2learn==0.2.0` (sdist, the only 0.2.0 distribution) fails to build on Python 3.11.7: "
    "`learn2learn/data/meta_dataset.c:210:12: fatal error: longintrepr.h: No such file or directory` (its "
    "pre-generated Cython C files include a header that Python 3.11 moved out of the public include path)"
)
Tasks = dict[str, Tensor]


# --- our variants -------------------------------------------------------------------------------------------------


def task_net(kind: str) -> nn.Module:
    """The task network: 1-40-40-1 for sinusoids, 64-64-64-3 for 3-way digits (ReLU)."""
    return MLP(1, 1, hidden=[40, 40]) if kind == "sinusoid" else MLP(64, 3, hidden=[64, 64])


def build(variant: str, net: nn.Module, kind: str) -> MAMLModule:
    """One of our meta-learners over a copy of ``net``'s initial weights."""
    net = copy.deepcopy(net)
    objective = TaskLoss(net, "mse" if kind == "sinusoid" else "cross_entropy")
    lr, steps = (0.01, 1) if kind == "sinusoid" else (0.4, 5)
    if variant == "hypernetwork":
        labels = kind != "sinusoid"
        amortizer = FullyAmortized(SupportSetHypernetwork(net, 1 if kind == "sinusoid" else 64,
                                                          3 if labels else 1, labels=labels))
    elif variant == "imaml":
        smooth = MLP(1, 1, hidden=[40, 40], activation=IMAML["activation"]) if kind == "sinusoid" else \
            MLP(64, 3, hidden=[64, 64], activation=IMAML["activation"])
        smooth.load_state_dict(net.state_dict())  # the same initial weights as the other variants
        objective = TaskLoss(smooth.to(parameters_vector(net).device), objective.loss)
        amortizer = ToleranceSemiAmortized(NetworkInit(objective.net), shrinkage=IMAML["shrinkage"],
                                           tolerance=IMAML["tolerance"], max_steps=IMAML["max_steps"],
                                           cg_steps=IMAML["cg_steps"])
    else:
        gradient = {"maml": "unroll", "fomaml": "first_order", "pretrained": "unroll"}[variant]
        amortizer = SemiAmortized(NetworkInit(net), steps=0 if variant == "pretrained" else steps,
                                  update=GradientStep(lr, learnable=False), gradient=gradient)
    return MAMLModule(objective, amortizer, adapt_steps=CURVE, adapt_lr=lr)


def ours_step(module: MAMLModule) -> Callable[[Tasks], None]:
    """One meta-step of a framework module: the loss the module trains with, backward, Adam."""
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def step(x: Tasks) -> None:
        loss = module.loss(module.predict_batch(x), x, module.objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# --- TorchOpt -----------------------------------------------------------------------------------------------------


def task_loss_fn(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target) if target.is_floating_point() else F.cross_entropy(out, target)


class TorchOptLoop:
    """TorchOpt's MAML as in its example: ``MetaSGD`` inner steps task by task, state saved and recovered."""

    def __init__(self, net: nn.Module, steps: int, lr: float) -> None:
        self.net = copy.deepcopy(net).requires_grad_(True)
        self.steps = steps
        self.inner = torchopt.MetaSGD(self.net, lr=lr)
        self.outer = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def loss(self, x: Tasks) -> Tensor:
        """The meta-batch's mean query loss, its backward run task by task (returns the detached mean)."""
        tasks = x["support_x"].shape[0]
        net_state = torchopt.extract_state_dict(self.net, by="reference", detach_buffers=True)
        optim_state = torchopt.extract_state_dict(self.inner)
        total = 0.0
        for i in range(tasks):
            for _ in range(self.steps):
                self.inner.step(task_loss_fn(self.net(x["support_x"][i]), x["support_y"][i]))
            query = task_loss_fn(self.net(x["query_x"][i]), x["query_y"][i]) / tasks
            query.backward()
            total += float(query.detach())
            torchopt.recover_state_dict(self.net, net_state)
            torchopt.recover_state_dict(self.inner, optim_state)
        return torch.tensor(total)

    def step(self, x: Tasks) -> None:
        self.outer.zero_grad()
        self.loss(x)
        self.outer.step()

    def weights(self) -> Tensor:
        return parameters_vector(self.net)


class TorchOptFunctional:
    """MAML batched over tasks: ``vmap`` over a task's inner steps (``torch.func.grad`` + ``torchopt.sgd``)."""

    def __init__(self, net: nn.Module, steps: int, lr: float) -> None:
        self.net = copy.deepcopy(net).requires_grad_(False)
        self.params = {k: v.detach().clone().requires_grad_() for k, v in self.net.named_parameters()}
        self.steps = steps
        self.inner = torchopt.sgd(lr)
        self.outer = torch.optim.Adam(self.params.values(), lr=1e-3)

        def support_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor) -> Tensor:
            return task_loss_fn(torch.func.functional_call(self.net, params, (sx,)), sy)

        def one_task(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            state = self.inner.init(params)
            for _ in range(self.steps):
                grads = torch.func.grad(support_loss)(params, sx, sy)
                updates, state = self.inner.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            return task_loss_fn(torch.func.functional_call(self.net, params, (qx,)), qy)

        self.batched = torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0))

    def loss(self, x: Tasks) -> Tensor:
        return self.batched(self.params, x["support_x"], x["support_y"], x["query_x"], x["query_y"]).mean()

    def step(self, x: Tasks) -> None:
        loss = self.loss(x)
        self.outer.zero_grad()
        loss.backward()
        self.outer.step()

    def weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()])


# --- measurements -------------------------------------------------------------------------------------------------


def curve_of(weights_module: MAMLModule, held: Tasks, chunk: int = 250) -> dict[str, list[float]]:
    """Query loss (and accuracy) after each of :data:`CURVE` steps on the held-out tasks: means and 95% half-widths."""
    losses, accuracies = [], []
    n = held["support_x"].shape[0]
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in held.items()}
        curve = weights_module.adaptation_curve(part)
        losses.append(torch.stack([weights_module.objective.query_loss(curve[t], part) for t in CURVE], 1))
        if weights_module.objective.classification:
            accuracies.append(torch.stack([weights_module.objective.query_accuracy(curve[t], part) for t in CURVE], 1))
    out = {}
    for name, values in (("loss", losses), ("accuracy", accuracies)):
        if values:
            mean, half = mean_ci95(torch.cat(values).detach().double())
            out[name], out[f"{name}_ci95"] = mean.tolist(), half.tolist()
    return out


def own_prediction(module: MAMLModule, held: Tasks, chunk: int = 250) -> list[float]:
    """The query loss of the model's own prediction (its own inner steps) on the held-out tasks: mean, 95% half."""
    values = []
    for start in range(0, held["support_x"].shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in held.items()}
        with torch.no_grad():
            values.append(module.objective.query_loss(module(part), part))
    mean, half = mean_ci95(torch.cat(values).double().unsqueeze(1))
    return [float(mean[0]), float(half[0])]


def proximal_residual(module: MAMLModule, held: Tasks, chunk: int = 250) -> dict[str, float]:
    """How well iMAML's inner solver solves the proximal problem on the held-out tasks, measured here anew (not the
    solver's own report): ‖∇F(ŵ)‖ / ‖∇F(θ)‖ per task (F = support loss + λ/2‖w − θ‖², ∇F(θ) = ∇f(θ)), its
    median, 90th percentile, maximum and the share of tasks within the tolerance."""
    ratios = []
    lam = module.amortizer.shrinkage
    for start in range(0, held["support_x"].shape[0], chunk):
        part = {k: v[start : start + chunk] for k, v in held.items()}
        theta = module.initial_weights(part).detach()
        with torch.no_grad():
            adapted = module(part)
        w = adapted.clone().requires_grad_()
        (g,) = torch.autograd.grad(module.objective(w, part).sum() + 0.5 * lam * ((w - theta) ** 2).sum(), w)
        t = theta.clone().requires_grad_()
        (g0,) = torch.autograd.grad(module.objective(t, part).sum(), t)
        ratios.append(g.norm(dim=-1) / g0.norm(dim=-1))
    r = torch.cat(ratios).double()
    return {"median": float(r.median()), "p90": float(r.quantile(0.9)), "max": float(r.max()),
            "converged": float((r <= IMAML["tolerance"] * (1 + 1e-3)).double().mean())}


def with_weights(weights: Tensor, net: nn.Module, kind: str) -> MAMLModule:
    """A MAML module whose initial weights are ``weights`` (to score a TorchOpt run with the same evaluation)."""
    module = build("maml", net, kind)
    with torch.no_grad():
        module.amortizer.init.value.copy_(weights)
    return module


class SavedBytes:
    """Counts the bytes of tensors autograd saves for backward while they are alive: ``live`` and ``peak``."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, t: Tensor) -> Any:
        counter = self

        class Held:
            def __init__(self) -> None:
                self.t, self.size = t, t.numel() * t.element_size()
                counter.live += self.size
                counter.peak = max(counter.peak, counter.live)

            def __del__(self) -> None:
                counter.live -= self.size

        return Held()

    def __enter__(self) -> SavedBytes:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)


def memory_of(loss_fn: Callable[[Tasks], Tensor], x: Tasks, device: torch.device) -> dict[str, float]:
    """Saved-tensor bytes of one meta-step's forward: held at the loss, and the peak (and CUDA peak on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        with SavedBytes() as saved:
            loss = loss_fn(x)
            held = saved.live
        out = {"held_kb": held / 1024, "peak_kb": saved.peak / 1024}
    except RuntimeError as err:  # torch.func.grad refuses saved-tensor hooks
        if "saved tensor hooks" not in str(err):
            raise
        loss = loss_fn(x)
        out = {"held_kb": float("nan"), "peak_kb": float("nan")}
    if loss.requires_grad:
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_kb"] = (torch.cuda.max_memory_allocated(device) - base) / 1024
    return out


def timed_interleaved(steps: dict[str, Callable[[Tasks], None]], batches: list[Tasks],
                      device: torch.device) -> dict[str, float]:
    """Median milliseconds of a meta-step of each method, the methods taking turns on every batch (after one
    warm-up step each), so that a change in the shared machine's load affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(batches[0])
    for x in batches:
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def to(x: Tasks, device: torch.device) -> Tasks:
    return {k: v.to(device) for k, v in x.items()}


# --- the three parts --------------------------------------------------------------------------------------------


def quality(kind: str, shots: int, variants: list[str], iterations: int, held_size: int,
            device: torch.device) -> dict[str, Any]:
    """Train every variant for ``iterations`` meta-steps on the same task batches; score on held-out tasks."""
    torch.manual_seed(0)
    net = task_net(kind).to(device)
    if kind == "sinusoid":
        data = SinusoidTasks(shots=shots, query=10, eval_query=100, val_size=8, test_size=8)
        held = to(data.sample_split("test", held_size, seeded_generator(0, 2)), device)
    else:
        data = FewShotDigits(val_size=8, test_size=8)
        held = to(data.sample_split("test", held_size, seeded_generator(0, 2)), device)
    batches = [to(data.sample(25, seeded_generator(0, 0, i)), device) for i in range(iterations)]
    lr, steps = (0.01, 1) if kind == "sinusoid" else (0.4, 5)
    results = {}
    for variant in variants:
        start = time.perf_counter()
        if variant.startswith("torchopt"):
            runner = (TorchOptLoop if variant == "torchopt_loop" else TorchOptFunctional)(net, steps, lr)
            for x in batches:
                runner.step(x)
            scored = with_weights(runner.weights(), net, kind)
        else:
            scored = build(variant, net, kind).to(device)
            step = ours_step(scored)
            reports = []
            for x in batches:
                step(x)
                if isinstance(scored.amortizer, ToleranceSemiAmortized):
                    reports.append(scored.amortizer.last_report.summary())
        seconds = time.perf_counter() - start
        results[variant] = {**curve_of(scored, held), "train_s": seconds, "ms_per_step": 1000 * seconds / iterations}
        if not variant.startswith("torchopt"):
            results[variant]["own"] = own_prediction(scored, held)
        if variant == "imaml":
            results[variant]["proximal_residual"] = proximal_residual(scored, held)
            results[variant]["training_solves"] = {
                key: statistics.mean(r[key] for r in reports) for key in reports[0]
            } | {"all_converged_share": statistics.mean(r["converged"] == 1.0 for r in reports),
                 "worst_converged": min(r["converged"] for r in reports),
                 "worst_max_ratio": max(r["max_ratio"] for r in reports)}
        print(f"  {kind} K={shots} {variant:>18}: {fmt_curve(results[variant])}  ({seconds:.1f} s)", flush=True)
    return results


def scaling(inner_steps: list[int], repeats: int, device: torch.device) -> dict[str, Any]:
    """Time and saved-tensor memory of one sinusoid meta-step as the inner steps grow, per gradient mode."""
    torch.manual_seed(0)
    net = task_net("sinusoid").to(device)
    data = SinusoidTasks(val_size=8, test_size=8)
    batches = [to(data.sample(25, seeded_generator(1, i)), device) for i in range(repeats)]
    out: dict[str, Any] = {}
    for k in inner_steps:
        row, steps = {}, {}
        for mode in ("unroll", "first_order", "implicit", "torchopt_functional", "torchopt_loop"):
            if mode.startswith("torchopt"):
                runner = (TorchOptLoop if mode == "torchopt_loop" else TorchOptFunctional)(net, k, 0.01)
                loss_fn, step = runner.loss, runner.step
                if mode == "torchopt_loop":  # it runs its backward task by task inside loss()
                    loss_fn = _loop_memory(runner)
            else:
                module = build("maml", net, "sinusoid").to(device)
                module.amortizer.steps, module.amortizer.gradient = k, mode
                if mode == "implicit":
                    module.amortizer.shrinkage = IMAML_SCALING["shrinkage"]
                    module.amortizer.cg_steps = IMAML_SCALING["cg_steps"]
                    module.amortizer.update = AdamStep(IMAML_SCALING["lr"], learnable=False).to(device)

                def loss_fn(x: Tasks, module: MAMLModule = module) -> Tensor:
                    return module.loss(module.predict_batch(x), x, module.objective).mean()

                step = ours_step(module)
            row[mode] = memory_of(loss_fn, batches[0], device)
            steps[mode] = step
        for mode, ms in timed_interleaved(steps, batches, device).items():
            row[mode] = {"ms": ms, **row[mode]}
        out[str(k)] = row
        print(f"  K={k:>2} inner steps: " + ", ".join(
            f"{m} {v['ms']:.2f} ms / {v['held_kb']:.0f} KiB held / {v['peak_kb']:.0f} KiB peak"
            for m, v in row.items()), flush=True)
    return out


def _loop_memory(runner: TorchOptLoop) -> Callable[[Tasks], Tensor]:
    def loss(x: Tasks) -> Tensor:
        runner.outer.zero_grad()
        return runner.loss(x)

    return loss


def gradient_agreement(device: torch.device) -> float:
    """The relative difference between our second-order MAML gradient and TorchOpt's (functional) on one batch."""
    torch.manual_seed(0)
    net = task_net("sinusoid").to(device)
    x = to(SinusoidTasks().sample(25, seeded_generator(2)), device)
    module = build("maml", net, "sinusoid").to(device)
    module.loss(module.predict_batch(x), x, module.objective).mean().backward()
    ours = module.amortizer.init.value.grad
    runner = TorchOptFunctional(net, 1, 0.01)
    runner.loss(x).backward()
    theirs = torch.cat([p.grad.reshape(-1) for p in runner.params.values()])
    return float((ours - theirs).norm() / theirs.norm())


# --- report -------------------------------------------------------------------------------------------------------


def fmt_curve(r: dict[str, Any], key: str = "loss", digits: int = 3) -> str:
    def one(m: float, h: float) -> str:
        if m != m or abs(m) > 1e4:  # a diverged curve: NaN, or too large for fixed digits
            return f"{m:.2g} (diverged)"
        return f"{m:.{digits}f} ± {h:.{digits}f}"

    return " / ".join(one(m, h) for m, h in zip(r[key], r[f"{key}_ci95"], strict=True))


NAMES = {
    "maml": "MAML (ours, unroll)", "fomaml": "first-order MAML (ours)",
    "imaml": "iMAML (ours, implicit, to tolerance; SiLU net)",
    "hypernetwork": "hypernetwork (ours, fully amortized)", "pretrained": "pre-trained + fine-tuned (Finn)",
    "torchopt_functional": "TorchOpt, batched functional", "torchopt_loop": "TorchOpt MetaSGD, per-task loop",
}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS=1 python -m benchmarks.maml{' --quick' if args.quick else ''}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {torch.__version__}, TorchOpt "
        f"{torchopt.__version__}; {meta['threads']} thread(s); load average {meta['load'][0]:.1f} at the start, "
        f"{meta['load'][1]:.1f} at the end: the 2-core machine was shared with other jobs, so times are noisy.", "",
        "### Sinusoid regression: held-out query MSE after 0 / 1 / 5 / 10 steps (± 95% CI)", "",
        f"{args.iterations} meta-iterations for every method (meta-batch 25, Adam 1e-3, the same task batches and "
        f"initial weights), {args.held_out} held-out tasks with 100 query points each; steps of 0.01 on the support "
        f"MSE from each method's initial weights.", "",
        "| shots | method | MSE after 0 / 1 / 5 / 10 steps | MSE of its own prediction | training time (s) | "
        "ms / meta-step |",
        "|---|---|---|---|---|---|",
    ]
    for shots in ("10", "5"):
        for variant, r in results["sinusoid"].get(shots, {}).items():
            own = f"{r['own'][0]:.3f} ± {r['own'][1]:.3f}" if "own" in r else "as the curve"
            lines.append(f"| {shots} | {NAMES[variant]} | {fmt_curve(r)} | {own} | {r['train_s']:.1f} | "
                         f"{r['ms_per_step']:.2f} |")
    s10 = results["sinusoid"]["10"]
    maml, base = s10["maml"]["loss"][1], s10["pretrained"]["loss"][1]
    lines += ["", "Targets:", "",
              f"- MAML after one step {maml:.3f} vs the fine-tuned baseline's {base:.3f}: "
              f"{'met' if maml < base else 'MISSED'}."]
    if "torchopt_functional" in s10:
        theirs = s10["torchopt_functional"]["loss"][1]
        lines.append(f"- Training time at K = 10 shots, 1 inner step: ours {s10['maml']['ms_per_step']:.2f} ms per "
                     f"meta-step, TorchOpt functional {s10['torchopt_functional']['ms_per_step']:.2f} ms (ratio "
                     f"{s10['maml']['ms_per_step'] / s10['torchopt_functional']['ms_per_step']:.2f}; whole runs one "
                     f"after the other, so less fair to load changes than the interleaved timings below).")
        lines.append(f"- MAML after one step {maml:.3f} vs TorchOpt's (functional) {theirs:.3f} at equal "
                     f"meta-iterations (ratio {maml / theirs:.3f}; the TorchOpt per-task loop: "
                     f"{s10.get('torchopt_loop', {}).get('loss', [math_nan()] * 4)[1]:.3f}).")
    if "proximal_residual" in s10.get("imaml", {}):
        res, train = s10["imaml"]["proximal_residual"], s10["imaml"].get("training_solves")
        tol = IMAML["tolerance"]
        lines.append(f"- iMAML's proximal problem (λ = {IMAML['shrinkage']:g}) solved to the relative tolerance "
                     f"‖∇F(ŵ)‖ ≤ {tol:g}·‖∇F(θ)‖ (at most {IMAML['max_steps']} accelerated-gradient iterations with a "
                     f"backtracking line search, per task): on the held-out tasks, measured anew, "
                     f"{100 * res['converged']:.1f}% of the tasks meet it; residual ratio median {res['median']:.1e}, "
                     f"90th percentile {res['p90']:.1e}, max {res['max']:.1e}: "
                     f"{'met' if res['converged'] == 1.0 else 'MISSED for some tasks'}.")
        if train:
            lines.append(f"- In training ({args.iterations} meta-steps of 25 tasks): on average "
                         f"{100 * train['converged']:.2f}% of a batch's tasks met the tolerance "
                         f"({100 * train['all_converged_share']:.1f}% of the batches entirely; worst batch "
                         f"{100 * train['worst_converged']:.0f}%, worst task ratio {train['worst_max_ratio']:.1e}), "
                         f"in {train['mean_steps']:.1f} iterations and {train['evaluations']:.0f} batched evaluations "
                         f"of F per solve on average. iMAML uses the 1-40-40-1 MLP with SiLU (the others ReLU, same "
                         f"initial weights): with ReLU's kinks ‖∇F‖ stalls near 0.05 of its start, whatever the "
                         f"solver.")
        if any(m != m or abs(m) > 1e4 for m in s10["imaml"]["loss"]):
            lines.append("- iMAML's adaptation curve diverges: its θ makes the support MSE so sharp (curvature past "
                         "2/0.01 = 200) that plain steps of 0.01 from θ blow up; its prediction is its own proximal "
                         "solve (the 'own prediction' column), not fixed steps.")
    if results["meta"].get("rerun"):
        rerun = results["meta"]["rerun"]
        lines.append(f"- The iMAML row was rerun alone on {rerun['date']} (`--only imaml`, load average "
                     f"{rerun['load'][0]:.1f} / {rerun['load'][1]:.1f}); every other number is from the full run "
                     f"dated above.")
    lines.append(f"- Gradient check: our second-order MAML meta-gradient and TorchOpt's differ by "
                 f"{results['gradient_agreement']:.1e} (relative norm) on the same batch and weights.")
    lines += ["", "### Time and autograd memory per meta-step as the inner steps grow", "",
              "Median ms per sinusoid meta-step (forward, backward, Adam; the methods take turns on the same "
              f"{args.repeats} batches) and the KiB of tensors autograd saves for "
              "the backward pass: held when the loss is computed, and the peak during the forward (which includes "
              "the short-lived graphs of first-order and implicit inner gradients). The implicit mode here runs K "
              "fixed Adam steps of 0.01 on the proximal problem (λ = 10, 5 CG steps), so that K varies; the iMAML row "
              "above solves to tolerance instead."
              + (" CUDA peak memory in KiB in the last column." if results["meta"]["device"] == "cuda" else ""), "",
              "| inner steps | mode | ms / meta-step | saved KiB held | saved KiB peak |"
              + (" CUDA peak KiB |" if results["meta"]["device"] == "cuda" else ""),
              "|---|---|---|---|---|" + ("---|" if results["meta"]["device"] == "cuda" else "")]
    for k, row in results["scaling"].items():
        for mode, v in row.items():
            cuda = f" {v['cuda_peak_kb']:.0f} |" if "cuda_peak_kb" in v else ""
            held = "n/a" if v["held_kb"] != v["held_kb"] else f"{v['held_kb']:.0f}"
            peak = "n/a" if v["peak_kb"] != v["peak_kb"] else f"{v['peak_kb']:.0f}"
            lines.append(f"| {k} | {mode} | {v['ms']:.2f} | {held} | {peak} |{cuda}")
    ks = list(results["scaling"])
    first, last = results["scaling"][ks[0]], results["scaling"][ks[-1]]
    lines += ["", "n/a: `torch.func.grad` refuses saved-tensor hooks, so the functional form's saved tensors cannot be "
              "counted this way (on a GPU the CUDA peak measures it). The per-task loop runs each task's backward "
              "inside the forward, so it holds nothing at the loss; its peak is one task's graph.", "",
              "Targets:", ""]
    for mode in ("first_order", "implicit"):
        ratio = last[mode]["held_kb"] / first[mode]["held_kb"]
        lines.append(f"- {mode}: held memory ×{ratio:.2f} from {ks[0]} to {ks[-1]} inner steps "
                     f"({'flat: met' if ratio < 1.05 else 'NOT flat: missed'}).")
    ratio = last["unroll"]["held_kb"] / first["unroll"]["held_kb"]
    lines.append(f"- unroll: held memory ×{ratio:.1f} from {ks[0]} to {ks[-1]} inner steps (linear growth).")
    for k in (ks[0], ks[-1]):
        ours, theirs = results["scaling"][k]["unroll"]["ms"], results["scaling"][k]["torchopt_functional"]["ms"]
        loop = results["scaling"][k]["torchopt_loop"]["ms"]
        verdict = ("no slower: met" if ours <= theirs else
                   "slower by less than the 5% that the shared machine's noise allows: met only within noise"
                   if ours <= theirs * 1.05 else "slower: missed")
        lines.append(f"- {k} inner step(s): our second-order meta-step {ours:.2f} ms, TorchOpt functional "
                     f"{theirs:.2f} ms (ratio ours / theirs {ours / theirs:.2f}: {verdict}), TorchOpt loop "
                     f"{loop:.2f} ms.")
    if results["meta"].get("timing_rerun"):
        rerun = results["meta"]["timing_rerun"]
        lines.append(f"- This time and memory table and the gradient check were rerun alone on {rerun['date']} "
                     f"(`--only timing`, {rerun['repeats']} interleaved batches per point, load average "
                     f"{rerun['load'][0]:.1f} at the start, {rerun['load'][1]:.1f} at the end); the training times "
                     f"of the first table are the full run's.")
    if results.get("digits"):
        lines += ["", "### Few-shot digits: held-out query accuracy after 0 / 1 / 5 / 10 steps (± 95% CI)", "",
                  f"3-way 5-shot tasks, digits 0-6 for meta-training, {args.held_out} tasks of the held-out digits "
                  f"7-9; a 64-64-64-3 MLP, steps of 0.4; {args.digits_iterations} meta-iterations each.", "",
                  "| method | accuracy after 0 / 1 / 5 / 10 steps | query loss after 0 / 1 / 5 / 10 | time (s) |",
                  "|---|---|---|---|"]
        for variant, r in results["digits"].items():
            lines.append(f"| {NAMES[variant]} | {fmt_curve(r, 'accuracy')} | {fmt_curve(r)} | {r['train_s']:.1f} |")
    lines += ["", f"learn2learn: not run. {L2L_ERROR}.", ""]
    return "\n".join(lines)


def math_nan() -> float:
    return float("nan")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000, help="meta-iterations per sinusoid method")
    parser.add_argument("--digits-iterations", type=int, default=300, help="meta-iterations per digits method")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out tasks")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--repeats", type=int, default=20, help="meta-steps timed per scaling point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few meta-iterations, no RESULTS.md")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--out", default=None,
                        help="folder of maml_results.json and maml_curves.png (default benchmarks/figures; a temporary "
                             "one with --quick)")
    parser.add_argument("--only", choices=["imaml", "timing"], default=None,
                        help="rerun only the sinusoid K = 10 iMAML row, or only the time and memory per meta-step "
                             "(with the gradient check), into the last full run's maml_results.json")
    args = parser.parse_args(argv)
    if args.out is None:  # a quick check leaves the full run's figure and JSON alone
        args.out = tempfile.mkdtemp(prefix="maml_quick_") if args.quick else "benchmarks/figures"
    if args.only:
        return rerun_only(args)
    if args.quick:
        args.iterations, args.digits_iterations, args.held_out, args.repeats = 5, 3, 50, 2
        args.inner_steps = [1, 3]
    device = torch.device(args.device)
    load = [os.getloadavg()[0]]
    results: dict[str, Any] = {"sinusoid": {}}
    variants = ["maml", "fomaml", "imaml", "hypernetwork", "pretrained", "torchopt_functional", "torchopt_loop"]
    print("sinusoid, K = 10 shots", flush=True)
    results["sinusoid"]["10"] = quality("sinusoid", 10, variants, args.iterations, args.held_out, device)
    print("sinusoid, K = 5 shots", flush=True)
    results["sinusoid"]["5"] = quality("sinusoid", 5, ["maml", "pretrained", "torchopt_functional"],
                                       args.iterations, args.held_out, device)
    results["gradient_agreement"] = gradient_agreement(device)
    print("scaling in the inner steps", flush=True)
    results["scaling"] = scaling(args.inner_steps, args.repeats, device)
    print("few-shot digits", flush=True)
    results["digits"] = quality("digits", 5, ["maml", "fomaml", "hypernetwork", "pretrained"],
                                args.digits_iterations, args.held_out, device)
    load.append(os.getloadavg()[0])
    results["meta"] = {"date": str(date.today()), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                       "threads": torch.get_num_threads(), "load": load, "device": device.type,
                       "iterations": args.iterations, "digits_iterations": args.digits_iterations,
                       "held_out": args.held_out, "repeats": args.repeats}
    text = report(results, args)
    print(text)
    out = Path(args.out)
    write_atomically(out / "maml_results.json", json.dumps(results, indent=1))
    save_figure(results, out / "maml_curves.png")
    if not args.quick:
        write_section(Path(args.results), SECTION, text)
    return results


def rerun_only(args: argparse.Namespace) -> dict[str, Any]:
    """Rerun one K = 10 sinusoid row (``imaml``) or the time and memory part (``timing``: :func:`scaling` with
    ``--inner-steps`` and ``--repeats``, and :func:`gradient_agreement`), and rewrite the report with every other
    number from the last full run."""
    out = Path(args.out)
    saved = out / "maml_results.json"
    if not saved.exists():
        raise SystemExit(f"--only {args.only}: no full run's results at {saved}; run the full benchmark first")
    results = json.loads(saved.read_text())
    args.iterations, args.held_out = results["meta"]["iterations"], results["meta"].get("held_out", args.held_out)
    args.digits_iterations = results["meta"]["digits_iterations"]
    load = [os.getloadavg()[0]]
    device = torch.device(args.device)
    if args.only == "timing":
        print("scaling in the inner steps (the time and memory part only)", flush=True)
        results["scaling"] = scaling(args.inner_steps, args.repeats, device)
        results["gradient_agreement"] = gradient_agreement(device)
        load.append(os.getloadavg()[0])
        results["meta"]["repeats"] = args.repeats
        results["meta"]["timing_rerun"] = {"date": str(date.today()), "load": load, "repeats": args.repeats}
        return _rewrite(results, args, saved, out)
    args.repeats = results["meta"].get("repeats", 20)
    print(f"sinusoid, K = 10 shots, {args.only} only", flush=True)
    row = quality("sinusoid", 10, [args.only], args.iterations, args.held_out, device)[args.only]
    results["sinusoid"]["10"][args.only] = row
    load.append(os.getloadavg()[0])
    results["meta"]["rerun"] = {"variants": [args.only], "date": str(date.today()), "load": load}
    return _rewrite(results, args, saved, out)


def _rewrite(results: dict[str, Any], args: argparse.Namespace, saved: Path, out: Path) -> dict[str, Any]:
    """Print the report of updated ``results``, save them with the figure, and rewrite the RESULTS.md section."""
    text = report(results, args)
    print(text)
    write_atomically(saved, json.dumps(results, indent=1))
    save_figure(results, out / "maml_curves.png")
    write_section(Path(args.results), SECTION, text)
    return results


def save_figure(results: dict[str, Any], path: Path) -> None:
    """The adaptation curves of every sinusoid method (K = 10) and the held memory against inner steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant, r in results["sinusoid"]["10"].items():
        mean, half = torch.tensor(r["loss"]), torch.tensor(r["loss_ci95"])
        left.plot(CURVE, mean, marker="o", label=NAMES[variant])
        left.fill_between(CURVE, mean - half, mean + half, alpha=0.2)
    left.set(xlabel="inner steps (0.01) on the support set", ylabel="held-out query MSE", yscale="log")
    left.legend(fontsize=7)
    ks = [int(k) for k in results["scaling"]]
    for mode in next(iter(results["scaling"].values())):
        right.plot(ks, [results["scaling"][str(k)][mode]["held_kb"] for k in ks], marker="o", label=mode)
    right.set(xlabel="inner steps", ylabel="saved tensors held for backward (KiB)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
