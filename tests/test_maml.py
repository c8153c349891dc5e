"""Meta-learning as semi-amortized optimization (lightning_amor/apps/maml.py, datamodules/sinusoid.py and
datamodules/few_shot_digits.py).

The gradient tests use a linear regressor, whose support MSE is a quadratic in the weights with Hessian
H = 2/K · XᵀX, so every gradient mode has a closed form: one inner step is w¹ = θ − α∇f(θ), second-order MAML's
outer gradient is (I − αH)∇L_q(w¹), first-order MAML's is ∇L_q(w¹), and iMAML's (the proximal problem
min_w f(w) + λ/2‖w − θ‖² solved exactly) is λ(H + λI)⁻¹∇L_q(w*).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from datamodules.context import seeded_generator
from datamodules.few_shot_digits import FewShotDigits
from datamodules.sinusoid import SinusoidTasks
from lightning_amor import MLP, FullyAmortized, GradientStep, SemiAmortized
from lightning_amor.apps.maml import (
    MAMLModule,
    NetworkInit,
    QueryLoss,
    SupportSetHypernetwork,
    TaskBatchError,
    TaskLoss,
    check_task_batch,
    mean_ci95,
)
from lightning_amor.apps.maml_figures import adaptation_figure
from lightning_amor.structure import parameters_vector
from lightning_amor.tolerance_solve import ToleranceSemiAmortized


def linear_tasks(num: int = 3, shots: int = 6, dim: int = 3, seed: int = 0) -> dict[str, Tensor]:
    """Random linear-regression tasks in float64: ``num x shots x dim`` inputs, one real target each."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num, dim, 1, generator=gen, dtype=torch.float64)

    def points() -> tuple[Tensor, Tensor]:
        inputs = torch.randn(num, shots, dim, generator=gen, dtype=torch.float64)
        return inputs, inputs @ w + 0.1 * torch.randn(num, shots, 1, generator=gen, dtype=torch.float64)

    (sx, sy), (qx, qy) = points(), points()
    return {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}


def linear_maml(gradient: str, steps: int, lr: float = 0.1, shrinkage: float = 0.0) -> MAMLModule:
    net = nn.Linear(3, 1).double()
    amortizer = SemiAmortized(NetworkInit(net), steps=steps, update=GradientStep(lr, learnable=False),
                              gradient=gradient, shrinkage=shrinkage, cg_steps=50)
    return MAMLModule(TaskLoss(net), amortizer)


def outer_gradient(module: MAMLModule, x: dict[str, Tensor]) -> Tensor:
    """∂/∂θ of the batch's summed query loss: ``n``."""
    module.zero_grad()
    module.loss(module.predict_batch(x), x, module.objective).sum().backward()
    return module.amortizer.init.value.grad.clone()


def design(x: Tensor) -> Tensor:
    """Inputs with a column of ones (the bias), ``B x K x (d + 1)``; the weights are laid out as (w, b)."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def quadratic_parts(x: dict[str, Tensor], side: str) -> tuple[Tensor, Tensor]:
    """The Hessian ``B x n x n`` and the linear term ``B x n`` of the MSE on a side: f(w) = ½wᵀHw − cᵀw + const."""
    a, y = design(x[f"{side}_x"]), x[f"{side}_y"]
    k = a.shape[1]
    return 2.0 / k * a.transpose(1, 2) @ a, (2.0 / k * a.transpose(1, 2) @ y).squeeze(-1)


def imaml_closed_form(x: dict[str, Tensor], lam: float, theta: Tensor) -> tuple[Tensor, Tensor]:
    """On the quadratic tasks: the proximal solution w* = (H + λI)⁻¹(c + λθ) (``B x n``) and the outer gradient
    dL/dθ = Σ_tasks λ(H + λI)⁻¹ (H_q w* − c_q) (``n``)."""
    h, c = quadratic_parts(x, "support")
    hq, cq = quadratic_parts(x, "query")
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    w_star = torch.linalg.solve(h + lam * eye, c + lam * theta)
    gradient = (lam * torch.linalg.solve(h + lam * eye, (hq @ w_star.unsqueeze(-1)).squeeze(-1) - cq)).sum(0)
    return w_star, gradient


# --- the gradient modes on a quadratic inner problem --------------------------------------------------------------


def test_implicit_gradient_agrees_with_the_unrolled_one_and_the_closed_form() -> None:
    x = linear_tasks()
    lam = 2.0
    implicit = linear_maml("implicit", steps=400, shrinkage=lam)
    unrolled = linear_maml("unroll", steps=400, shrinkage=lam)
    unrolled.load_state_dict(implicit.state_dict())
    g_implicit, g_unrolled = outer_gradient(implicit, x), outer_gradient(unrolled, x)
    w_star, expected = imaml_closed_form(x, lam, implicit.amortizer.init.value.detach())
    torch.testing.assert_close(g_implicit, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_unrolled, expected, rtol=1e-6, atol=1e-8)
    # the prediction itself is the proximal solution
    torch.testing.assert_close(implicit(x), w_star, rtol=1e-8, atol=1e-10)


def test_imaml_to_tolerance_gives_the_closed_form_gradient_on_a_quadratic() -> None:
    torch.manual_seed(0)
    x = linear_tasks(seed=3)
    lam = 0.5  # weak shrinkage: the support Hessian's spread dominates, the inner problem is ill-conditioned
    net = nn.Linear(3, 1).double()
    amortizer = ToleranceSemiAmortized(NetworkInit(net), shrinkage=lam, tolerance=1e-7, tolerance_kind="relative",
                                       max_steps=500, cg_steps=50)
    module = MAMLModule(TaskLoss(net), amortizer)
    unrolled = linear_maml("unroll", steps=400, lr=0.05, shrinkage=lam)
    unrolled.amortizer.init.load_state_dict(amortizer.init.state_dict())
    g_tol, g_unrolled = outer_gradient(module, x), outer_gradient(unrolled, x)
    assert bool(amortizer.last_report.converged.all()), amortizer.last_report
    w_star, expected = imaml_closed_form(x, lam, amortizer.init.value.detach())
    # the inner residual is 1e-7 of its start, so the gradients agree to about that times the conditioning
    torch.testing.assert_close(g_tol, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_tol, g_unrolled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module(x), w_star, rtol=1e-5, atol=1e-6)


def smooth_sinusoid_imaml(max_steps: int) -> tuple[MAMLModule, dict[str, Tensor]]:
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[40, 40], activation="silu")
    amortizer = ToleranceSemiAmortized(NetworkInit(net), shrinkage=10.0, tolerance=1e-3, max_steps=max_steps,
                                       cg_steps=5)
    module = MAMLModule(TaskLoss(net), amortizer, adapt_steps=[0, 1])
    return module, SinusoidTasks(shots=10).sample(8, seeded_generator(4))


def test_imaml_solves_each_task_to_tolerance_and_reports_it() -> None:
    from lightning_amor.module import Evaluated

    module, x = smooth_sinusoid_imaml(max_steps=100)
    y = module(x)
    # measured anew: ‖∇F(ŵ)‖ ≤ 1e-3 ‖∇F(θ)‖ for every task, F = support MSE + λ/2 ‖w − θ‖²
    theta = module.initial_weights(x).detach()
    w, t = y.detach().requires_grad_(), theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(module.objective(w, x).sum() + 5.0 * ((w - theta) ** 2).sum(), w)
    (g0,) = torch.autograd.grad(module.objective(t, x).sum(), t)
    ratio = g.norm(dim=1) / g0.norm(dim=1)
    assert bool((ratio <= 1e-3 * 1.001).all()), ratio
    metrics = module.evaluation_metrics(Evaluated(x, module.objective.view(y), None, module.objective(y, x), None))
    torch.testing.assert_close(metrics["inner_converged"], torch.ones(8))
    torch.testing.assert_close(metrics["inner_residual_ratio"], ratio.float(), rtol=1e-3, atol=1e-6)
    # a budget too small to converge: the tasks are reported unsolved, not passed off as solved
    short, x = smooth_sinusoid_imaml(max_steps=2)
    y = short(x)
    metrics = short.evaluation_metrics(Evaluated(x, short.objective.view(y), None, short.objective(y, x), None))
    assert float(metrics["inner_converged"].mean()) < 1.0
    assert float(metrics["inner_residual_ratio"].max()) > 1e-3


def test_first_order_mode_drops_exactly_the_second_order_terms() -> None:
    x = linear_tasks(seed=1)
    alpha = 0.1
    first = linear_maml("first_order", steps=1, lr=alpha)
    second = linear_maml("unroll", steps=1, lr=alpha)
    second.load_state_dict(first.state_dict())
    alpha = first.amortizer.update.lr.double()  # 0.1 up to the float32 storage of the step size
    h, c = quadratic_parts(x, "support")
    hq, cq = quadratic_parts(x, "query")
    theta = first.amortizer.init.value.detach()
    w1 = theta - alpha * ((h @ theta) - c)
    query_grad = (hq @ w1.unsqueeze(-1)).squeeze(-1) - cq  # ∇L_q(w¹) per task
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(outer_gradient(first, x), query_grad.sum(0), rtol=1e-10, atol=1e-12)
    full = ((eye - alpha * h) @ query_grad.unsqueeze(-1)).squeeze(-1).sum(0)
    torch.testing.assert_close(outer_gradient(second, x), full, rtol=1e-10, atol=1e-12)
    assert float((full - query_grad.sum(0)).norm()) > 1e-3  # the dropped term is not negligible here


def test_first_order_over_several_steps_is_the_query_gradient_at_the_last_iterate() -> None:
    x = linear_tasks(seed=2)
    module = linear_maml("first_order", steps=3, lr=0.05)
    with torch.no_grad():
        adapted = module(x)
    hq, cq = quadratic_parts(x, "query")
    expected = ((hq @ adapted.unsqueeze(-1)).squeeze(-1) - cq).sum(0)
    torch.testing.assert_close(outer_gradient(module, x), expected, rtol=1e-10, atol=1e-12)


class _Saved:
    """A tensor autograd saved for a backward pass, counted while it is alive."""

    live = 0

    def __init__(self, t: Tensor) -> None:
        self.t, self.size = t, t.numel() * t.element_size()
        _Saved.live += self.size

    def __del__(self) -> None:
        _Saved.live -= self.size


def saved_bytes(module: MAMLModule, x: dict[str, Tensor]) -> int:
    """Bytes of the tensors autograd holds for the backward pass of one meta-step's loss (the inner gradients'
    own, already freed graphs not counted)."""
    start = _Saved.live
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        loss = module.loss(module.predict_batch(x), x, module.objective).sum()
    held = _Saved.live - start
    del loss
    return held


def test_memory_is_flat_in_the_inner_steps_for_first_order_and_implicit_but_grows_for_the_unroll() -> None:
    x = SinusoidTasks().sample(4, seeded_generator(0))

    def memory(gradient: str, steps: int) -> int:
        torch.manual_seed(0)
        net = MLP(1, 1, hidden=[16, 16])
        amortizer = SemiAmortized(NetworkInit(net), steps=steps, update=GradientStep(0.01, learnable=False),
                                  gradient=gradient, shrinkage=1.0 if gradient == "implicit" else 0.0)
        return saved_bytes(MAMLModule(TaskLoss(net), amortizer), x)

    for flat in ("first_order", "implicit"):
        assert memory(flat, 1) == memory(flat, 8), flat
    one, four, eight = memory("unroll", 1), memory("unroll", 4), memory("unroll", 8)
    assert eight > 4 * one and eight - four == pytest.approx(four - one, rel=0.35)  # linear in the steps


# --- the functional weights ---------------------------------------------------------------------------------------


def test_functional_weights_give_the_modules_outputs() -> None:
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[40, 40])
    objective = TaskLoss(net)
    inputs = torch.randn(4, 7, 1)
    weights = parameters_vector(net) + 0.1 * torch.randn(4, objective.dim)
    out = objective.predictions(objective.view(weights), inputs)
    for b in range(4):
        copy_ = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(weights[b], copy_.parameters())
        torch.testing.assert_close(out[b], copy_(inputs[b]), rtol=1e-6, atol=1e-6)
    # and the template's own weights give the template's outputs
    same = objective.predictions(objective.view(parameters_vector(net).expand(4, -1)), inputs)
    torch.testing.assert_close(same, net(inputs.reshape(-1, 1)).reshape(4, 7, 1), rtol=1e-6, atol=1e-6)


def test_network_init_must_match_the_task_network() -> None:
    with pytest.raises(ValueError, match="give both the same network"):
        MAMLModule(TaskLoss(MLP(1, 1, hidden=[8])), SemiAmortized(NetworkInit(MLP(1, 1, hidden=[9])), steps=1))


# --- bad task batches -------------------------------------------------------------------------------------------


def test_a_nan_target_is_one_clear_error() -> None:
    module = linear_maml("unroll", steps=1)
    x = linear_tasks()
    x["query_y"][2, 1, 0] = math.nan
    with pytest.raises(TaskBatchError, match=r"'query_y' holds NaN or infinite numbers in 1 task\(s\) \[2\]"):
        module.loss(module.predict_batch(x), x, module.objective)
    x = linear_tasks()
    x["support_y"][0, 0, 0] = math.inf
    with pytest.raises(TaskBatchError, match=r"'support_y' holds NaN"):
        check_task_batch(x)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: x.update(query_x=x["query_x"][..., :2]), "same input and target sizes"),
        (lambda x: x.update(support_y=x["support_y"][:, :4]), "6 inputs but 4 targets"),
        (lambda x: x.update(query_y=x["query_y"][:2]), "same batch size"),
        (lambda x: x.pop("query_y"), "exactly the entries"),
        (lambda x: x.update(support_y=x["support_y"][..., 0]), "must be B x K x features"),
    ],
)
def test_mismatched_support_and_query_sets_are_one_clear_error(change, message) -> None:
    module = linear_maml("unroll", steps=1)
    x = linear_tasks()
    change(x)
    with pytest.raises(ValueError, match=message):  # a TaskBatchError, or the core's ObjectiveShapeError
        module.loss(module.predict_batch(x), x, module.objective)


def test_classification_needs_integer_labels() -> None:
    x = FewShotDigits(val_size=4, test_size=4).sample(2, seeded_generator(0))
    check_task_batch(x, "cross_entropy")
    with pytest.raises(TaskBatchError, match="integer class labels"):
        check_task_batch({**x, "support_y": x["support_y"].float()}, "cross_entropy")


# --- training, evaluation and the data --------------------------------------------------------------------------


def test_maml_meta_trains_and_one_step_beats_the_initial_weights() -> None:
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[40, 40])
    amortizer = SemiAmortized(NetworkInit(net), steps=1, update=GradientStep(0.01, learnable=False))
    module = MAMLModule(TaskLoss(net), amortizer)
    data = SinusoidTasks(val_size=8, test_size=8)
    held = data.tasks(200, 50, seeded_generator(99))

    def curve() -> dict[int, float]:
        return {t: float(module.objective.query_loss(y, held).mean()) for t, y in module.adaptation_curve(held).items()}

    before = curve()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for step in range(120):
        x = data.sample(25, seeded_generator(0, step))
        loss = module.loss(module.predict_batch(x), x, module.objective).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = curve()
    assert after[1] < 0.85 * before[1], (before, after)
    assert after[5] < after[0] and after[1] < after[0], after  # adaptation helps


def test_evaluation_metrics_and_the_adaptation_figure() -> None:
    torch.manual_seed(0)
    net = MLP(64, 3, hidden=[16])
    amortizer = SemiAmortized(NetworkInit(net), steps=2, update=GradientStep(0.4, learnable=False))
    module = MAMLModule(TaskLoss(net, "cross_entropy"), amortizer, adapt_steps=[0, 2], adapt_lr=0.4)
    x = FewShotDigits(val_size=4, test_size=4).sample(5, seeded_generator(1))
    from lightning_amor.module import Evaluated

    y = module(x)
    metrics = module.evaluation_metrics(Evaluated(x, module.objective.view(y), None, module.objective(y, x), None))
    assert set(metrics) == {"query", "query_step0", "query_step2", "accuracy", "accuracy_step0", "accuracy_step2"}
    # the model's own two steps are the curve's two steps
    torch.testing.assert_close(metrics["query"], metrics["query_step2"])
    assert all(v.shape == (5,) for v in metrics.values())
    values = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    mean, half = mean_ci95(values)
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(half, torch.tensor([1.96 / math.sqrt(3), 0.0]))
    from lightning_amor.apps.maml import AdaptationSummary

    figure = adaptation_figure({"val": AdaptationSummary((0, 2), mean, half, 0)})
    assert figure.axes[0].get_xlabel().startswith("inner gradient steps")


def test_the_hypernetwork_predicts_weights_from_the_support_set() -> None:
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[8])
    hyper = SupportSetHypernetwork(net, in_features=1, targets=1, hidden=16)
    module = MAMLModule(TaskLoss(net), FullyAmortized(hyper))
    x = SinusoidTasks().sample(6, seeded_generator(0))
    y = module(x)
    assert y.shape == (6, module.objective.dim)
    torch.testing.assert_close(y, parameters_vector(net).expand(6, -1), atol=0.05, rtol=0)  # starts near the template
    (grad,) = torch.autograd.grad(QueryLoss()(module.predict_batch(x), x, module.objective).sum(),
                                  hyper.out.weight)
    assert float(grad.abs().sum()) > 0
    order = torch.randperm(x["support_x"].shape[1], generator=torch.Generator().manual_seed(3))
    permuted = {**x, "support_x": x["support_x"][:, order], "support_y": x["support_y"][:, order]}
    torch.testing.assert_close(module(permuted), y)  # a set: the order of the support points does not matter


def test_sinusoid_tasks_follow_finns_protocol() -> None:
    data = SinusoidTasks(shots=5, query=7, eval_query=30, val_size=16, test_size=16)
    x = data.sample(400, seeded_generator(0))
    assert x["support_x"].shape == (400, 5, 1) and x["query_y"].shape == (400, 7, 1)
    assert -5.0 <= float(x["support_x"].min()) and float(x["query_x"].max()) <= 5.0
    amplitude = torch.cat([x["support_y"], x["query_y"]], 1).abs().amax((1, 2))
    assert float(amplitude.max()) <= 5.0 and float(amplitude.max()) > 4.0
    held = data.sample_split("test", 16, seeded_generator(1))
    assert held["query_x"].shape == (16, 30, 1)
    torch.testing.assert_close(data.sample_split("test", 16, seeded_generator(1))["query_y"], held["query_y"])
    with pytest.raises(ValueError, match="low < high"):
        SinusoidTasks(amplitude=(5.0, 0.1))


def test_few_shot_digits_hold_out_the_meta_test_classes() -> None:
    data = FewShotDigits(ways=3, shots=2, query=4, val_size=4, test_size=4)
    pools = data._pools()
    assert set(pools["train"]) == set(range(7)) and set(pools["val"]) == set(pools["test"]) == {7, 8, 9}
    val = torch.cat(list(pools["val"].values()))
    test = torch.cat(list(pools["test"].values()))
    assert not bool((val.unsqueeze(1) == test.unsqueeze(0)).all(-1).any())  # no image in both
    x = data.sample_split("test", 8, seeded_generator(0))
    assert x["support_x"].shape == (8, 6, 64) and x["query_y"].shape == (8, 12)
    assert sorted(x["support_y"][0].tolist()) == [0, 0, 1, 1, 2, 2]
    train_images = torch.cat(list(pools["train"].values()))
    assert not bool((x["query_x"].reshape(-1, 1, 64) == train_images.unsqueeze(0)).all(-1).any())
    with pytest.raises(ValueError, match="disjoint"):
        FewShotDigits(train_classes=(0, 1, 7), test_classes=(7, 8, 9))


def test_the_adaptation_curve_reaches_tensorboard(tmp_path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_amor.apps.maml import AdaptationSummary
    from lightning_amor.apps.maml_figures import AdaptationCurves

    net = MLP(1, 1, hidden=[8])
    module = MAMLModule(TaskLoss(net), SemiAmortized(NetworkInit(net), steps=1))
    trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path, name="tb"), accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False)
    module.adaptation["val"] = AdaptationSummary((0, 1, 5), torch.tensor([3.0, 1.0, 0.5]), torch.full((3,), 0.1), 7)
    AdaptationCurves().on_validation_end(trainer, module)
    trainer.logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    assert events.Tags()["images"] == ["val/adaptation_curve"]
    assert events.Images("val/adaptation_curve")[0].step == 7


def _graph_nodes(root: torch.autograd.graph.Node) -> list[str]:
    seen, stack, names = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_weights_view_backward_is_one_split_with_exact_gradients() -> None:
    """The named view of the flat weights (taken on every inner step) backpropagates through one split node, not
    one zero-padded slice per parameter (the overhead that made the unrolled meta-step slower than TorchOpt's), and
    its gradients are exactly each parameter's."""
    objective = TaskLoss(MLP(1, 1, hidden=[40, 40]))
    y = torch.randn(3, objective.dim, requires_grad=True)
    view = objective.view(y)
    scales = {name: float(i + 1) for i, name in enumerate(view)}
    loss = sum(scales[name] * (w**2).sum() for name, w in view.items())
    names = _graph_nodes(loss.grad_fn)
    assert not any(n.startswith("Slice") for n in names), names
    assert sum(n.startswith("SplitWithSizes") for n in names) == 1, names
    (grad,) = torch.autograd.grad(loss, y)
    expected = torch.cat([2 * scales[name] * w.detach().reshape(3, -1) for name, w in view.items()], dim=1)
    assert torch.equal(grad, expected)
