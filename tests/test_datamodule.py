"""Tests of ContextDataModule (through SphereContexts): batches, seeding, rank sharding, fixed sets and their cache."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from datamodules import SphereContexts
from datamodules.context import BatchIndexSampler
from lightning_amor import MLP, AmortizedModule, FullyAmortized, RegressionLoss
from lightning_amor.apps.sphere import SphereObjective, fibonacci_sphere
from lightning_amor.objective import Context, context_batch_size


class CountingSphere(SphereObjective):
    """A cheap sphere objective that records the batch size of every oracle call."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__(temperature=temperature, grid_points=256, starts=2)
        self.solved: list[int] = []

    def solve(self, x: Context, init: Optional[Tensor] = None) -> Tensor:
        self.solved.append(context_batch_size(x))
        return super().solve(x, init)


class LearnableSphere(CountingSphere):
    """A sphere objective with a learnable parameter: its reference solutions must never be cached."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))


def make_data(tmp_path, objective=None, needs_target: bool = False, **kwargs) -> SphereContexts:
    """Tiny SphereContexts caching under ``tmp_path``, attached to ``objective`` (a CountingSphere by default)."""
    config = dict(batch_size=8, batches_per_epoch=3, val_size=12, test_size=10, eval_batch_size=64)
    config.update(kwargs)
    config.setdefault("cache_dir", str(tmp_path / "cache"))
    data = SphereContexts(**config)
    data.attach(objective if objective is not None else CountingSphere(), needs_target=needs_target)
    return data


def train_batches(data: SphereContexts) -> list[dict[str, Tensor]]:
    return list(data.train_dataloader())


def cache_files(tmp_path) -> list:
    return sorted((tmp_path / "cache").glob("*.pt"))


# --- training batches ---------------------------------------------------------------------------------


def test_training_batches_are_whole_dict_batches(tmp_path):
    data = make_data(tmp_path)
    data.setup("fit")
    batches = train_batches(data)
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"x"}
        assert batch["x"].shape == (8, 16)
        assert batch["x"].dtype == torch.float32
        centres, alpha = batch["x"][:, :12].reshape(8, 4, 3), batch["x"][:, 12:]
        torch.testing.assert_close(centres.norm(dim=-1), torch.ones(8, 4))
        assert bool((alpha >= 0).all()) and bool((alpha < 0.7).all())


def test_same_seed_same_batches_across_runs_and_worker_counts(tmp_path):
    first = train_batches(make_data(tmp_path, cache_dir="none"))
    again = train_batches(make_data(tmp_path, cache_dir="none"))
    workers = train_batches(make_data(tmp_path, cache_dir="none", num_workers=2))
    other_seed = train_batches(make_data(tmp_path, cache_dir="none", seed=1))
    for a, b, c, d in zip(first, again, workers, other_seed, strict=True):
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
        torch.testing.assert_close(a["x"], c["x"], rtol=0, atol=0)
        assert not torch.allclose(a["x"], d["x"])


def test_different_batch_indices_give_different_contexts(tmp_path):
    data = make_data(tmp_path, cache_dir="none", batches_per_epoch=6)
    loader = data.train_dataloader()
    rows = torch.cat([b["x"] for b in loader])
    assert rows.shape == (48, 16)
    assert torch.unique(rows, dim=0).shape[0] == 48
    # iterated again, the loader continues with the next epoch's batch indices, so new contexts
    next_epoch = torch.cat([b["x"] for b in loader])
    assert torch.unique(torch.cat([rows, next_epoch]), dim=0).shape[0] == 96


# --- rank sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,world", [(10, 2), (9, 3), (7, 2)])
def test_batch_index_sampler_shards_are_disjoint_and_cover_one_process(total, world):
    for epoch in (0, 1):
        single = BatchIndexSampler(total, rank=0, world=1)
        single.set_epoch(epoch)
        shards = []
        for rank in range(world):
            sampler = BatchIndexSampler(total, rank=rank, world=world)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
        union = [i for shard in shards for i in shard]
        assert len(union) == len(set(union)), "ranks share a batch index"
        assert set(union) == set(single) == set(range(epoch * total, (epoch + 1) * total))


def test_batch_index_sampler_without_repeat_keeps_the_same_indices():
    sampler = BatchIndexSampler(5, rank=1, world=2, repeat_epochs=False)
    sampler.set_epoch(3)
    assert list(sampler) == [1, 3]


def test_data_module_ranks_get_disjoint_batches_whose_union_is_the_single_process_set(tmp_path):
    per_rank = 3
    shards = []
    for rank in range(2):
        data = make_data(tmp_path, cache_dir="none", batches_per_epoch=per_rank)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = data.train_dataloader()
        assert len(loader) == per_rank
        shards.append(torch.cat([b["x"] for b in loader]))
    # a single process that sees the same number of batches per epoch as both ranks together
    single = torch.cat([b["x"] for b in train_batches(make_data(tmp_path, cache_dir="none", batches_per_epoch=6))])
    both = torch.cat(shards)
    assert torch.unique(both, dim=0).shape[0] == both.shape[0], "the ranks share contexts"
    as_set = {tuple(row.tolist()) for row in both}
    assert as_set == {tuple(row.tolist()) for row in single}


def test_evaluation_sets_are_split_across_ranks_by_context(tmp_path):
    data = make_data(tmp_path, cache_dir="none", val_size=7, eval_batch_size=2)
    data.setup("validate")
    full = data._sets["val"]
    shards = []
    for rank in range(2):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        batches = list(data.val_dataloader())
        assert all(set(b) == {"x", "y_star"} for b in batches)
        shards.append({k: torch.cat([b[k] for b in batches]) for k in ("x", "y_star")})
    assert [s["x"].shape[0] for s in shards] == [4, 3]
    both = {k: torch.cat([s[k] for s in shards]) for k in ("x", "y_star")}
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5])
    for k in ("x", "y_star"):
        torch.testing.assert_close(both[k], full[k][order], rtol=0, atol=0)
    data.trainer = SimpleNamespace(global_rank=0, world_size=8)
    with pytest.raises(ValueError, match="the val set has 7 contexts, fewer than the 8 ranks"):
        data.val_dataloader()


# --- fixed validation set and the cache of its references ----------------------------------------------


def test_validation_set_is_fixed_seeded_and_solved(tmp_path):
    data = make_data(tmp_path, cache_dir="none")
    data.setup("validate")
    batches = list(data.val_dataloader())
    assert len(batches) == 1
    x, y_star = batches[0]["x"], batches[0]["y_star"]
    assert x.shape == (12, 16) and y_star.shape == (12, 3)
    other = make_data(tmp_path, cache_dir="none")
    other.setup("validate")
    torch.testing.assert_close(next(iter(other.val_dataloader()))["x"], x, rtol=0, atol=0)
    reseeded = make_data(tmp_path, cache_dir="none", seed=3)
    reseeded.setup("validate")
    assert not torch.allclose(next(iter(reseeded.val_dataloader()))["x"], x)
    # the references are global minimizers: no point of a dense grid is better
    objective = SphereObjective()
    grid = fibonacci_sphere(2000, x)
    grid_best = objective._values(grid.expand(12, -1, -1), x).min(dim=1).values
    assert bool((objective(y_star, x) <= grid_best + 1e-5).all())
    # the validation set is not the start of the training stream
    train_x = torch.cat([b["x"] for b in train_batches(data)])
    assert not any(torch.equal(row, train_row) for row in x for train_row in train_x)


def test_validation_batches_cover_the_set_in_order(tmp_path):
    data = make_data(tmp_path, cache_dir="none", val_size=20, eval_batch_size=8)
    data.setup("validate")
    batches = list(data.val_dataloader())
    assert [b["x"].shape[0] for b in batches] == [8, 8, 4]
    full = data.fixed_set("val", 20, with_targets=False)["x"]
    torch.testing.assert_close(torch.cat([b["x"] for b in batches]), full, rtol=0, atol=0)


def test_references_are_cached_and_a_second_setup_does_not_solve(tmp_path):
    objective = CountingSphere()
    data = make_data(tmp_path, objective)
    data.prepare_data()
    data.setup("fit")
    assert objective.solved == [12, 10], "prepare_data solves val and test once; setup must read the cache"
    assert len(cache_files(tmp_path)) == 2
    first = data.fixed_set("val", 12)["y_star"]
    assert objective.solved == [12, 10]

    again = CountingSphere()
    second = make_data(tmp_path, again)
    second.setup("fit")
    assert again.solved == []
    torch.testing.assert_close(second._sets["val"]["y_star"], first, rtol=0, atol=0)


def test_cache_key_follows_what_determines_the_references(tmp_path):
    def key(temperature: float = 0.5, **kwargs) -> str:
        return make_data(tmp_path, CountingSphere(temperature), **kwargs).cache_key("val", kwargs.get("val_size", 12))

    base = key()
    assert base == key()
    for changed in (key(val_size=13), key(seed=1), key(temperature=0.25), key(alpha_scale=0.5)):
        assert changed != base
    # settings that do not change the contexts or their references keep the key
    assert key(batch_size=4, num_workers=2, eval_batch_size=3, cache_dir=str(tmp_path / "elsewhere")) == base
    assert make_data(tmp_path).cache_key("test", 12) != base


def test_a_changed_temperature_solves_again(tmp_path):
    make_data(tmp_path).setup("validate")
    objective = CountingSphere(temperature=0.25)
    make_data(tmp_path, objective).setup("validate")
    assert objective.solved == [12]
    assert len(cache_files(tmp_path)) == 2


def test_learnable_objectives_are_neither_solved_nor_cached(tmp_path):
    """References of an objective that learns go stale: evaluation refines predictions instead."""
    objective = LearnableSphere()
    data = make_data(tmp_path, objective)
    assert data.cache_key("val", 12) is None
    data.prepare_data()
    data.setup("validate")
    assert objective.solved == []
    assert cache_files(tmp_path) == []
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"x"}


@pytest.mark.parametrize(
    "content",
    [b"not a torch file", b"PK\x03\x04 truncated zip", {"other": 1}, {"y_star": torch.zeros(3, 3)}, [1, 2]],
    ids=["garbage", "truncated", "no-y_star", "wrong-size", "not-a-dict"],
)
def test_a_corrupted_cache_file_is_named_in_the_error(tmp_path, content):
    make_data(tmp_path).setup("validate")
    (path,) = cache_files(tmp_path)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(RuntimeError, match="delete the file") as info:
        make_data(tmp_path).setup("validate")
    assert str(path) in str(info.value)


# --- a fixed training pool ----------------------------------------------------------------------------


def test_pool_reshuffles_every_epoch_without_targets_for_an_objective_loss(tmp_path):
    objective = CountingSphere()
    data = make_data(tmp_path, objective, train_size=32)
    data.setup("fit")
    assert 32 not in objective.solved, "the pool was solved although the loss needs no targets"
    pool = data._sets["pool"]["x"]
    assert pool.shape == (32, 16)
    loader = data.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 4
        assert all(set(b) == {"x"} and b["x"].shape == (8, 16) for b in batches)
        epochs.append(torch.cat([b["x"] for b in batches]))
    for contexts in epochs:
        # every epoch is a permutation of the pool
        assert torch.equal(torch.sort(contexts, dim=0).values, torch.sort(pool, dim=0).values)
    assert not torch.equal(epochs[0], epochs[1]), "the pool was not reshuffled between epochs"
    assert not torch.equal(epochs[0], pool), "the pool was not shuffled"


def test_pool_batches_carry_matching_targets_when_the_loss_needs_them(tmp_path):
    objective = CountingSphere()
    data = make_data(tmp_path, objective, needs_target=True, train_size=16)
    data.setup("fit")
    assert 16 in objective.solved
    pool = data._sets["pool"]
    reference = {tuple(x.tolist()): y for x, y in zip(pool["x"], pool["y_star"], strict=True)}
    for batch in data.train_dataloader():
        assert set(batch) == {"x", "y_star"}
        assert batch["y_star"].shape == (8, 3)
        for x, y in zip(batch["x"], batch["y_star"], strict=True):
            torch.testing.assert_close(y, reference[tuple(x.tolist())], rtol=0, atol=0)


def test_regression_loss_without_a_pool_fails_before_training(tmp_path):
    model = AmortizedModule(CountingSphere(), FullyAmortized(MLP(16, 3, hidden=[8])), loss=RegressionLoss())
    data = SphereContexts(batch_size=8, batches_per_epoch=2, val_size=8, test_size=8, cache_dir=str(tmp_path))
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="train_size"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(batches_per_epoch=0), "batches_per_epoch must be at least 1"),
        (dict(val_size=0), "val_size must be at least 1"),
        (dict(eval_batch_size=-1), "eval_batch_size must be at least 1"),
        (dict(batch_size=16, train_size=8), "train_size=8 is smaller than batch_size=16"),
        (dict(num_workers=-1), "num_workers must be >= 0"),
        (dict(centres=0), "centres must be at least 1"),
    ],
)
def test_bad_sizes_raise_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SphereContexts(**kwargs)


def test_a_pool_too_small_for_the_ranks_is_reported(tmp_path):
    data = make_data(tmp_path, cache_dir="none", train_size=8)
    data.setup("fit")
    data.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than the 2 ranks"):
        data.train_dataloader()
