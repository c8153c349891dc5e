"""Meta OT: the entropic semi-dual and its closed-form second potential, log-domain Sinkhorn against POT, the
Gaussian warm start, the image-pair data module, bad histograms, and the warm-start figures."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from datamodules.meta_ot import ImagePairs, histograms
from lightning_amor import MLP, FullyAmortized
from lightning_amor.apps.meta_ot import (
    EntropicOT,
    HistogramError,
    MetaOTModule,
    PotentialMLP,
    gaussian_potential,
    grid_cost,
)
from lightning_amor.apps.meta_ot_figures import STARTS, warm_start_traces
from lightning_amor.apps.sinkhorn import EpsilonScalingSinkhorn, Sinkhorn
from lightning_amor.objective import ObjectiveShapeError
from tests.objectives import Quadratic
from tests.test_recipes import tiny_mnist


def pairs(num: int, side: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``num x 2 x side²`` random histogram pairs with uneven mass (a few heavy pixels)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(num, 2, side * side, generator=generator, dtype=dtype) ** 4 + 1e-3
    return raw / raw.sum(-1, keepdim=True)


# --- the objective ---------------------------------------------------------------------------------------------

def test_the_separable_soft_min_is_the_dense_log_sum_exp():
    objective = EntropicOT(side=5, epsilon=0.02).double()
    h = torch.randn(3, 25, dtype=torch.float64)
    h[0, 4] = -float("inf")  # zero mass drops out
    dense = torch.logsumexp(h[:, :, None] - grid_cost(5)[None] / 0.02, dim=1)
    torch.testing.assert_close(objective.soft_min(h), dense, rtol=1e-12, atol=1e-12)


def test_the_closed_form_second_potential_makes_the_columns_exact_and_maximises_the_dual():
    objective = EntropicOT(side=4, epsilon=0.05).double()
    x = pairs(3, 4)
    a, b = x[:, 0], x[:, 1]
    f = 0.3 * torch.randn(3, 16, dtype=torch.float64)
    g = objective.other_potential(f, a)
    plan = objective.plan(f, x)
    torch.testing.assert_close(plan.sum(1), b, rtol=1e-12, atol=1e-14)  # columns: exactly b, whatever f
    assert not torch.allclose(plan.sum(2), a, atol=1e-3)  # rows: not yet (f is not optimal)

    def dual(g: torch.Tensor) -> torch.Tensor:
        cost = grid_cost(4)
        kernel = a[:, :, None] * b[:, None, :] * (torch.exp((f[:, :, None] + g[:, None, :] - cost) / 0.05) - 1)
        return (f * a).sum(-1) + (g * b).sum(-1) - 0.05 * kernel.sum((1, 2))

    g = g.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(dual(g).sum(), g)
    assert float(gradient.abs().max()) < 1e-12  # g(f) is the stationary point in g of the full dual
    for _ in range(3):  # and its maximum: any other g is worse (the dual is concave in g)
        other = g.detach() + 0.05 * torch.randn_like(f)
        assert bool((dual(other) < dual(g.detach())).all())
    # with g(f) the exponential term vanishes, so the full dual equals −F(f)
    torch.testing.assert_close(dual(g.detach()), -objective(f, x), rtol=1e-12, atol=1e-12)


def test_the_gradient_is_the_row_marginal_error():
    objective = EntropicOT(side=4, epsilon=0.05).double()
    x = pairs(2, 4, seed=1)
    f = (0.2 * torch.randn(2, 16, dtype=torch.float64)).requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(f, x).sum(), f)
    torch.testing.assert_close(gradient, objective.plan(f.detach(), x).sum(2) - x[:, 0], rtol=1e-10, atol=1e-12)
    l1 = EntropicOT(side=4, epsilon=0.05, marginal_norm="l1").double()
    l2 = EntropicOT(side=4, epsilon=0.05, marginal_norm="l2").double()
    torch.testing.assert_close(l1.residual_flat(f.detach(), x), gradient.abs().sum(-1))
    torch.testing.assert_close(l2.residual_flat(f.detach(), x), gradient.norm(dim=-1))


def test_potentials_are_compared_up_to_a_constant():
    objective = EntropicOT(side=2)
    f = torch.randn(3, 4)
    assert float(objective.distance_flat(f + 7.0, f).max()) < 1e-5
    assert float(objective.distance_flat(f + torch.tensor([1.0, 0, 0, 0]), f).min()) > 0.5


# --- Sinkhorn against POT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon", [0.1, 0.03])
def test_sinkhorn_matches_pot_plan_cost_and_dual(epsilon):
    side = 4
    objective = EntropicOT(side=side, epsilon=epsilon).double()
    x = pairs(3, side, seed=2)
    result = Sinkhorn(steps=20000, tol=1e-10).solve(objective, x)
    assert bool(result.converged.all()), result.reasons()
    cost = grid_cost(side).numpy()
    ours = objective.transport_cost(result.y, x)
    plan = objective.plan(result.y, x)
    for i in range(3):
        a, b = x[i, 0].numpy(), x[i, 1].numpy()
        reference = ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", stopThr=1e-13, numItermax=200000)
        np.testing.assert_allclose(plan[i].numpy(), reference, rtol=1e-6, atol=1e-12)
        pot_cost = float(ot.sinkhorn2(a, b, cost, epsilon, method="sinkhorn_log", stopThr=1e-13, numItermax=200000))
        assert float(ours[i]) == pytest.approx(pot_cost, rel=1e-8)
        # strong duality: −F(f*) = ⟨P, C⟩ + ε KL(P ‖ a ⊗ b)
        kl = float((reference * np.log(reference / np.outer(a, b))).sum())
        assert -float(result.value[i]) == pytest.approx(pot_cost + epsilon * kl, rel=1e-7)


def test_sinkhorn_stops_each_problem_by_itself_and_records_its_trace():
    objective = EntropicOT(side=4, epsilon=0.02).double()
    x = pairs(5, 4, seed=3)
    solver = Sinkhorn(steps=5000, tol=1e-6)
    together = solver.solve(objective, x)
    trace = solver.last_errors
    assert trace.shape == (int(together.iterations.max()) + 1, 5)
    for i in range(5):
        alone = solver.solve(objective, x[i : i + 1])
        assert int(alone.iterations) == int(together.iterations[i])
        torch.testing.assert_close(alone.y[0], together.y[i], rtol=0, atol=0)
        reached = int((trace[:, i] <= 1e-6).nonzero()[0])  # the first iterate under the tolerance is where it stopped
        assert reached == int(together.iterations[i])
    residual = objective.residual_flat(together.y, x)
    assert bool((residual <= 1e-6).all())
    torch.testing.assert_close(residual, trace[-1], rtol=1e-6, atol=1e-12)  # the trace ends at the returned f
    warm = solver.solve(objective, x, init=together.y)  # started at the solution: nothing left to do
    assert warm.iterations.tolist() == [0] * 5 and bool(warm.converged.all())


def test_epsilon_scaling_reaches_the_same_potential_in_fewer_iterations_and_the_cost_needs_no_plan():
    objective = EntropicOT(side=6, epsilon=0.005).double()
    x = pairs(4, 6, seed=5)
    plain = Sinkhorn(steps=20000, tol=1e-8).solve(objective, x)
    scaled_solver = EpsilonScalingSinkhorn(steps=20000, tol=1e-8)
    assert scaled_solver.epsilons(0.005) == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125]
    scaled = scaled_solver.solve(objective, x)
    assert bool(plain.converged.all()) and bool(scaled.converged.all())
    # the saving is in carrying the mass across the grid: to 1e-3, some 20% fewer iterations in all (near the
    # solution both converge at the rate of the objective's ε)
    loose_plain = Sinkhorn(steps=20000, tol=1e-3).solve(objective, x).iterations
    loose_scaled = EpsilonScalingSinkhorn(steps=20000, tol=1e-3).solve(objective, x).iterations
    assert int(loose_scaled.sum()) < 0.9 * int(loose_plain.sum()), (loose_scaled, loose_plain)
    assert float(objective.distance(scaled.y, plain.y).max()) < 1e-5
    assert float(objective.residual(scaled.y, x).max()) <= 1e-8  # certified at the objective's ε, not a stage's
    assert scaled_solver.last_errors.shape[1] == 4
    dense = (objective.plan(scaled.y, x) * grid_cost(6)).sum((-1, -2))  # the separable cost is the dense one
    torch.testing.assert_close(objective.transport_cost(scaled.y, x), dense, rtol=1e-12, atol=0)
    # the oracle scales ε; a given start skips the scaling
    torch.testing.assert_close(objective.solve(x), scaled.y, rtol=0, atol=1e-4)
    warm = scaled_solver.solve(objective, x, init=plain.y)
    assert warm.iterations.tolist() == [0] * 4
    with pytest.raises(ValueError, match="factor must lie in"):
        EpsilonScalingSinkhorn(factor=1.0)


def test_sinkhorn_that_does_not_converge_says_so_and_the_oracle_refuses():
    objective = EntropicOT(side=4, epsilon=0.005, oracle_steps=3).double()
    x = pairs(2, 4, seed=4)
    result = Sinkhorn(steps=3, tol=1e-8).solve(objective, x)
    assert not bool(result.converged.any()) and result.reasons() == ["max_steps", "max_steps"]
    assert result.iterations.tolist() == [3, 3]
    start = torch.zeros(2, 16, dtype=torch.float64)
    start[1, 5] = float("nan")  # a NaN prediction is never passed off as solved
    result = Sinkhorn(steps=5000, tol=1e-3).solve(objective, x, init=start)
    assert result.reasons() == ["converged", "not_finite"] and result.converged.tolist() == [True, False]
    with pytest.raises(RuntimeError, match=r"not reach a marginal error of 1e-05 within 3 iterations on rows \[0, 1\]"):
        objective.solve(x)


def test_the_gaussian_start_is_exact_for_equal_histograms_and_helps_on_digits():
    x = pairs(2, 6, seed=5)
    same = torch.stack([x[:, 0], x[:, 0]], dim=1)
    f = gaussian_potential(same, 6)
    assert float((f - f.mean(-1, keepdim=True)).abs().max()) < 1e-9  # the identity map: a constant potential
    data = ImagePairs(images="digits", val_size=64, test_size=64)
    digits = data.sample_split("val", 64, torch.Generator()).double()
    objective = EntropicOT(side=8, epsilon=0.01).double()
    cold = Sinkhorn(steps=2000, tol=1e-3).solve(objective, digits)
    gaussian = Sinkhorn(steps=2000, tol=1e-3).solve(objective, digits, init=gaussian_potential(digits, 8))
    assert bool(cold.converged.all() and gaussian.converged.all())
    assert float(gaussian.iterations.double().median()) < 0.8 * float(cold.iterations.double().median())


# --- bad input -------------------------------------------------------------------------------------------------

def bad(kind: str) -> torch.Tensor:
    x = pairs(3, 2, seed=6, dtype=torch.float32)
    if kind == "negative":
        x[1, 0, 0] = -0.1
        x[1, 0, 1] += 0.1
    elif kind == "sum":
        x[2, 1] *= 1.5
    else:
        x[0, 1, 2] = float("nan")
    return x


@pytest.mark.parametrize("kind, message", [
    ("negative", r"rows \[1\] have negative mass .*clip the images at 0"),
    ("sum", r"rows \[2\] do not sum to one \(e.g. 1.5.*divide each histogram by its sum"),
    ("nan", r"rows \[0\] hold NaN or infinite numbers"),
])
def test_bad_histograms_are_a_clear_error(kind, message):
    objective = EntropicOT(side=2)
    with pytest.raises(HistogramError, match=message):
        objective(torch.zeros(3, 4), bad(kind))
    with pytest.raises(HistogramError, match=message):
        Sinkhorn(steps=5).solve(objective, bad(kind))
    with pytest.raises(HistogramError, match=message):
        gaussian_potential(bad(kind), 2)


def test_wrong_shapes_and_settings_are_refused():
    objective = EntropicOT(side=2)
    with pytest.raises(ObjectiveShapeError, match=r"a B x 2 x 4 tensor .* got \(3, 4\)"):
        objective(torch.zeros(3, 4), torch.full((3, 4), 0.25))
    with pytest.raises(ObjectiveShapeError, match=r"B x 2 x 4 tensor .* got \(3, 2, 9\)"):
        objective(torch.zeros(3, 4), torch.full((3, 2, 9), 1 / 9))
    for kwargs, message in (({"epsilon": 0.0}, "epsilon"), ({"side": 0}, "side"), ({"marginal_norm": "l3"}, "l1")):
        with pytest.raises(ValueError, match=message):
            EntropicOT(**kwargs)
    with pytest.raises(ValueError, match="tol must be positive"):
        Sinkhorn(tol=0.0)
    with pytest.raises(TypeError, match="Sinkhorn works on an EntropicOT objective, got Quadratic"):
        Sinkhorn(steps=2).solve(Quadratic(), torch.zeros(2, 4))
    assert float(PotentialMLP(side=4, zero_init=True)(pairs(2, 4, dtype=torch.float32)).detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"B x 2 x 16 histogram pairs, got \(2, 32\)"):
        PotentialMLP(side=4)(torch.zeros(2, 32))
    with pytest.raises(TypeError, match="MetaOTModule works on an EntropicOT objective"):
        MetaOTModule(Quadratic(), FullyAmortized(MLP(4, 4)))


# --- the data module and the figures -----------------------------------------------------------------------------

def test_image_pairs_are_histograms_and_hold_out_their_images(tmp_path):
    data = ImagePairs(images="digits", val_size=16, test_size=20, floor=0.01)
    train = data.sample(8, torch.Generator().manual_seed(0))
    val = data.sample_split("val", 16, torch.Generator())
    assert train.shape == (8, 2, 64) and val.shape == (16, 2, 64) and data.side == 8
    for x in (train, val):
        assert bool((x > 0).all())
        torch.testing.assert_close(x.sum(-1), torch.ones(x.shape[:2]))
    torch.testing.assert_close(val[3, 1], val[4, 0])  # image i is paired with image i + 1
    held_out = histograms(data.source.images("val"), 0.01)
    torch.testing.assert_close(val[:, 0], held_out.float())
    training = histograms(data.source.images("train"), 0.01)
    assert not bool((torch.cdist(held_out, training) == 0).any())  # no held-out image is a training image
    fashion = ImagePairs(images="fashion_mnist", root=str(tiny_mnist(tmp_path)), val_size=8, test_size=8)
    assert fashion.sample_split("test", 8, torch.Generator()).shape == (8, 2, 784)
    with pytest.raises(ValueError, match="test_size=41 pairs need 41 held-out images, but the test split holds 40"):
        fashion.sample_split("test", 41, torch.Generator())
    with pytest.raises(ValueError, match="floor must be positive"):
        ImagePairs(floor=0.0)


def test_training_pairs_normalise_only_the_images_drawn(monkeypatch):
    """A training batch is the histograms of the two drawn images of each pair, and only those images are normalised
    (normalising the whole training set for every batch made a Fashion-MNIST step 0.19 s slower)."""
    import datamodules.meta_ot as meta_ot_data

    data = ImagePairs(images="digits", val_size=16, test_size=20, floor=0.01)
    train_images = data.source.images("train")
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(train_images.shape[0], (5,), generator=generator)
    second = torch.randint(train_images.shape[0], (5,), generator=generator)
    everything = histograms(train_images, 0.01).float()
    normalised_rows = []

    def counting(images: torch.Tensor, floor: float) -> torch.Tensor:
        normalised_rows.append(images.shape[0])
        return histograms(images, floor)

    monkeypatch.setattr(meta_ot_data, "histograms", counting)
    x = data.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(x[:, 0], everything[first]) and torch.equal(x[:, 1], everything[second])
    assert normalised_rows and max(normalised_rows) <= 5 < train_images.shape[0]


def test_warm_start_traces_from_three_starts():
    torch.manual_seed(0)
    objective = EntropicOT(side=4, epsilon=0.02)
    module = MetaOTModule(objective, FullyAmortized(PotentialMLP(side=4, hidden=[16])))
    x = pairs(6, 4, seed=7, dtype=torch.float32)
    traces = warm_start_traces(module.eval(), x, Sinkhorn(steps=1000, tol=1e-3))
    assert list(traces) == list(STARTS)
    for trace in traces.values():
        assert trace.shape[1] == 6 and float(trace[-1].max()) <= 1e-3 < float(trace[0].max())


def test_the_benchmark_measures_three_starts_and_pot(tmp_path):
    """The benchmark's measurements on three digit pairs with an untrained model (numbers are not checked, only that
    every quantity is measured, the cost check against POT holds and the figure is written)."""
    from benchmarks.meta_ot import run, table

    torch.manual_seed(0)
    module = MetaOTModule(EntropicOT(side=8, epsilon=0.05), FullyAmortized(PotentialMLP(side=8, hidden=[16])))
    x = ImagePairs(images="digits", val_size=8, test_size=8).sample_split("test", 3, torch.Generator())
    results = run(module, x, "smoke", steps=1000, pot_pairs=1, figures=tmp_path)
    for start in ("cold", "gaussian", "predicted"):
        assert results[f"{start}_iterations_0.001"]["reached"] == 3
        assert results[f"{start}_seconds_0.001"]["median"] > 0
    assert results["cost_rel_diff_tight_max"] < 1e-4 and results["tight_converged"]
    assert results["pot_plain_seconds_median"] > 0 and results["pot_log_iterations_median"] > 0
    assert "Median iterations to 1e-3, cold / warm" in table(results)
    assert (tmp_path / "meta_ot_smoke_marginal_error.png").is_file()
