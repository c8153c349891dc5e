"""Two components in one AmortizedModule (the amortizer and a learnable objective, each with its own loss, optimizer
and scheduler) and the public evaluation hook. The actor–critic of ``docs/components.md`` is the toy problem: the
tests load it from the page, and run the page's script as written."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules import SphereContexts
from datamodules.context import ContextDataModule
from lightning_amor import MLP, AmortizedModule, FullyAmortized, GradientStep, NonFiniteLossError, SemiAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.cli import AmortCLI
from lightning_amor.objective import Context

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "components.md"
SGD = functools.partial(torch.optim.SGD, lr=0.05)


def example_source() -> str:
    """The code of the page's ``actor_critic.py`` block."""
    match = re.search(r'^```python title="actor_critic.py"\n(.*?)^```', PAGE.read_text(encoding="utf-8"), re.S | re.M)
    assert match, f"{PAGE} has no actor_critic.py block"
    return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> ModuleType:
    """The page's example, imported as a module."""
    path = tmp_path_factory.mktemp("example") / "actor_critic.py"
    path.write_text(example_source())
    spec = importlib.util.spec_from_file_location("actor_critic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    config = dict(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    config.update(kwargs)
    return pl.Trainer(**config)


def transition_batches(example: ModuleType, sizes: list[int], seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [example.transitions(size, generator) for size in sizes]


def loader(batches: list[dict]) -> DataLoader:
    """A loader that yields the given whole batches in order."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts, lists and tensors (an optimizer's ``state_dict``, say)."""
    if isinstance(a, Tensor):
        assert torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- each loss moves only its own component ----------------------------------------------------------------


def actor(example: ModuleType, kind: str):
    if kind == "full":
        return FullyAmortized(example.Actor())
    return SemiAmortized(example.Actor(), steps=2, update=GradientStep(lr=0.05))


@pytest.mark.parametrize("kind", ["full", "semi"])
def test_the_critic_learns_from_its_td_loss_alone_and_the_actor_from_its_own(tmp_path, example, kind):
    torch.manual_seed(0)
    module = example.ActorCritic(example.NegativeQ(), actor(example, kind), optimizer=SGD, objective_optimizer=SGD)
    critic, amortizer = copy.deepcopy(module.objective), copy.deepcopy(module.amortizer)
    batches = transition_batches(example, [8, 8, 8])
    make_trainer(tmp_path, max_steps=3).fit(module, train_dataloaders=loader(batches))

    # By hand: the actor descends f(π(x); x) with the critic held constant, the critic descends its TD loss alone.
    critic_sgd, actor_sgd = SGD(critic.parameters()), SGD(amortizer.parameters())
    for batch in batches:
        x = batch["x"]
        for p in critic.parameters():
            p.requires_grad_(False)
        actor_loss = critic(amortizer(x, critic).y, x).mean()
        for p in critic.parameters():
            p.requires_grad_(True)
        td_loss = ((-critic(x["action"], x) - x["reward"]) ** 2).mean()
        actor_sgd.zero_grad()
        critic_sgd.zero_grad()
        actor_loss.backward()
        assert all(p.grad is None for p in critic.parameters())
        td_loss.backward()
        actor_sgd.step()
        critic_sgd.step()

    for name, value in module.objective.state_dict().items():
        assert torch.equal(value, critic.state_dict()[name]), f"critic {name}: not what its TD loss alone gives"
    for name, value in module.amortizer.state_dict().items():
        assert torch.equal(value, amortizer.state_dict()[name]), f"actor {name}: not what its own loss gives"
    torch.manual_seed(0)
    initial = example.ActorCritic(example.NegativeQ(), actor(example, kind))
    for trained, start in ((module.objective, initial.objective), (module.amortizer, initial.amortizer)):
        assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True)), (
            "nothing moved"
        )


def test_two_components_count_training_steps_and_get_one_optimizer_each(tmp_path, example):
    module = example.make_module()
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, train_dataloaders=loader(transition_batches(example, [8] * 3)))
    assert trainer.global_step == 4, "global_step counts training steps, not optimizer steps"
    assert not module.automatic_optimization
    actor_optimizer, critic_optimizer = trainer.optimizers
    actor_params = {id(p) for group in actor_optimizer.param_groups for p in group["params"]}
    critic_params = {id(p) for group in critic_optimizer.param_groups for p in group["params"]}
    assert actor_params == {id(p) for p in module.amortizer.parameters()}
    assert critic_params == {id(p) for p in module.objective.parameters()}
    assert actor_optimizer.param_groups[0]["lr"] == 3e-3 and critic_optimizer.param_groups[0]["lr"] == 1e-2


def test_one_optimizer_keeps_automatic_optimization(example):
    module = AmortizedModule(example.NegativeQ(), FullyAmortized(example.Actor()))
    assert module.automatic_optimization
    assert isinstance(module.configure_optimizers(), torch.optim.Adam)


def test_bad_component_settings_are_named(example):
    with pytest.raises(ValueError, match="objective_lr_scheduler schedules objective_optimizer, which is not set"):
        AmortizedModule(example.NegativeQ(), FullyAmortized(example.Actor()),
                        objective_lr_scheduler=torch.optim.lr_scheduler.ConstantLR)
    with pytest.raises(ValueError, match="SphereObjective has no learnable parameters to optimize"):
        AmortizedModule(SphereObjective(), FullyAmortized(MLP(16, 3)), objective_optimizer=torch.optim.Adam)


# --- non-finite losses -------------------------------------------------------------------------------------


def test_a_nan_in_the_critics_loss_skips_the_step_for_every_component(tmp_path, example):
    batches = transition_batches(example, [8] * 4)
    batches[1]["x"]["reward"][3] = float("nan")  # the TD loss is NaN, the actor's loss finite
    torch.manual_seed(0)
    module = example.make_module()
    module.nonfinite = "skip"
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, train_dataloaders=loader(batches))
    assert module.skipped_steps == 1 and trainer.global_step == 4, "a skipped step still counts as a training step"

    torch.manual_seed(0)
    reference = example.make_module()
    clean = make_trainer(tmp_path, max_steps=3)
    clean.fit(reference, train_dataloaders=loader([b for i, b in enumerate(batches) if i != 1]))
    assert_same_tensors(module.state_dict(), reference.state_dict(), "parameters")
    for mine, theirs in zip(trainer.optimizers, clean.optimizers, strict=True):
        assert_same_tensors(mine.state_dict(), theirs.state_dict(), "optimizer")


def test_a_nan_in_the_critics_loss_raises_naming_the_component(tmp_path, example):
    batches = transition_batches(example, [8] * 3)
    batches[1]["x"]["reward"][3] = float("nan")
    module = example.make_module()
    trainer = make_trainer(tmp_path, max_steps=3)
    pattern = r"non-finite objective_loss at global step 1 .*1 of 8 contexts, batch indices \[3\]"
    with pytest.raises(NonFiniteLossError, match=pattern):
        trainer.fit(module, train_dataloaders=loader(batches))
    assert trainer.global_step == 1
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


class GradientNaNCritic(SphereObjective):
    """The sphere objective plus a learnable s with a finite value, 0, and a NaN gradient: sqrt(0·s)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def value(self, y: Tensor, x: Context) -> Tensor:
        return super().value(y, x) + torch.sqrt(0.0 * self.shift)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_non_finite_gradient_of_the_objective_raises_or_skips(tmp_path, mode):
    module = AmortizedModule(GradientNaNCritic(), FullyAmortized(MLP(16, 3, hidden=[8])), nonfinite=mode,
                             objective_optimizer=torch.optim.Adam)
    start = copy.deepcopy(module.state_dict())
    trainer = make_trainer(tmp_path, max_steps=2)
    batches = [{"x": SphereContexts().sample(8, torch.Generator().manual_seed(i))} for i in range(2)]
    if mode == "raise":
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at global step 0 .*objective\.shift"):
            trainer.fit(module, train_dataloaders=loader(batches))
        return
    trainer.fit(module, train_dataloaders=loader(batches))
    assert module.skipped_steps == 2 and trainer.global_step == 2
    assert_same_tensors(module.state_dict(), start, "parameters")
    assert all(not optimizer.state for optimizer in trainer.optimizers), "a skipped step touched an optimizer"


# --- exact resume ------------------------------------------------------------------------------------------


class ShiftedSphere(SphereObjective):
    """The sphere objective plus (s − 0.5)² for a learnable s (a stand-in for a decoder or a critic)."""

    def __init__(self) -> None:
        super().__init__(grid_points=256, starts=2)
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def value(self, y: Tensor, x: Context) -> Tensor:
        return super().value(y, x) + (self.shift - 0.5) ** 2


def two_component_sphere() -> AmortizedModule:
    torch.manual_seed(0)
    return AmortizedModule(
        ShiftedSphere(), FullyAmortized(MLP(16, 3, hidden=[16])),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
        objective_optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        objective_lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.7),
    )


def test_resuming_two_components_mid_epoch_continues_exactly(tmp_path):
    def data() -> SphereContexts:
        return SphereContexts(batch_size=8, batches_per_epoch=4, val_size=8, test_size=8,
                              cache_dir=str(tmp_path / "cache"))

    straight_module = two_component_sphere()
    straight = make_trainer(tmp_path, max_steps=10)
    straight.fit(straight_module, data())
    first = make_trainer(tmp_path, max_steps=5)  # stops within the second epoch
    first.fit(two_component_sphere(), data())
    assert first.global_step == 5
    first.save_checkpoint(tmp_path / "stop.ckpt")
    resumed_module = two_component_sphere()
    resumed = make_trainer(tmp_path, max_steps=10)
    resumed.fit(resumed_module, data(), ckpt_path=tmp_path / "stop.ckpt")

    assert straight.global_step == resumed.global_step == 10
    assert_same_tensors(resumed_module.state_dict(), straight_module.state_dict(), "parameters")
    for mine, theirs in zip(resumed.optimizers, straight.optimizers, strict=True):
        assert_same_tensors(mine.state_dict(), theirs.state_dict(), "optimizer")
    for mine, theirs in zip(resumed.lr_scheduler_configs, straight.lr_scheduler_configs, strict=True):
        assert_same_tensors(mine.scheduler.state_dict(), theirs.scheduler.state_dict(), "scheduler")
    assert straight.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.7**5), "stepped every step"
    assert float(straight_module.objective.shift.detach()) != 0.0, "the objective's parameter must have trained"


# --- the evaluation hook -----------------------------------------------------------------------------------


def test_evaluation_metrics_are_means_over_contexts(tmp_path, example):
    module = example.make_module()
    sizes = [2, 6, 3]  # unequal, so a mean of batch means differs from the mean over contexts
    batches = transition_batches(example, sizes, seed=4)
    (validated,) = make_trainer(tmp_path, limit_val_batches=None).validate(module, loader(batches), verbose=False)
    (tested,) = make_trainer(tmp_path, limit_test_batches=None).test(module, loader(batches), verbose=False)
    with torch.no_grad():
        errors = torch.cat([module.evaluation_metrics(evaluated(module, b["x"]))["action_error"] for b in batches])
    batch_means = torch.stack([e.mean() for e in errors.split(sizes)]).mean()
    assert not torch.isclose(errors.mean(), batch_means)
    assert validated["val/action_error"] == pytest.approx(float(errors.mean()), rel=1e-6)
    assert tested["test/action_error"] == pytest.approx(float(errors.mean()), rel=1e-6)


def evaluated(module: AmortizedModule, x: dict):
    from lightning_amor.module import Evaluated

    y = module(x)
    return Evaluated(x, y, None, module.objective(y, x), None)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (lambda ev, calls: {"gap": ev.value}, r"the metric name 'gap' is not allowed"),
        (lambda ev, calls: {"a.b": ev.value}, r"the metric name 'a.b' is not allowed"),
        (lambda ev, calls: {"mean": ev.value.mean()}, r"'mean' must hold one value per context, shape \(4,\)"),
        (lambda ev, calls: {f"m{calls}": ev.value}, r"returned the metrics \['m1'\] for this batch but \['m0'\]"),
    ],
    ids=["core-name", "dot", "not-per-context", "changing-names"],
)
def test_bad_evaluation_metrics_are_named(tmp_path, example, metrics, message):
    class Bad(example.ActorCritic):
        calls = 0

        def evaluation_metrics(self, evaluated):
            out = metrics(evaluated, self.calls)
            self.calls += 1
            return out

    module = Bad(example.NegativeQ(), FullyAmortized(example.Actor()))
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, limit_val_batches=None).validate(
            module, loader(transition_batches(example, [4, 4])), verbose=False
        )


# --- LightningCLI, and the page's example as a script ---------------------------------------------------------


VAE_RECIPE = """\
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
model:
  class_path: lightning_amor.apps.vae.VAEModule
  init_args:
    objective:
      class_path: lightning_amor.apps.vae.ELBOObjective
      init_args:
        decoder: {class_path: lightning_amor.MLP, init_args: {in_features: 2, out_features: 64, hidden: [8]}}
        latent_dim: 2
    amortizer:
      class_path: lightning_amor.FullyAmortized
      init_args:
        net: {class_path: lightning_amor.MLP, init_args: {in_features: 64, out_features: 4, hidden: [8]}}
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}
    objective_optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.0003}}
    objective_lr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 1, gamma: 0.5}}
    num_images: 0
data:
  class_path: datamodules.DigitsImages
  init_args: {batch_size: 8, batches_per_epoch: 2, val_size: 8, test_size: 8, eval_batch_size: 8}
"""


def test_a_recipe_gives_the_decoder_its_own_optimizer_and_scheduler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae.yaml").write_text(VAE_RECIPE)
    cli = AmortCLI(
        AmortizedModule, ContextDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        auto_configure_optimizers=False, args=["--config", str(tmp_path / "vae.yaml")],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    encoder_optimizer, decoder_optimizer = cli.trainer.optimizers
    assert encoder_optimizer.param_groups[0]["lr"] == 0.001
    assert decoder_optimizer.param_groups[0]["lr"] == pytest.approx(0.0003 * 0.5**2)
    decoder = {id(p) for p in cli.model.objective.parameters()}
    assert {id(p) for group in decoder_optimizer.param_groups for p in group["params"]} == decoder


def test_the_pages_example_runs_and_prints_what_the_page_shows(tmp_path, monkeypatch, capsys):
    (tmp_path / "actor_critic.py").write_text(example_source())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "actor_critic.py"), run_name="__main__")
    pattern = r"action error: ([\d.]+) before training, ([\d.]+) after 400 steps"
    measured = [float(v) for v in re.search(pattern, capsys.readouterr().out).groups()]
    shown = [float(v) for v in re.search(pattern, PAGE.read_text(encoding="utf-8")).groups()]
    assert measured[0] == pytest.approx(shown[0], rel=0.2)
    assert measured[1] <= 1.5 * shown[1] and measured[1] < measured[0] / 3


# --- DDP -----------------------------------------------------------------------------------------------------


DDP_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, torch
    from pytorch_lightning import Trainer, seed_everything
    from torch.utils.data import DataLoader

    out, path = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("actor_critic", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    train = [example.transitions(16, generator) for _ in range(8)]
    train[3]["x"]["reward"][5] = float("nan")  # rank 1's second batch (a DistributedSampler gives rank r r, r+2, ...)
    held_out = [example.transitions(size, generator) for size in (2, 6, 2, 6)]  # rank 0: 2 + 2, rank 1: 6 + 6
    module = example.make_module()
    module.nonfinite = "skip"
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(train, batch_size=None))
    (val,) = trainer.validate(module, DataLoader(held_out, batch_size=None), verbose=False)
    torch.save({"state": module.state_dict(), "optimizers": [o.state_dict() for o in trainer.optimizers],
                "skipped": module.skipped_steps, "step": trainer.global_step, "val": val,
                "held_out": held_out}, f"{out}/rank{trainer.global_rank}.pt")
    """
)


def test_ddp_two_components_stay_in_step_and_average_metrics_over_contexts(tmp_path, example):
    (tmp_path / "actor_critic.py").write_text(example_source())
    (tmp_path / "ddp_fit.py").write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "ddp_fit.py"), str(tmp_path), str(tmp_path / "actor_critic.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1, "the NaN on rank 1 must skip the step on both ranks"
    assert r0["step"] == r1["step"] == 4
    assert_same_tensors(r0["state"], r1["state"], "parameters")
    assert_same_tensors(r0["optimizers"], r1["optimizers"], "optimizers")
    assert any(not torch.equal(v, example.make_module().state_dict()[k]) for k, v in r0["state"].items())

    module = example.make_module()
    module.load_state_dict(r0["state"])
    with torch.no_grad():
        held_out = [r0["held_out"][i] for i in (0, 2, 1, 3)]  # rank 0's batches, then rank 1's
        errors = torch.cat([module.evaluation_metrics(evaluated(module, b["x"]))["action_error"] for b in held_out])
    rank_means = torch.stack([errors[:4].mean(), errors[4:].mean()])  # rank 0's 2 + 2 contexts, rank 1's 6 + 6
    assert not torch.isclose(rank_means.mean(), errors.mean()), "the batches must tell the two means apart"
    assert r0["val"]["val/action_error"] == r1["val"]["val/action_error"]
    assert r0["val"]["val/action_error"] == pytest.approx(float(errors.mean()), rel=1e-5)
