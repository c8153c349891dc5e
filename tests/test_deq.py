"""The DEQ application: digits with labels, the DEQ classifier as a fixed-point objective, its module and figures."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from datamodules.digits_classes import DigitsClasses, shifted
from lightning_amor.amortizers import AmortizedOutput, FullyAmortized
from lightning_amor.apps.deq import DEQClassifier, DEQModule, InjectionInitializer, KeyedMLP, SolvedRegressionLoss
from lightning_amor.fixed_point import Anderson, FixedPointIteration
from lightning_amor.objective import ObjectiveShapeError
from lightning_amor.residual_figures import residual_curves_figure, residual_trace


@pytest.fixture(scope="module")
def digits():
    data = DigitsClasses(val_size=64, test_size=64, batch_size=32)
    return data


def batch(data: DigitsClasses, num: int = 32, seed: int = 0) -> dict:
    return data.sample(num, torch.Generator().manual_seed(seed))


def make_module(solver=None, loss=None) -> DEQModule:
    torch.manual_seed(0)
    objective = DEQClassifier(hidden=16, solver=solver or Anderson(steps=100, atol=1e-5))
    return DEQModule(
        objective, FullyAmortized(KeyedMLP(64, 16, hidden=[32])), loss=loss,
        objective_optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )


def test_digits_come_with_their_labels_in_disjoint_fixed_splits(digits):
    x = batch(digits)
    assert x["image"].shape == (32, 64) and x["label"].dtype == torch.int64
    assert 0.0 <= float(x["image"].min()) and float(x["image"].max()) <= 1.0
    val = digits.sample_split("val", 64, torch.Generator())
    again = DigitsClasses(val_size=64, test_size=64).sample_split("val", 64, torch.Generator().manual_seed(5))
    assert torch.equal(val["image"], again["image"]) and torch.equal(val["label"], again["label"])
    rows = {tuple(r.tolist()) for r in digits.split("train")["image"]}
    assert not any(tuple(r.tolist()) in rows for r in digits.split("test")["image"][:20])
    assert len(digits.split("train")["label"]) == 1797 - 128
    with pytest.raises(ValueError, match="leave none"):
        DigitsClasses(val_size=1000, test_size=900).split("train")


def test_training_digits_can_be_shifted_by_whole_pixels_and_held_out_ones_never_are():
    image = torch.zeros(1, 64)
    image[0, 8 * 3 + 4] = 1.0  # row 3, column 4
    moved = shifted(image.repeat(3, 1), torch.tensor([[1, 0], [0, -2], [-3, 7]]))
    assert moved.reshape(3, 8, 8)[0, 4, 4] == 1 and moved.reshape(3, 8, 8)[1, 3, 2] == 1
    assert float(moved[2].sum()) == 0.0  # moved out of the frame: blank
    plain = DigitsClasses(val_size=64, test_size=64)
    moving = DigitsClasses(val_size=64, test_size=64, shift=1)
    same = torch.Generator().manual_seed(4)
    a, b = plain.sample(64, torch.Generator().manual_seed(4)), moving.sample(64, same)
    assert torch.equal(a["label"], b["label"]) and not torch.equal(a["image"], b["image"])
    assert bool((b["image"].sum(-1) <= a["image"].sum(-1) + 1e-6).all())  # a shift can only push ink out
    assert torch.equal(plain.sample_split("test", 64, same)["image"], moving.sample_split("test", 64, same)["image"])
    with pytest.raises(ValueError, match="shift"):
        DigitsClasses(shift=8)


def test_the_deq_layer_is_a_contraction_whose_fixed_point_the_solvers_find(digits):
    objective = DEQClassifier(hidden=32, contraction=0.9)
    with torch.no_grad():
        objective.recurrent.mul_(10.0)  # the bound holds whatever the raw weights
    assert float(torch.linalg.matrix_norm(objective.weight().detach(), ord=2)) <= 0.9 + 1e-6
    x = batch(digits)
    plain = FixedPointIteration(steps=500, atol=1e-6).solve(objective, x)
    anderson = Anderson(steps=500, atol=1e-6).solve(objective, x)
    assert bool(plain.converged.all()) and bool(anderson.converged.all())
    assert float((plain.y - anderson.y).norm(dim=-1).max()) < 1e-4
    assert objective.residual_flat(anderson.y, x).max() <= 1e-6


def test_bad_contexts_and_settings_are_clear_errors(digits):
    objective = DEQClassifier(hidden=8)
    x = batch(digits, 4)
    with pytest.raises(ObjectiveShapeError, match="dict contexts with the key 'image'"):
        objective.solve(x["image"])
    with pytest.raises(ObjectiveShapeError, match="input_dim"):
        objective.solve({"image": torch.zeros(4, 65), "label": x["label"]})
    with pytest.raises(ObjectiveShapeError, match="class indices"):
        objective.labels({"image": x["image"], "label": x["label"].float()})
    nan = dict(x, image=x["image"].clone())
    nan["image"][1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"contexts\['image'\] hold NaN or infinite numbers in rows \[1\]"):
        objective.solve(nan)
    with pytest.raises(ValueError, match="contraction"):
        DEQClassifier(contraction=1.0)
    with pytest.raises(ValueError, match="objective_optimizer"):
        DEQModule(objective, FullyAmortized(KeyedMLP(64, 8)))


class CountingAnderson(Anderson):
    calls = 0

    def _solve(self, *args, **kwargs):
        CountingAnderson.calls += 1
        return super()._solve(*args, **kwargs)


def test_the_task_loss_trains_only_the_deq_through_the_implicit_gradient(digits):
    module = make_module(solver=CountingAnderson(steps=100, atol=1e-5), loss=SolvedRegressionLoss(0.5))
    x = batch(digits)
    output = module.amortizer(x, module.objective)
    CountingAnderson.calls = 0
    amortizer_loss = module.loss(output, x, module.objective)
    detached = AmortizedOutput(y=output.y.detach(), iterates=[output.y.detach()])
    task = module.objective_loss(x, None, detached)
    assert CountingAnderson.calls == 1  # the task loss reused the regression target's solve
    assert task.shape == (32,) and amortizer_loss.shape == (32,)
    task.mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.objective.parameters())
    assert all(p.grad is None for p in module.amortizer.parameters())
    # the implicit gradient of the head's input equals the one through 200 unrolled steps of g
    objective = module.objective
    head_grad = objective.recurrent.grad.clone()
    objective.zero_grad()
    g = objective.fixed_point_map(x)
    z = module.loss.last[1].y
    for _ in range(200):
        z = g(z)
    torch.nn.functional.cross_entropy(objective.logits(z), x["label"], reduction="none").mean().backward()
    torch.testing.assert_close(head_grad, objective.recurrent.grad, atol=1e-5, rtol=1e-3)


def test_the_equilibrium_term_pulls_the_fixed_point_towards_the_initializer(digits):
    """λ‖z* − ẑ‖² is added to the task loss per context, and gradient steps on φ alone (ẑ held constant) bring z*
    closer to ẑ than the task loss alone does."""
    x = batch(digits)
    plain, pulled = make_module(), make_module()
    pulled.equilibrium_weight = 5.0
    output = plain.amortizer(x, plain.objective)
    start = AmortizedOutput(y=output.y.detach(), iterates=[])
    task, total = plain.objective_loss(x, None, start), pulled.objective_loss(x, None, start)
    z_star = plain.objective.solver.solve(plain.objective, x, init=start.y).y
    torch.testing.assert_close(total, task + 5.0 * ((z_star - start.y) ** 2).sum(-1), atol=1e-4, rtol=1e-4)

    def distance_after_steps(module: DEQModule) -> float:
        optimizer = torch.optim.Adam(module.objective.parameters(), lr=1e-2)
        for _ in range(15):
            optimizer.zero_grad()
            module.objective_loss(x, None, start).mean().backward()
            optimizer.step()
        with torch.no_grad():
            z = module.objective.solver.solve(module.objective, x, init=start.y).y
        return float((z - start.y).norm(dim=-1).median())

    before = float((z_star - start.y).norm(dim=-1).median())
    assert distance_after_steps(pulled) < 0.5 * min(before, distance_after_steps(plain))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="equilibrium_weight must be a non-negative number"):
            DEQModule(plain.objective, plain.amortizer, objective_optimizer=torch.optim.Adam, equilibrium_weight=bad)


def test_the_injection_initializer_starts_where_one_step_from_zero_lands_and_learns_the_rest(digits):
    objective = DEQClassifier(hidden=16)
    initializer = InjectionInitializer(64, 16, hidden=[32])
    x = batch(digits, 8)
    with torch.no_grad():
        last = initializer.net.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        start = initializer(x, objective).y
        torch.testing.assert_close(start, objective.step(torch.zeros(8, 16), x))  # tanh(U x + b) = g(0)
    assert start.shape == (8, 16) and bool((start.abs() < 1).all())
    # the net's part learns (φ frozen by the module; here its gradient is simply not asked for)
    loss = SolvedRegressionLoss()(initializer(x, objective), x, objective).mean()
    loss.backward()
    assert float(last.weight.grad.abs().sum()) > 0
    with pytest.raises(ObjectiveShapeError, match="hidden_dim=16 but the DEQ has input_dim=64, hidden=8"):
        initializer(x, DEQClassifier(hidden=8))
    with pytest.raises(TypeError, match="needs a DEQClassifier"):
        initializer(x, object())
    with pytest.raises(ObjectiveShapeError, match="key 'image'"):
        initializer({"pixels": x["image"]}, objective)


@pytest.mark.parametrize("augmentation", [dict(shift=1, shift_share=0.5), dict(mix_share=0.3, noise=0.2,
                                                                               noise_share=0.3)])
def test_augmented_digits_train_the_initializer_but_not_the_task(digits, augmentation):
    module = make_module()
    x = DigitsClasses(val_size=64, test_size=64, **augmentation).sample(32, torch.Generator().manual_seed(2))
    assert x["augmented"].dtype == torch.bool and 0 < int(x["augmented"].sum()) < 32
    output = module.amortizer(x, module.objective)
    task = module.objective_loss(x, None, AmortizedOutput(y=output.y.detach(), iterates=[]))
    assert bool((task[x["augmented"]] == 0).all()) and bool((task[~x["augmented"]] > 0).all())
    plain = module.objective_loss({k: x[k] for k in ("image", "label")}, None,
                                  AmortizedOutput(y=output.y.detach(), iterates=[]))
    torch.testing.assert_close(task.mean(), plain[~x["augmented"]].mean())  # the mean over the kept digits


def test_the_equilibrium_term_counts_for_augmented_inputs_too(digits):
    """The label-free term λ‖z* − ẑ‖² is kept where the cross-entropy is dropped (an augmented image has no label)."""
    module = make_module()
    module.equilibrium_weight = 2.0
    x = DigitsClasses(val_size=64, test_size=64, mix_share=0.5).sample(32, torch.Generator().manual_seed(2))
    start = AmortizedOutput(y=module.amortizer(x, module.objective).y.detach(), iterates=[])
    loss = module.objective_loss(x, None, start)
    z_star = module.objective.solver.solve(module.objective, x, init=start.y).y
    equilibrium = 2.0 * ((z_star - start.y) ** 2).sum(-1)
    moved = x["augmented"]
    assert 0 < int(moved.sum()) < 32
    torch.testing.assert_close(loss[moved], equilibrium[moved], atol=1e-4, rtol=1e-4)
    assert bool((loss[~moved] > equilibrium[~moved]).all())  # plus the cross-entropy


def test_mixed_and_noised_training_images_are_marked_reproducible_and_never_held_out():
    plain = DigitsClasses(val_size=64, test_size=64)
    mixing = DigitsClasses(val_size=64, test_size=64, mix_share=0.5)
    a = plain.sample(256, torch.Generator().manual_seed(3))
    b = mixing.sample(256, torch.Generator().manual_seed(3))
    assert torch.equal(a["label"], b["label"]) and "augmented" not in a
    kept = ~b["augmented"]
    assert 64 < int(b["augmented"].sum()) < 192  # about half, drawn per image
    assert torch.equal(a["image"][kept], b["image"][kept])  # the others untouched
    train = {tuple(r.tolist()) for r in plain.split("train")["image"]}
    assert not any(tuple(r.tolist()) in train for r in b["image"][b["augmented"]][:20])  # new images
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0  # a mixture stays in the pixel range
    again = mixing.sample(256, torch.Generator().manual_seed(3))
    assert torch.equal(b["image"], again["image"]) and torch.equal(b["augmented"], again["augmented"])
    noisy = DigitsClasses(val_size=64, test_size=64, noise=0.3, noise_share=0.25).sample(
        256, torch.Generator().manual_seed(3))
    moved = noisy["image"] - a["image"]
    assert bool((moved[~noisy["augmented"]] == 0).all())
    assert abs(float(moved[noisy["augmented"]].std()) - 0.3) < 0.02
    for held in ("val", "test"):
        assert "augmented" not in mixing.sample_split(held, 64, torch.Generator())
        torch.testing.assert_close(mixing.sample_split(held, 64, torch.Generator())["image"],
                                   plain.sample_split(held, 64, torch.Generator())["image"])
    for bad, match in ((dict(mix_share=1.5), "mix_share must lie in"), (dict(noise=-0.1), "noise must be"),
                       (dict(noise=float("nan")), "noise must be"), (dict(noise_share=float("nan")), "noise_share")):
        with pytest.raises(ValueError, match=match):
            DigitsClasses(**bad)


def test_an_unconverged_forward_solve_is_reported(digits):
    module = make_module(solver=Anderson(steps=1, atol=1e-9))
    x = batch(digits, 8)
    output = module.amortizer(x, module.objective)
    with pytest.warns(RuntimeWarning, match=r"forward fixed-point solve did not converge for 8 of 8 .*max_steps"):
        module.objective_loss(x, None, AmortizedOutput(y=output.y.detach(), iterates=[]))


def test_validation_metrics_report_accuracy_and_work_from_both_starts(digits):
    module = make_module()
    module.eval()
    x = batch(digits, 32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        out = module._evaluate({"x": x}, "val")
    metrics = {k: float(v.compute()) for k, v in module.evaluation_means["val"].items()}
    assert set(metrics) == {"accuracy", "cold_accuracy", "initializer_accuracy", "cold_iterations", "cold_converged",
                            "residual", "iterations", "converged"}
    assert metrics["converged"] == 1.0 and metrics["cold_converged"] == 1.0
    assert metrics["accuracy"] == metrics["cold_accuracy"]  # one fixed point, whatever the start
    assert metrics["cold_iterations"] > 0 and out["y_star"].shape == (32, 16)


def test_residual_curves_trace_every_iterate(digits):
    objective = DEQClassifier(hidden=16)
    x = batch(digits, 8)
    solver = FixedPointIteration(steps=50, atol=1e-6)
    trace = residual_trace(solver, objective, x)
    result = solver.solve(objective, x)
    assert trace.shape == (int(result.iterations.max()) + 1, 8)
    torch.testing.assert_close(trace, result.residuals.float())
    figure = residual_curves_figure({"from zero": trace, "from z*": trace[-1:]}, tolerance=1e-6)
    assert figure.axes[0].get_yscale() == "log"


def test_the_recipe_trains_the_initializer_alone_at_the_end_and_settles_it():
    """The recipe's two schedules, run as torch runs them: φ's step size is 0 long before the last step (the
    initializer then fits a DEQ that holds still), and θ's reaches its floor exactly at the last step."""
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/deq/deq_digits.yaml").read_text())
    steps, model = recipe["trainer"]["max_steps"], recipe["model"]["init_args"]

    def rates(optimizer_key: str, scheduler_key: str) -> list[float]:
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], **model[optimizer_key]["init_args"])
        scheduler_class = getattr(torch.optim.lr_scheduler, model[scheduler_key]["class_path"].rsplit(".", 1)[1])
        scheduler = scheduler_class(optimizer, **model[scheduler_key]["init_args"])
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    deq = rates("objective_optimizer", "objective_lr_scheduler")
    still = deq.index(0.0)
    assert still <= steps // 2 and set(deq[still:]) == {0.0}, "the DEQ must stop learning by half the run"
    initializer = rates("optimizer", "lr_scheduler")
    floor = model["lr_scheduler"]["init_args"]["eta_min"]
    assert min(initializer) > 0 and initializer[-1] == pytest.approx(floor, rel=1e-2, abs=1e-7)
    assert initializer[still] > 10 * floor, "the initializer must still learn once the DEQ holds still"


def fashion_folder(folder, train: int = 50, test: int = 20, labels: bool = True, bad_label: bool = False):
    """Tiny Fashion-MNIST-format IDX files whose first pixel encodes each image's label (so a test can check that
    every image keeps its own label through the splits)."""
    import numpy as np

    from datamodules.images import write_idx

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("t10k", test)):
        classes = rng.integers(0, 10, count, dtype=np.uint8)
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = classes * 20
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        if bad_label:
            classes[0] = 12
        if labels:
            write_idx(folder / f"{split}-labels-idx1-ubyte.gz", classes)
    return folder


def test_fashion_images_come_with_their_own_labels_in_fixed_splits(tmp_path):
    from datamodules.fashion_classes import FashionClasses

    root = fashion_folder(tmp_path)
    data = FashionClasses(root=str(root), val_size=10, test_size=15, batch_size=8)
    for split, size in (("train", 40), ("val", 10), ("test", 15)):
        part = data.split(split)
        assert part["image"].shape == (size, 784) and part["label"].dtype == torch.int64
        torch.testing.assert_close(part["image"][:, 0] * 255 / 20, part["label"].to(part["image"].dtype))
    again = FashionClasses(root=str(root), val_size=10, test_size=15)
    assert torch.equal(data.split("val")["image"], again.split("val")["image"])
    assert not any(bool((r == data.split("train")["image"]).all(-1).any()) for r in data.split("val")["image"])
    x = data.sample(8, torch.Generator().manual_seed(1))
    assert x["image"].shape == (8, 784) and len({tuple(r.tolist()) for r in x["image"]}) == 8
    test = data.sample_split("test", 15, torch.Generator())
    assert torch.equal(test["image"], data.split("test")["image"])  # the t10k images, in their order
    objective = DEQClassifier(input_dim=784, hidden=16)
    result = Anderson(steps=100, atol=1e-5).solve(objective, x)
    assert bool(result.converged.all()) and objective.logits(result.y).shape == (8, 10)
    with pytest.raises(ValueError, match="exceeds the 40 training images"):
        data.sample(41, torch.Generator())
    mixing = FashionClasses(root=str(root), val_size=10, test_size=15, mix_share=1.0, noise=0.1, noise_share=0.0)
    mixed = mixing.sample(8, torch.Generator().manual_seed(1))
    assert mixed["image"].shape == (8, 784) and bool(mixed["augmented"].all())
    assert torch.equal(mixed["label"], x["label"]) and not torch.equal(mixed["image"], x["image"])
    with pytest.raises(ValueError, match="test_size=30 exceeds the 20 test images"):
        FashionClasses(root=str(root), val_size=10, test_size=30).split("train")


def test_missing_or_wrong_fashion_files_are_clear_errors(tmp_path):
    from datamodules.fashion_classes import FashionClasses, load_fashion_labels
    from datamodules.fashion_mnist import FashionMNISTNotFound
    from datamodules.images import IDXFormatError

    unlabelled = fashion_folder(tmp_path / "unlabelled", labels=False)
    with pytest.raises(FashionMNISTNotFound, match="has the images but not the labels train-labels-idx1-ubyte.gz"):
        FashionClasses(root=str(unlabelled), val_size=10, test_size=5).split("train")
    with pytest.raises(FashionMNISTNotFound, match="does not exist .*apt-get install dataset-fashion-mnist"):
        FashionClasses(root=str(tmp_path / "nowhere"), val_size=10, test_size=5).split("train")
    with pytest.raises(IDXFormatError, match="class indices 0..9"):
        load_fashion_labels(fashion_folder(tmp_path / "bad", bad_label=True), "train")
    with pytest.raises(ValueError, match="download: false"):
        FashionClasses(root=str(unlabelled), download=True)
    with pytest.raises(ValueError, match="leaves none"):
        FashionClasses(root=str(fashion_folder(tmp_path / "small")), val_size=50, test_size=5).split("val")
