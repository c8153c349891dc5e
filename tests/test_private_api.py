"""Every private symbol of torch, Lightning and jsonargparse that lightning-amor relies on, checked by name.

pyproject.toml bounds these libraries to the tested versions. When a newer version drops or renames a symbol
below, its test fails with a message naming the symbol, where lightning-amor uses it, and what to do, instead of
a run failing (or, for the guarded ones, silently doing something else) far from the cause.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Callable

import pytest


@dataclass(frozen=True)
class Private:
    """A private symbol: ``module`` and the attribute path ``name`` in it, and the file of lightning-amor using it."""

    module: str
    name: str
    used_in: str
    why: str
    check: Callable[[Any], bool] = lambda found: True

    @property
    def distribution(self) -> str:
        return {"pytorch_lightning": "pytorch-lightning"}.get(self.module.split(".")[0], self.module.split(".")[0])


def _accepts(keyword: str) -> Callable[[Any], bool]:
    return lambda function: keyword in inspect.signature(function).parameters


def _called_by_lightning_cli(name: str) -> Callable[[Any], bool]:
    def check(_: Any) -> bool:
        from pytorch_lightning.cli import LightningCLI

        return f"self.{name}(" in inspect.getsource(LightningCLI)

    return check


PRIVATE = [
    Private("pytorch_lightning.cli", "LightningCLI._parse_ckpt_path", "lightning_amor/cli.py",
            "AmortCLI overrides it so that a --ckpt_path file never replaces the recipe's model",
            _called_by_lightning_cli("_parse_ckpt_path")),
    Private("pytorch_lightning.cli", "LightningCLI._get", "lightning_amor/cli.py",
            "AmortCLI.instantiate_trainer reads the parsed trainer callbacks with it"),
    Private("pytorch_lightning.core.mixins.hparams_mixin", "_given_hyperparameters", "lightning_amor/module.py",
            "tells a module built from a config (safe to store its hyperparameters) from one built in Python",
            lambda found: hasattr(found, "get")),
    Private("pytorch_lightning", "Trainer().fit_loop.epoch_loop.manual_optimization.optim_step_progress",
            "lightning_amor/module.py", "counts one training step of a module with several optimizers, by the "
            "fit loop's progress counter", lambda found: callable(found.increment_ready)
            and callable(found.increment_completed) and hasattr(found.total, "completed")),
    Private("pytorch_lightning.callbacks", "ModelCheckpoint()._enable_version_counter", "lightning_amor/preemption.py",
            "the preemption checkpoint's last file gets the version suffix ModelCheckpoint adds (last-v1.ckpt)",
            lambda found: isinstance(found, bool)),
    Private("jsonargparse", "ArgumentParser.add_subcommands", "lightning_amor/cli.py",
            "the top-level --help lists the extra subcommands through the parser's _subcommands_action",
            lambda found: "_subcommands_action" in inspect.getsource(found)),
    Private("torch._subclasses.fake_tensor", "unset_fake_temporarily", "lightning_amor/export.py",
            "runs the seeded-random check outside fake-tensor tracing"),
    Private("torch.utils._pytree", "tree_leaves", "lightning_amor/export.py", "flattens traced arguments"),
    Private("torch._ops", "OpOverload", "lightning_amor/export.py", "finds random operators in a traced graph"),
    Private("torch._functorch.compile_utils", "strip_overloads", "lightning_amor/export.py",
            "turns a traced graph's overloads into the packets TorchScript calls"),
    Private("torch.fx.experimental.proxy_tensor", "make_fx", "lightning_amor/export.py",
            "traces the prediction with its private keyword _allow_non_fake_inputs",
            _accepts("_allow_non_fake_inputs")),
    Private("torch.fx.experimental.proxy_tensor", "disable_proxy_modes_tracing", "lightning_amor/export.py",
            "runs the seeded-random check outside proxy tracing"),
]


def _resolve(module: str, name: str) -> Any:
    """``module.name``; a part ``C()`` of ``name`` stands for an instance of ``C`` built with its defaults."""
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        if part.endswith("()"):
            found = getattr(found, part[:-2])(**({"logger": False} if part == "Trainer()" else {}))
        else:
            found = inspect.getattr_static(found, part) if isinstance(found, type) else getattr(found, part)
    return found


@pytest.mark.parametrize("symbol", PRIVATE, ids=[f"{p.module}.{p.name}" for p in PRIVATE])
def test_a_private_symbol_that_lightning_amor_uses_still_exists(symbol: Private):
    installed = f"{symbol.distribution} {version(symbol.distribution)}"
    advice = (f"lightning-amor uses {symbol.name} from {symbol.module} ({symbol.used_in}: {symbol.why}); "
              f"{{what}} in {installed}. Pin {symbol.distribution} to the versions in constraints.txt (the bounds in "
              f"pyproject.toml), or update {symbol.used_in} for {installed} and widen the bound.")
    try:
        found = _resolve(symbol.module, symbol.name)
    except (ImportError, AttributeError) as err:
        pytest.fail(advice.format(what=f"it disappeared ({err})"))
    assert symbol.check(found), advice.format(what="its behaviour or signature changed")


def test_the_list_names_every_private_import_of_the_code():
    """A new ``from torch._x import``/``import ... _x`` in the package must be added to :data:`PRIVATE`."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = {(p.module, p.name.split(".")[0]) for p in PRIVATE}
    found = set()
    for path in [*root.glob("lightning_amor/**/*.py"), *root.glob("datamodules/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for module, names in re.findall(r"^\s*from ((?:torch|pytorch_lightning|lightning_fabric|jsonargparse)"
                                        r"[\w.]*) import ([\w, ]+)", text, flags=re.M):
            for name in (n.strip() for n in names.split(",")):
                if module.split(".")[-1].startswith("_") or any(p.startswith("_") for p in module.split(".")) \
                        or name.startswith("_"):
                    found.add((module, name, path.relative_to(root).as_posix()))
    unlisted = sorted(item for item in found if item[:2] not in listed)
    assert not unlisted, f"private imports not named in tests/test_private_api.py's PRIVATE: {unlisted}"
