"""Stateful training loaders: the replay buffer, context streams and the batch position, all checkpointed through
Lightning's stateful-loader mechanism so that a resumed run is bitwise the uninterrupted one (SIGKILL included)."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import ContextStream, ReplayBuffer, SphereContexts, StreamLoader
from lightning_amor import MLP, AmortizedModule, FullyAmortized
from lightning_amor.apps.sphere import SphereObjective
from lightning_amor.cli import main
from tests.streams import DriftingSphereStream
from tests.test_faults import (
    EVERY,
    FOREVER,
    assert_same_training_state,
    finish,
    fit_args,
    load,
    output,
    start,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "streams.md"


def roundtrip(state: dict) -> dict:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- the replay buffer ----------------------------------------------------------------------------------------


def test_replay_buffer_keeps_the_most_recent_contexts_in_a_ring():
    buffer = ReplayBuffer(capacity=5)
    buffer.add(torch.arange(3.0)[:, None])
    assert len(buffer) == 3
    buffer.add(torch.arange(3.0, 7.0)[:, None])
    assert len(buffer) == 5
    torch.testing.assert_close(buffer.contents(), torch.arange(2.0, 7.0)[:, None])
    buffer.add(torch.arange(7.0, 20.0)[:, None])  # more than the capacity at once: the last 5 survive
    torch.testing.assert_close(buffer.contents(), torch.arange(15.0, 20.0)[:, None])
    one_by_one = ReplayBuffer(capacity=5)
    for value in range(20):
        one_by_one.add(torch.tensor([[float(value)]]))
    assert one_by_one.state_dict()["cursor"] == buffer.state_dict()["cursor"]
    torch.testing.assert_close(one_by_one.state_dict()["data"], buffer.state_dict()["data"])


def test_replay_buffer_samples_dict_contexts_from_what_it_holds_with_its_own_generator():
    buffer = ReplayBuffer(capacity=8, seed=3)
    buffer.add({"a": torch.arange(4.0)[:, None].repeat(1, 2), "b": torch.arange(4)})
    torch.manual_seed(0)
    first = buffer.sample(6)
    assert set(first) == {"a", "b"} and first["a"].shape == (6, 2) and first["b"].shape == (6,)
    torch.testing.assert_close(first["a"][:, 0], first["b"].float())  # rows stay together
    assert set(first["b"].tolist()) <= {0, 1, 2, 3}
    again = ReplayBuffer(capacity=8, seed=3)
    again.add({"a": torch.arange(4.0)[:, None].repeat(1, 2), "b": torch.arange(4)})
    torch.manual_seed(1)  # the global generator plays no part
    torch.testing.assert_close(again.sample(6), first)


def test_replay_buffer_state_round_trips_exactly():
    buffer = ReplayBuffer(capacity=6, seed=1)
    for _ in range(4):
        buffer.add(torch.randn(4, 3))
        buffer.sample(2)
    state = roundtrip(buffer.state_dict())
    expected = [buffer.sample(5) for _ in range(3)]
    restored = ReplayBuffer(capacity=6, seed=99)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.contents(), held_in(state), rtol=0, atol=0)
    for batch in expected:
        torch.testing.assert_close(restored.sample(5), batch, rtol=0, atol=0)
    restored.add(torch.ones(1, 3))
    buffer.add(torch.ones(1, 3))
    torch.testing.assert_close(restored.contents(), buffer.contents(), rtol=0, atol=0)


def held_in(state: dict) -> torch.Tensor:
    """The contents a buffer state describes, oldest first."""
    data, cursor, size = state["data"][""], state["cursor"], state["size"]
    return torch.cat([data[cursor:], data[:cursor]]) if size == state["capacity"] else data


def test_replay_buffer_errors_say_what_to_do():
    buffer = ReplayBuffer(capacity=4)
    with pytest.raises(RuntimeError, match="empty; add"):
        buffer.sample(1)
    buffer.add(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not match the buffer's"):
        buffer.add(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="do not match the buffer's"):
        buffer.add({"": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="capacity 4, this buffer has 5"):
        ReplayBuffer(capacity=5).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="at least 1"):
        ReplayBuffer(capacity=0)


# --- the stream loader ------------------------------------------------------------------------------------------


def stream_loader(**kwargs: Any) -> StreamLoader:
    stream = DriftingSphereStream(walkers=4, capacity=16)
    stream.setup(seed=0, rank=0, world=1)
    return StreamLoader(stream, batch_size=6, batches_per_epoch=3, **kwargs)


def test_a_stream_loader_resumed_from_its_state_continues_the_stream_bitwise_mid_epoch():
    loader = stream_loader()
    epoch = list(loader)
    assert len(epoch) == 3 and all(b["x"].shape == (6, 16) for b in epoch)
    batches = iter(loader)
    next(batches)  # one batch into the second epoch
    state = roundtrip(loader.state_dict())
    assert state["ranks"][0]["consumed"] == 4
    rest = [b["x"] for b in batches] + [b["x"] for b in loader]

    resumed = stream_loader()  # a fresh stream (set up from the seed), then the saved state
    resumed.load_state_dict(state)
    again = [b["x"] for b in resumed] + [b["x"] for b in resumed]
    assert len(again) == len(rest) == 5, "the resumed loader does not end the interrupted epoch where it ends"
    for a, b in zip(again, rest, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_stream_gets_the_module_and_must_return_whole_batches():
    class Short(ContextStream):
        def setup(self, seed, rank, world):
            self.modules = []

        def next_batch(self, batch_size, module):
            self.modules.append(module)
            assert not torch.is_grad_enabled(), "a stream runs without autograd"
            return torch.zeros(batch_size - 1, 16)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    stream = Short()
    stream.setup(0, 0, 1)
    module = torch.nn.Linear(1, 1)
    loader = StreamLoader(stream, batch_size=4, batches_per_epoch=2, module=lambda: module)
    with pytest.raises(ValueError, match=r"returned 3 contexts; return exactly batch_size"):
        next(iter(loader))
    assert stream.modules == [module]


def test_a_stream_state_of_another_world_size_is_refused():
    loader = stream_loader()
    state = loader.state_dict()
    with pytest.raises(ValueError, match="stream of 2 rank.*resume with 2 process"):
        loader.load_state_dict({"ranks": state["ranks"] * 2})
    with pytest.raises(KeyError, match="holds 'ranks'"):
        loader.load_state_dict({"consumed": 3})


def test_a_data_module_with_a_stream_takes_no_pool_and_no_workers(tmp_path):
    for bad in ({"train_size": 512}, {"num_workers": 1}):
        with pytest.raises(ValueError, match="unset train_size and set num_workers to 0"):
            SphereContexts(stream=DriftingSphereStream(), **bad)
    data = SphereContexts(stream=DriftingSphereStream(), cache_dir="none")
    assert "stream" not in data.hparams, "an object with state must not go into the checkpoint's hyperparameters"


# --- the batch position of a data module without a stream --------------------------------------------------


def test_the_index_loader_resumes_mid_epoch_on_any_rank_with_workers(tmp_path):
    def rank_loader(rank: int, workers: int):
        data = SphereContexts(batch_size=4, batches_per_epoch=3, cache_dir="none", num_workers=workers)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        return data.train_dataloader()

    for rank in (0, 1):
        uninterrupted = rank_loader(rank, 0)
        expected = [b["x"] for b in uninterrupted] + [b["x"] for b in uninterrupted]  # two epochs
        resumed = rank_loader(rank, 2)
        resumed.load_state_dict(roundtrip({"consumed": 2}))
        got = [b["x"] for b in resumed] + [b["x"] for b in resumed]
        assert len(got) == 4 and resumed.state_dict() == {"consumed": 6}
        for a, b in zip(got, expected[2:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        del resumed  # stop its workers now: left to the cycle collector, their shutdown waits out a timeout


class Record(Callback):
    """Every training batch's contexts."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["x"].clone())


def tiny_module() -> AmortizedModule:
    torch.manual_seed(0)
    return AmortizedModule(SphereObjective(grid_points=64, starts=1), FullyAmortized(MLP(16, 3, hidden=[8])))


def tiny_fit(work: Path, data: SphereContexts, max_steps: int, ckpt_path: Any = None, every: int = 4,
             **kwargs: Any) -> tuple[AmortizedModule, Record]:
    module, record = tiny_module(), Record()
    periodic = ModelCheckpoint(dirpath=work, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=work,
                      callbacks=[record, periodic], **kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, record


def sphere_data(tmp_path: Path, **kwargs: Any) -> SphereContexts:
    return SphereContexts(batch_size=4, batches_per_epoch=3, val_size=4, test_size=4, eval_batch_size=4,
                          cache_dir=str(tmp_path / "cache"), **kwargs)


def assert_same_weights(a: AmortizedModule, b: AmortizedModule, same: bool = True) -> None:
    equal = all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert equal == same, "weights differ" if same else "weights are equal although the state was lost"


def test_lightning_checkpoints_the_batch_position_and_a_reloaded_loader_continues(tmp_path):
    reference, seen = tiny_fit(tmp_path / "a", sphere_data(tmp_path), 8)
    ckpt = load(tmp_path / "a" / "step=4.ckpt")
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"consumed": 4}]
    resumed, rest = tiny_fit(tmp_path / "b", sphere_data(tmp_path, num_workers=2), 8,  # workers draw ahead
                             ckpt_path=tmp_path / "a" / "step=4.ckpt")
    assert len(rest.seen) == 4
    for a, b in zip(rest.seen, seen.seen[4:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_weights(resumed, reference)
    # a loader made again every epoch continues the stream instead of starting over
    _, reloaded = tiny_fit(tmp_path / "c", sphere_data(tmp_path), 8, reload_dataloaders_every_n_epochs=1)
    for a, b in zip(reloaded.seen, seen.seen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_resumed_with_its_stream_state_ends_with_the_uninterrupted_weights(tmp_path):
    class Forgetful(DriftingSphereStream):
        """Checkpoints its walkers and generator, but not its replay buffer."""

        def state_dict(self):
            return {k: v for k, v in super().state_dict().items() if k != "buffer"}

        def load_state_dict(self, state):
            self.walkers, _ = state["walkers"].clone(), self.generator.set_state(state["generator"])

    for stream_class, exact in ((DriftingSphereStream, True), (Forgetful, False)):
        work = tmp_path / stream_class.__name__
        reference, _ = tiny_fit(work / "a", sphere_data(tmp_path, stream=stream_class()), 8, every=5)
        ckpt = work / "a" / "step=5.ckpt"
        assert "stream" in load(ckpt)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"][0]
        resumed, _ = tiny_fit(work / "b", sphere_data(tmp_path, stream=stream_class()), 8, ckpt_path=ckpt, every=5)
        assert_same_weights(resumed, reference, same=exact)


def test_the_documented_stream_runs_from_its_recipe_and_resumes_bitwise(tmp_path):
    text = PAGE.read_text(encoding="utf-8")
    source = re.search(r'^```python title="walk_stream.py"\n(.*?)^```', text, re.S | re.M).group(1)
    (tmp_path / "walk_stream.py").write_text(source)
    spec = importlib.util.spec_from_file_location("walk_stream", tmp_path / "walk_stream.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = yaml.safe_load(re.search(r"^```yaml\n(.*?)^```", text, re.S | re.M).group(1))["data"]
    stream = data["init_args"].pop("stream")
    assert (data["class_path"], stream["class_path"]) == ("datamodules.SphereContexts", "walk_stream.WalkStream")

    def documented(**shrink: Any) -> SphereContexts:
        return SphereContexts(**{**data["init_args"], **shrink}, stream=example.WalkStream(**stream["init_args"]))

    shrink = dict(batch_size=8, batches_per_epoch=3, val_size=4, test_size=4, cache_dir=str(tmp_path / "cache"))
    reference, seen = tiny_fit(tmp_path / "a", documented(**shrink), 6)
    resumed, _ = tiny_fit(tmp_path / "b", documented(**shrink), 6, ckpt_path=tmp_path / "a" / "step=4.ckpt")
    assert_same_weights(resumed, reference)
    assert not torch.equal(seen.seen[0], seen.seen[1]), "the stream repeats itself"


# --- SIGKILL, then --ckpt_path last ---------------------------------------------------------------------------

STREAM = json.dumps({"class_path": "tests.streams.DriftingSphereStream", "init_args": {"capacity": 48}})


@pytest.fixture
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])


def test_a_killed_run_with_a_stream_resumes_bitwise(tmp_path, monkeypatch, bare_argv):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the subprocesses import tests.streams
    cache = tmp_path / "cache"
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    last = killed / "checkpoints" / "last.ckpt"

    def args(work: Path, max_steps: int) -> list[str]:
        return [*fit_args(work, cache, max_steps), "--data.init_args.stream", STREAM,
                "--data.init_args.batches_per_epoch", "7"]

    proc = start(args(killed, FOREVER), killed)
    wait_until(last.exists, proc, killed, timeout=60)
    proc.kill()
    assert finish(proc, killed) == -signal.SIGKILL
    saved = load(last)
    assert saved["global_step"] > 0 and saved["global_step"] % EVERY == 0
    (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(loader_state["ranks"][0]["stream"]["buffer"]["data"][""]) > 0, "the buffer's contents were not saved"

    target = saved["global_step"] + 2 * EVERY  # past an epoch's end (7 batches) from wherever it stopped
    proc = start([*args(killed, target), "--ckpt_path", "last"], killed)
    assert finish(proc, killed) == 0, output(killed)[-3000:]
    resumed = load(last)
    assert resumed["global_step"] == target

    reference.mkdir()
    monkeypatch.chdir(reference)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args=args(reference, target))
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(resumed, load(reference / "checkpoints" / "last.ckpt"))
