"""Tests that the reference cache and the data it holds never give a silently wrong answer.

The cache key follows the oracle's code and buffers; non-finite contexts or references are refused where they
arise, naming the data module, the split and the rows; a pool solve resumes from the chunks it saved and a SIGTERM
during it exits with status 75; a validation gap below zero beyond noise is a warning that names the oracle and the
cache file.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from datamodules.context import ContextDataModule, NonFiniteDataError
from lightning_amor import MLP, AmortizedModule, FullyAmortized, Objective
from lightning_amor.objective import Context, context_batch_size
from lightning_amor.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


class Shifted(Objective):
    """f(y; x) = ‖y − x‖², whose oracle answers ``x + shift``: exact with ``shift = 0``, wrong otherwise."""

    dim = 2

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.calls: list[int] = []
        self.before_call: Callable[[int], None] = lambda calls: None  # a test's interruption (not in the key)

    def value(self, y: Tensor, x: Context) -> Tensor:
        return ((y - x) ** 2).sum(-1)

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        self.before_call(len(self.calls))
        self.calls.append(context_batch_size(x))
        return x + self.shift


def interrupt_after(calls: int) -> Callable[[int], None]:
    """A ``before_call`` that raises ``KeyboardInterrupt`` once ``calls`` calls are done."""

    def check(done: int) -> None:
        if done == calls:
            raise KeyboardInterrupt("interrupted")

    return check


class Gaussian(ContextDataModule):
    """Standard normal contexts of size 2, with NaN in the rows ``nan_rows`` of every draw."""

    def __init__(self, nan_rows: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_rows = nan_rows

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        x = torch.randn(num, 2, generator=generator)
        for row in self.nan_rows:
            if row < num:
                x[row, 1] = float("nan")
        return x


def gaussian(tmp_path: Path, objective: Objective, **kwargs) -> Gaussian:
    """A small Gaussian data module caching under ``tmp_path / "cache"``, attached to ``objective``."""
    config = dict(batch_size=4, batches_per_epoch=2, val_size=16, test_size=8, eval_batch_size=4,
                  cache_dir=str(tmp_path / "cache"), progress_bar=False)
    config.update(kwargs)
    data = Gaussian(**config)
    data.attach(objective, needs_target=config.get("train_size") is not None)
    return data


# --- the cache key ---------------------------------------------------------------------------------------------

ORACLE_SOURCE = '''
import torch
from lightning_amor import Objective


class Oracle(Objective):
    dim = 2

    def value(self, y, x):
        return ((y - x) ** 2).sum(-1)

    def solve(self, x, init=None):
        return {answer}
'''


def load_oracle(folder: Path, answer: str) -> type:
    """The class ``Oracle`` of the module ``stale_oracle`` in ``folder``, (re)written to answer ``answer``."""
    (folder / "stale_oracle.py").write_text(ORACLE_SOURCE.format(answer=answer))
    sys.modules.pop("stale_oracle", None)
    importlib.invalidate_caches()
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("stale_oracle").Oracle
    finally:
        sys.path.remove(str(folder))


def test_a_changed_solve_gets_a_new_key_and_fresh_references(tmp_path):
    right = load_oracle(tmp_path, "x.clone()")()
    data = gaussian(tmp_path, right)
    data.setup("validate")
    wrong = load_oracle(tmp_path, "torch.zeros_like(x)")()
    assert type(wrong).__qualname__ == type(right).__qualname__ and type(wrong).__module__ == type(right).__module__
    assert wrong.cache_key() != right.cache_key()
    changed = gaussian(tmp_path, wrong)
    assert changed.cache_key("val", 16) != data.cache_key("val", 16)
    changed.setup("validate")
    assert bool((changed._sets["val"]["y_star"] == 0).all())  # solved afresh, not the stale references
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_the_key_follows_the_buffers_and_is_stable():
    assert Shifted(0.0).cache_key() == Shifted(0.0).cache_key()
    assert Shifted(0.0).cache_key() != Shifted(3.0).cache_key()
    objective = Shifted(0.0)
    before = objective.cache_key()
    objective.shift.fill_(1.0)
    assert objective.cache_key() != before


def no_source_class(answer: str) -> type:
    """A subclass of Shifted made by ``exec`` (so ``inspect.getsource`` cannot find it) that answers ``answer``."""
    namespace: dict = {"Shifted": Shifted}
    exec(f"class NoSource(Shifted):\n    def solve(self, x, init=None):\n        return {answer}\n", namespace)
    return namespace["NoSource"]


def test_a_class_without_source_is_keyed_by_its_bytecode():
    key = no_source_class("x + 1")().cache_key()
    assert isinstance(key, str) and "NoSource" in key
    assert no_source_class("x + 1")().cache_key() == key
    assert no_source_class("x - 1")().cache_key() != key


def test_the_contexts_must_match_the_cached_references(tmp_path):
    gaussian(tmp_path, Shifted()).setup("validate")
    (path,) = (tmp_path / "cache").glob("*.pt")
    saved = torch.load(path, weights_only=True)
    saved["contexts"] = "0" * 64
    torch.save(saved, path)
    with pytest.raises(RuntimeError, match="other contexts") as info:
        gaussian(tmp_path, Shifted()).setup("validate")
    assert str(path) in str(info.value)


def test_cache_file_names_the_file_of_each_split(tmp_path):
    data = gaussian(tmp_path, Shifted(), train_size=8)
    assert data.cache_file("val") is not None and not data.cache_file("val").exists()
    data.prepare_data()
    data.setup("fit")
    assert sorted(path.name for path in (tmp_path / "cache").glob("*.pt")) == sorted(
        data.cache_file(split).name for split in ("pool", "val", "test")
    )
    assert data.cache_file("pool") != data.cache_file("val")
    assert gaussian(tmp_path, Shifted(), cache_dir="none").cache_file("val") is None
    assert gaussian(tmp_path, Shifted()).cache_file("pool") is None  # no training pool
    with pytest.raises(ValueError, match="split must be one of"):
        data.cache_file("train")


# --- non-finite data -----------------------------------------------------------------------------------------


def test_nonfinite_contexts_of_a_fixed_set_are_named(tmp_path):
    data = gaussian(tmp_path, Shifted(), nan_rows=(2, 5))
    with pytest.raises(NonFiniteDataError) as info:
        data.setup("validate")
    message = str(info.value)
    assert "Gaussian" in message and "val" in message and "rows [2, 5]" in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))


def test_nonfinite_training_batches_are_named(tmp_path):
    data = gaussian(tmp_path, Shifted(), nan_rows=(1,), cache_dir="none")
    with pytest.raises(NonFiniteDataError, match=r"Gaussian.*training batch 0.*rows \[1\]"):
        next(iter(data.train_dataloader()))


def test_nonfinite_references_from_the_oracle_are_named(tmp_path):
    data = gaussian(tmp_path, Shifted(shift=float("nan")))
    with pytest.raises(NonFiniteDataError, match=r"Shifted\.solve.*val.*rows \[0, 1, 2"):
        data.setup("validate")
    assert not list((tmp_path / "cache").glob("*.pt"))


# --- the pool is solved in chunks that a rerun continues -------------------------------------------------------


def test_an_interrupted_pool_solve_continues_from_its_chunks(tmp_path):
    reference = gaussian(tmp_path / "whole", Shifted(), train_size=16, eval_batch_size=16)
    reference.setup("fit")
    interrupted = Shifted()
    interrupted.before_call = interrupt_after(2)
    first = gaussian(tmp_path, interrupted, train_size=16)
    with pytest.raises(KeyboardInterrupt):
        first.prepare_data()
    assert first.objective.calls == [4, 4]
    # the chunk size is not part of the key: a rerun with other chunks continues the saved ones
    objective = Shifted()
    again = gaussian(tmp_path, objective, train_size=16, eval_batch_size=3)
    assert again.cache_key("pool", 16) == first.cache_key("pool", 16)
    again.setup("fit")
    assert sum(objective.calls[:3]) == 8  # only the 8 pool contexts left, then the validation set
    torch.testing.assert_close(again._sets["pool"]["y_star"], reference._sets["pool"]["y_star"], rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "cache").iterdir()] and not [
        p for p in (tmp_path / "cache").iterdir() if p.is_dir()
    ]  # the chunks are gone once the whole set is saved


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from tests.test_cache_safety import Shifted, gaussian

def pause(done):
    if done == 2:
        print("solving", flush=True)
        time.sleep(60)

objective = Shifted()
objective.before_call = pause
gaussian(Path(sys.argv[1]), objective, train_size=16).prepare_data()
"""


def test_sigterm_during_the_pool_solve_exits_75_keeping_the_chunks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SIGTERM_SCRIPT), str(tmp_path)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while process.stdout.readline().strip() != "solving":
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr and "8 of 16 pool references" in stderr
    chunks = list((tmp_path / "cache").glob("*/*.pt"))
    assert len(chunks) == 2
    objective = Shifted()
    gaussian(tmp_path, objective, train_size=16).prepare_data()
    assert objective.calls[:2] == [4, 4]  # the two chunks left, then the validation set


# --- a gap below zero is a warning -------------------------------------------------------------------------------


def validate(module: AmortizedModule, data: ContextDataModule, tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, data, verbose=False)


def test_a_negative_gap_names_the_oracle_and_the_cache_file(tmp_path):
    torch.manual_seed(0)
    wrong = Shifted(shift=3.0)  # the "references" are far from the minimiser: any prediction beats them
    data = gaussian(tmp_path, wrong)
    module = AmortizedModule(wrong, FullyAmortized(MLP(2, 2, hidden=[4])))
    with pytest.warns(UserWarning, match="below zero") as record:
        validate(module, data, tmp_path)
    message = next(str(w.message) for w in record if "below zero" in str(w.message))
    assert "Shifted.solve" in message and str(data.cache_file("val")) in message


def test_an_exact_oracle_gives_no_warning(tmp_path):
    torch.manual_seed(0)
    exact = Shifted()
    data = gaussian(tmp_path, exact)
    module = AmortizedModule(exact, FullyAmortized(MLP(2, 2, hidden=[4])))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        validate(module, data, tmp_path)
    assert not [w for w in record if "below zero" in str(w.message)]


# --- the sphere benchmark asks the data module for its cache file --------------------------------------------------


def test_the_sphere_benchmark_times_only_a_pool_it_solved(tmp_path):
    from benchmarks.sphere import prepare_references
    from lightning_amor import RegressionLoss

    objective = Shifted()
    module = AmortizedModule(objective, FullyAmortized(MLP(2, 2, hidden=[4])), loss=RegressionLoss())
    cli = SimpleNamespace(datamodule=gaussian(tmp_path, objective, train_size=8), model=module)
    label_times: dict = {}
    assert prepare_references(cli, label_times) is not None  # solved now: timed
    assert list(label_times) == [cli.datamodule.cache_file("pool").name]
    cli = SimpleNamespace(datamodule=gaussian(tmp_path, Shifted(), train_size=8), model=module)
    assert prepare_references(cli, {}) is None  # already in the cache: unknown cost
