"""Sparse coding: the lasso objective and its FISTA oracle, the signals' data module, LISTA and its ISTA
initialisation, the module's metrics and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.linear_model import Lasso

from datamodules.sparse_coding import SparseSignals
from lightning_amor import ObjectiveLoss, RegressionLoss
from lightning_amor.apps.lista import LISTA
from lightning_amor.apps.sparse_coding import SparseCoding, SparseCodingModule, gaussian_dictionary, nmse_db
from lightning_amor.module import Evaluated
from lightning_amor.objective import ObjectiveShapeError
from lightning_amor.proximal_solvers import ISTA

M, N = 20, 40  # a small dictionary: every test runs in well under a second


def small(alpha: float = 0.05, seed: int = 0) -> SparseCoding:
    return SparseCoding(signal_dim=M, code_dim=N, alpha=alpha, dictionary_seed=seed, oracle_tol=1e-10)


def signals(num: int, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    data = SparseSignals(signal_dim=M, code_dim=N, sparsity=0.2, cache_dir="none", **kwargs)
    return data.sample_with_codes(num, torch.Generator().manual_seed(seed))


# --- the objective and its oracle ---------------------------------------------------------------------------------


def test_the_prox_is_the_soft_threshold():
    """prox_{s·α‖·‖₁}(v) = sign(v)·max(|v| − sα, 0), on values either side of the threshold and exactly at it."""
    objective = small(alpha=0.5)
    v = torch.tensor([[-2.0, -0.5, -0.1, 0.0, 0.25, 0.5, 1.5] + [0.0] * (N - 7)])
    expected = torch.tensor([[-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0] + [0.0] * (N - 7)])
    torch.testing.assert_close(objective.prox_flat(v, 1.0), expected, rtol=0, atol=0)
    # with a step 0.2 the threshold is 0.1: only |v| > 0.1 survives, shrunk by 0.1
    shrunk = torch.tensor([[-1.9, -0.4, 0.0, 0.0, 0.15, 0.4, 1.4] + [0.0] * (N - 7)])
    torch.testing.assert_close(objective.prox_flat(v, 0.2), shrunk)


def test_the_value_is_the_lasso():
    objective = small(alpha=0.3).double()
    x, _ = signals(5)
    y = torch.randn(5, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = gaussian_dictionary(M, N, 0).double()
    expected = 0.5 * ((x.double() - y @ d.T) ** 2).sum(-1) + 0.3 * y.abs().sum(-1)
    torch.testing.assert_close(objective(y, x.double()), expected)


def test_the_dictionary_has_unit_columns_and_the_lipschitz_constant_is_its_squared_norm():
    objective = small()
    d = objective.dictionary.double()
    torch.testing.assert_close(d.norm(dim=0), torch.ones(N, dtype=torch.float64), atol=1e-6, rtol=0)
    assert objective.lipschitz == pytest.approx(float(torch.linalg.eigvalsh(d.T @ d).max()), rel=1e-12)
    assert torch.equal(small(seed=0).dictionary, objective.dictionary)
    assert not torch.equal(small(seed=1).dictionary, objective.dictionary)


def test_fista_matches_scikit_learn_lasso():
    """scikit-learn's coordinate descent minimises ‖x − Dy‖² / (2m) + a‖y‖₁: the same problem with a = α / m."""
    alpha = 0.05
    objective = small(alpha)
    x, _ = signals(4, seed=3)
    ours = objective.solve(x.double())
    d = objective.dictionary.double().numpy()
    for row in range(4):
        reference = Lasso(alpha=alpha / M, fit_intercept=False, tol=1e-14, max_iter=100_000)
        reference.fit(d, x[row].double().numpy())
        torch.testing.assert_close(ours[row], torch.from_numpy(reference.coef_), atol=1e-7, rtol=0)
    assert bool((ours == 0).any()), "the lasso solution should have exact zeros"


def test_the_certificate_is_zero_at_the_oracle_solution_only():
    objective = small()
    x, codes = signals(8, seed=4)
    x = x.double()
    solution = objective.solve(x)
    assert float(objective.residual_flat(solution, x).max()) < 1e-8
    assert bool((objective.residual_flat(codes.double(), x) > 1e-2).all())


def test_nmse_in_db_against_a_hand_value():
    reference = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y = torch.tensor([[3.0, 4.5], [0.0, 0.0]])  # error 0.25 over 25 -> -20 dB; error 1 over 1 -> 0 dB
    torch.testing.assert_close(nmse_db(y, reference), torch.tensor([-20.0, 0.0]))
    with pytest.raises(ValueError, match="B x n"):
        nmse_db(y, reference[:, :1])


# --- the data module ------------------------------------------------------------------------------------------------


def test_noiseless_signals_are_the_dictionary_times_sparse_codes():
    x, codes = signals(2000)
    d = gaussian_dictionary(M, N, 0).double()
    torch.testing.assert_close(x.double(), codes.double() @ d.T, atol=1e-5, rtol=0)
    share = float((codes != 0).float().mean())
    assert abs(share - 0.2) < 0.01, share


def test_noise_has_the_requested_snr():
    x, codes = signals(64, snr_db=20.0)
    clean = codes.double() @ gaussian_dictionary(M, N, 0).double().T
    snr = 10 * torch.log10((clean**2).sum(-1) / ((x.double() - clean) ** 2).sum(-1))
    torch.testing.assert_close(snr, torch.full_like(snr, 20.0), atol=1e-4, rtol=0)


def test_the_data_module_refuses_an_objective_with_another_dictionary():
    data = SparseSignals(signal_dim=M, code_dim=N, dictionary_seed=0, cache_dir="none")
    data.attach(small(seed=0))  # the same dictionary: fine
    with pytest.raises(ValueError, match="different dictionary"):
        data.attach(small(seed=1))



def pool_module(targets: str, cache_dir: str) -> SparseSignals:
    data = SparseSignals(signal_dim=M, code_dim=N, sparsity=0.2, train_targets=targets, batch_size=16, train_size=32,
                         val_size=4, test_size=4, eval_batch_size=8, cache_dir=cache_dir, progress_bar=False)
    data.attach(small(alpha=0.2), needs_target=True)  # a larger α: the oracle converges in fewer steps
    data.setup("fit")
    return data


def test_the_pool_can_carry_the_true_codes_as_its_targets(tmp_path):
    """With train_targets="true_codes" the pool's y_star are the codes its signals were drawn from (x = D y_star),
    not the lasso solutions (which the default gives); the validation set keeps the oracle's solutions; the pool is
    not cached and the flag changes the cache key."""
    truth, oracle = pool_module("true_codes", str(tmp_path)), pool_module("oracle", str(tmp_path))
    pool, lasso_pool = truth._sets["pool"], oracle._sets["pool"]
    assert torch.equal(pool["x"], lasso_pool["x"])  # the same signals either way
    d = gaussian_dictionary(M, N, 0).double()
    torch.testing.assert_close(pool["x"].double(), pool["y_star"].double() @ d.T, atol=1e-5, rtol=0)
    share = float((pool["y_star"] != 0).float().mean())
    assert 0.1 < share < 0.3, share  # Bernoulli(0.2) codes, not a dense or empty target
    # the default targets are the lasso solutions, shrunk by the ℓ1 term: far from the true codes
    assert float((lasso_pool["y_star"] - pool["y_star"]).abs().max()) > 1e-2
    assert float(small(alpha=0.2).residual_flat(lasso_pool["y_star"].double(), lasso_pool["x"].double()).max()) < 1e-4
    torch.testing.assert_close(truth._sets["val"]["y_star"], oracle._sets["val"]["y_star"])
    assert truth.cache_file("pool") is None and oracle.cache_file("pool") is not None
    assert truth.cache_file("val") != oracle.cache_file("val")


def test_a_bad_train_target_is_refused():
    with pytest.raises(ValueError, match=r"train_targets must be one of \['oracle', 'true_codes'\]"):
        SparseSignals(train_targets="truth")


# --- LISTA ------------------------------------------------------------------------------------------------------------


def test_lista_starts_as_ista_exactly():
    """K untrained layers are ISTA's first K iterates from 0 with the step 1/L, to float64 rounding."""
    objective = small().double()
    x, _ = signals(16, seed=5)
    x = x.double()
    ista_iterates = []
    ISTA(steps=8, tol=None, lipschitz=objective.lipschitz, backtracking=False).solve(
        objective, x, callback=lambda k, y: ista_iterates.append(y.clone())
    )
    lista = LISTA(M, N, steps=8).double()
    with torch.no_grad():
        out = lista(x, objective)
    assert len(out.iterates) == 9 and len(ista_iterates) == 9
    for k, (ours, theirs) in enumerate(zip(out.iterates, ista_iterates, strict=True)):
        torch.testing.assert_close(ours, theirs, atol=1e-13, rtol=0, msg=f"iterate {k}")
    assert bool((out.y == 0).any()) and not torch.equal(out.y, ista_iterates[4])


@pytest.mark.parametrize("loss", [ObjectiveLoss(), RegressionLoss()], ids=["objective", "regression"])
def test_lista_trains(loss):
    torch.manual_seed(0)
    objective = small()
    lista = LISTA(M, N, steps=4)
    optimizer = torch.optim.Adam(lista.parameters(), lr=3e-3)
    x, _ = signals(256, seed=6)
    target = objective.solve(x) if loss.needs_target else None
    losses = []
    for _ in range(30):
        value = loss(lista(x, objective), x, objective, target).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_support_selection_passes_the_largest_entries_unshrunk():
    """With support selection, layer k's round(min(k p, p_max) n) largest |W_e x + S y| of each row skip the
    soft-threshold and the rest are shrunk by s_k α, recomputed here layer by layer from the network's own W_e, S."""
    objective = small().double()
    x, _ = signals(8, seed=7)
    x = x.double()
    lista = LISTA(M, N, steps=5, support_step=0.05, support_max=0.15).double()
    with torch.no_grad():
        out = lista(x, objective)
        assert [lista.selected_count(k) for k in range(5)] == [2, 4, 6, 6, 6]
        thresholds = lista.step_sizes * objective.alpha
        y, unshrunk_somewhere = torch.zeros(8, N, dtype=torch.float64), False
        for k in range(5):
            v = x @ lista.encoder.T + y @ lista.mutual.T
            top = v.abs().topk(lista.selected_count(k), dim=1).indices
            expected = torch.sign(v) * (v.abs() - thresholds[k]).clamp_min(0)
            expected.scatter_(1, top, v.gather(1, top))
            torch.testing.assert_close(out.iterates[k + 1], expected, atol=1e-13, rtol=0, msg=f"layer {k + 1}")
            # the selected entries are v itself, not v shrunk: they differ from ISTA's step by the threshold
            chosen = out.iterates[k + 1].gather(1, top)
            torch.testing.assert_close(chosen, v.gather(1, top), atol=1e-13, rtol=0)
            unshrunk_somewhere |= bool((chosen.abs() > thresholds[k].gather(0, top.flatten()).view_as(top)).any())
            y = out.iterates[k + 1]
        assert unshrunk_somewhere
    plain = LISTA(M, N, steps=5).double()
    with torch.no_grad():
        assert not torch.allclose(plain(x, objective).y, out.y)  # on by the option only
    with pytest.raises(ValueError, match="support_step must be a fraction"):
        LISTA(M, N, steps=2, support_step=1.5)


def test_a_loaded_lista_keeps_its_weights():
    objective = small()
    x, _ = signals(4)
    trained = LISTA(M, N, steps=3)
    trained(x, objective)
    with torch.no_grad():
        trained.mutual.mul_(0.5)  # anything but ISTA's values
    loaded = LISTA(M, N, steps=3)
    loaded.load_state_dict(trained.state_dict())
    torch.testing.assert_close(loaded(x, objective).y, trained(x, objective).y, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mutual, trained.mutual, rtol=0, atol=0)


def test_lista_needs_a_dictionary_objective():
    from tests.objectives import Quadratic

    with pytest.raises(TypeError, match="dictionary"):
        LISTA(4, 4, steps=2)(torch.zeros(3, 4), Quadratic())


# --- the module's metrics -----------------------------------------------------------------------------------------


def test_the_module_logs_nmse_and_sparsity():
    objective = small()
    module = SparseCodingModule(objective, LISTA(M, N, steps=2))
    y = torch.tensor([[1.0, 0.0] + [0.0] * (N - 2), [0.0, 2.0] + [1.0] * (N - 2)])
    y_star = torch.tensor([[2.0, 0.0] + [0.0] * (N - 2), [0.0, 2.0] + [1.0] * (N - 2)])
    x = torch.zeros(2, M)
    metrics = module.evaluation_metrics(Evaluated(x, y, y_star, objective(y, x), objective(y_star, x)))
    torch.testing.assert_close(metrics["nonzeros"], torch.tensor([1 / N, (N - 1) / N]))
    assert float(metrics["nmse_db"][0]) == pytest.approx(10 * math.log10(0.25))
    assert float(metrics["nmse_db"][1]) < -100  # exact
    assert "nmse_db" not in module.evaluation_metrics(Evaluated(x, y, None, objective(y, x), None))


# --- bad input -------------------------------------------------------------------------------------------------------


def test_nan_signals_are_refused_by_the_oracle():
    x, _ = signals(5)
    x[3, 2] = math.nan
    with pytest.raises(ValueError, match=r"1 signals hold NaN or infinite numbers \(rows \[3\]\)"):
        small().solve(x)


def test_a_wrong_signal_length_is_one_clear_error():
    objective = small()
    x = torch.zeros(3, M + 1)
    with pytest.raises(ObjectiveShapeError, match=rf"shape \(B, {M}\).*got \(3, {M + 1}\)"):
        objective(torch.zeros(3, N), x)
    with pytest.raises(ObjectiveShapeError, match=rf"LISTA expects signals of shape \(B, {M}\)"):
        LISTA(M, N, steps=2)(x, objective)
    with pytest.raises(ObjectiveShapeError, match="signal_dim"):
        objective.solve(x)


@pytest.mark.parametrize("alpha", [-0.1, math.nan, math.inf])
def test_a_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        SparseCoding(signal_dim=M, code_dim=N, alpha=alpha)


def test_bad_data_settings_are_refused():
    with pytest.raises(ValueError, match="sparsity"):
        SparseSignals(sparsity=0.0)
    with pytest.raises(ValueError, match="snr_db"):
        SparseSignals(snr_db=math.inf)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        LISTA(M, N, steps=0)

