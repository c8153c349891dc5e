"""The README's 'Writing a new problem' example runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch
import yaml

from lightning_amor.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    section = README.read_text().split("## Writing a new problem", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_readme_new_problem_trains(tmp_path, monkeypatch):
    (code,) = _blocks("python")
    module = types.ModuleType("my_module")
    exec(compile(code, str(README), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "my_module", module)

    objective = module.ShiftedQuadratic()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y_star = objective.solve(x)
    grad = torch.func.grad(lambda y: objective(y, x).sum())(y_star)
    # float32 L-BFGS stops with gradients of about 1e-4 here; a wrong oracle would leave them of order 1
    assert grad.abs().max() < 1e-3, "the README's oracle must return stationary points"

    (recipe,) = _blocks("yaml")
    config = yaml.safe_load(recipe)
    assert config["model"]["class_path"] == "lightning_amor.AmortizedModule"
    path = tmp_path / "my_problem.yaml"
    path.write_text(recipe)
    main(args=[
        "fit", "--config", str(path),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--data.init_args.val_size", "16", "--data.init_args.test_size", "16",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ])
