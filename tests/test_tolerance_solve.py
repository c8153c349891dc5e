"""The per-row tolerance solver of proximal inner problems (lightning_amor/tolerance_solve.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_amor.tolerance_solve import solve_to_tolerance


def quadratics(rows: int = 6, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-row SPD Hessians ``B x n x n`` with curvatures from 0.5 to up to 400 (a different spread per row) and
    linear terms ``B x n``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, dim, dim, generator=gen, dtype=torch.float64))
    top = torch.logspace(0, 2.6, rows, dtype=torch.float64)  # 1 ... 400
    eig = 0.5 + torch.linspace(0, 1, dim, dtype=torch.float64) * top[:, None]
    hessian = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    return hessian, torch.randn(rows, dim, generator=gen, dtype=torch.float64)


def quadratic_value(hessian: Tensor, c: Tensor):
    def value(y: Tensor) -> Tensor:
        return 0.5 * (y[:, None, :] @ hessian @ y[:, :, None]).flatten() - (c * y).sum(1)

    return value


def test_every_row_reaches_the_relative_tolerance_where_a_fixed_step_diverges() -> None:
    hessian, c = quadratics()
    y0 = torch.zeros_like(c)
    value = quadratic_value(hessian, c)
    y, report = solve_to_tolerance(value, y0, tolerance=1e-6, kind="relative", max_steps=500, initial_step=1.0)
    # measured anew, not trusting the report: ‖H y − c‖ ≤ 1e-6 ‖c‖ in every row
    residual = (hessian @ y[:, :, None]).squeeze(-1) - c
    assert bool((residual.norm(dim=1) <= 1e-6 * c.norm(dim=1)).all())
    assert bool(report.converged.all())
    torch.testing.assert_close(report.residual, residual.norm(dim=1))
    torch.testing.assert_close(y, torch.linalg.solve(hessian, c), rtol=1e-4, atol=1e-6)
    # accelerated: far fewer iterations than the worst row's condition number (800)
    assert int(report.steps.max()) < 300
    # the same first step without a line search diverges on the sharp rows
    fixed = y0.clone()
    for _ in range(20):
        fixed = fixed - 1.0 * ((hessian @ fixed[:, :, None]).squeeze(-1) - c)
    assert not bool(torch.isfinite(fixed[-1]).all()) or float(fixed[-1].norm()) > 1e6


def test_the_absolute_tolerance_and_a_row_that_runs_out_of_steps_is_reported() -> None:
    hessian, c = quadratics()
    value = quadratic_value(hessian, c)
    y, report = solve_to_tolerance(value, torch.zeros_like(c), tolerance=1e-5, kind="absolute", max_steps=400)
    assert bool((report.residual <= 1e-5).all()) and bool(report.converged.all())
    _, short = solve_to_tolerance(value, torch.zeros_like(c), tolerance=1e-8, kind="absolute", max_steps=3)
    assert not bool(short.converged.any())
    assert bool((short.steps == 3).all())
    summary = short.summary()
    assert summary["converged"] == 0.0 and summary["median_ratio"] > 1e-8


def test_a_row_that_starts_stationary_is_converged_at_once() -> None:
    hessian, c = quadratics(rows=2)
    start = torch.linalg.solve(hessian, c)
    start[1] += 1.0
    y, report = solve_to_tolerance(quadratic_value(hessian, c), start, tolerance=1e-3, kind="absolute")
    assert bool(report.converged.all())
    assert int(report.steps[0]) == 0 and int(report.steps[1]) > 0
    torch.testing.assert_close(y[0], start[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tolerance": 0.0}, "must be positive"),
        ({"kind": "loose"}, "'relative' or 'absolute'"),
        ({"max_steps": 0}, "must be positive"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message) -> None:
    hessian, c = quadratics(rows=2)
    with pytest.raises(ValueError, match=message):
        solve_to_tolerance(quadratic_value(hessian, c), torch.zeros_like(c), **kwargs)


def test_a_bad_start_or_value_is_one_clear_error() -> None:
    hessian, c = quadratics(rows=2)
    value = quadratic_value(hessian, c)
    with pytest.raises(ValueError, match="B x n"):
        solve_to_tolerance(value, torch.zeros(2, 8, 1, dtype=torch.float64))
    start = torch.zeros_like(c)
    start[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite at the start of rows \[1\]"):
        solve_to_tolerance(value, start)
    with pytest.raises(ValueError, match="B values"):
        solve_to_tolerance(lambda y: value(y).sum(), torch.zeros_like(c))
