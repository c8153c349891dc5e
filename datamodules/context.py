"""ContextDataModule: contexts x ~ p(x) in whole batches, with cached reference solutions."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.loader import BatchIndexSampler, ResumableLoader
from datamodules.preemptible import StopOnSigterm
from datamodules.reference_cache import ReferenceCache
from datamodules.stream import ContextStream, StreamLoader
from lightning_amor.certificates import nonfinite_rows
from lightning_amor.fingerprint import code_digest, tensor_digest
from lightning_amor.objective import Context, Objective, context_batch_size, context_index

_STREAMS = {"train": 0, "val": 1, "test": 2, "pool": 3, "predict": 4}
# Settings that do not change a fixed set's contexts (its own size enters the key separately).
_NOT_IN_KEY = ("batch_size", "eval_batch_size", "num_workers", "cache_dir", "batches_per_epoch", "train_size",
               "val_size", "test_size", "progress_bar", "stream")
PROGRESS_DELAY_S = 2.0
"""Seconds before the progress bar of solving reference solutions appears (short solves print nothing)."""


class NonFiniteDataError(ValueError):
    """Contexts drawn or loaded, or reference solutions solved or loaded, hold NaN or infinite numbers."""


def _runs(mask: Tensor) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of every run of ``True`` in a 1-d boolean ``mask``."""
    edges = torch.diff(torch.cat([torch.zeros(1), mask.float(), torch.zeros(1)])).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))


def default_cache_dir() -> Path:
    """``$LIGHTNING_AMOR_CACHE`` or ``~/.cache/lightning_amor``: where reference solutions are cached."""
    return Path(os.environ.get("LIGHTNING_AMOR_CACHE", Path.home() / ".cache" / "lightning_amor"))


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (well mixed, so nearby tuples give unrelated streams)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class _FreshBatches(Dataset):
    """Batch ``i`` is drawn from p(x) with a generator seeded by ``(seed, i)``: the same on every run, worker count
    and rank layout."""

    def __init__(self, module: ContextDataModule, batch_size: int, seed: int) -> None:
        self.module, self.batch_size, self.seed = module, batch_size, seed

    def __getitem__(self, index: int) -> dict[str, Context]:
        gen = seeded_generator(self.seed, _STREAMS["train"], index)
        x = self.module.sample(self.batch_size, gen)
        self.module.check_contexts(x, f"training batch {index}")
        return {"x": x}


class _FixedBatches(Dataset):
    """Batches of a fixed set of contexts (and reference solutions), reshuffled every epoch when ``shuffle``."""

    def __init__(self, data: dict[str, Context], batch_size: int, shuffle: bool, seed: int) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.size = context_batch_size(data["x"])
        self.per_epoch = self.size // batch_size if shuffle else -(-self.size // batch_size)

    def __getitem__(self, index: int) -> dict[str, Context]:
        epoch, chunk = divmod(index, self.per_epoch)
        if self.shuffle:
            order = torch.randperm(self.size, generator=seeded_generator(self.seed, _STREAMS["pool"], epoch))
            idx = order[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        else:
            idx = slice(chunk * self.batch_size, min((chunk + 1) * self.batch_size, self.size))
        return {k: context_index(v, idx) for k, v in self.data.items()}


class ContextDataModule(LightningDataModule):
    """Contexts x ~ p(x) for an amortizer, yielded as whole batches.

    Subclasses implement :meth:`sample`. Training draws fresh contexts every step (or, with
    ``train_size``, reshuffles a fixed pool each epoch); the validation and test sets are fixed and
    seeded, and their reference solutions y* come from the objective's oracle once and are cached
    on disk under a key of the configuration, so repeated runs do not solve them again. Training
    batches carry y* only when the loss needs them (a regression loss), which requires ``train_size``.

    Under DDP each rank gets distinct batches (a batch's contexts depend only on the seed and the
    batch's global index), so the effective batch size is ``batch_size × world size``.

    Args:
        batch_size: contexts per training batch (per rank).
        batches_per_epoch: training batches per epoch and rank when sampling fresh contexts.
        train_size: a fixed training pool of this many contexts (``None``: fresh contexts every step).
        val_size: contexts in the fixed validation set.
        test_size: contexts in the fixed test set.
        eval_batch_size: batch size for validation and test.
        seed: the seed of every stream (training, validation, test).
        num_workers: DataLoader worker processes.
        cache_dir: where reference solutions are cached (default :func:`default_cache_dir`);
            ``"none"`` disables the cache.
        progress_bar: show a progress bar (on rank 0, after :data:`PROGRESS_DELAY_S` seconds) while the oracle
            solves reference solutions.
        stream: draw training contexts from this :class:`~datamodules.stream.ContextStream` (a process with
            state, e.g. a replay buffer fed by an environment) instead of :meth:`sample`; its state is saved in
            every checkpoint. The validation and test sets still come from :meth:`sample_split`.
    """

    def __init__(
        self,
        batch_size: int = 256,
        batches_per_epoch: int = 100,
        train_size: Optional[int] = None,
        val_size: int = 1024,
        test_size: int = 1024,
        eval_batch_size: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        progress_bar: bool = True,
        stream: Optional[ContextStream] = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch),
                            ("val_size", val_size), ("test_size", test_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be at least 1, got {value}")
        if train_size is not None and train_size < batch_size:
            raise ValueError(
                f"{type(self).__name__}: train_size={train_size} is smaller than batch_size={batch_size}; "
                f"lower batch_size or raise train_size"
            )
        if num_workers < 0:
            raise ValueError(f"{type(self).__name__}: num_workers must be >= 0, got {num_workers}")
        if stream is not None and (train_size is not None or num_workers > 0):
            raise ValueError(
                f"{type(self).__name__}: a context stream draws every training batch itself, in the training process "
                f"(it may read the current model), so it takes neither a fixed pool nor workers; unset train_size "
                f"and set num_workers to 0"
            )
        # The stream is an object with state, not a setting: its state goes into checkpoints through the loader.
        self.save_hyperparameters(ignore=["stream"])
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.progress_bar = progress_bar
        self.stream = stream
        # (trainer, the training loader made for it): weak, so that the data module keeps no worker processes alive
        self._train_loader: Optional[tuple[object, weakref.ref]] = None
        self._objective: Optional[Objective] = None
        self._needs_target: Optional[bool] = None
        self._sets: dict[str, dict[str, Context]] = {}

    # --- what a subclass provides -------------------------------------------------------------
    def sample(self, num: int, generator: torch.Generator) -> Context:
        """Draw ``num`` contexts from p(x) with ``generator`` (a CPU generator); returns a batch of ``num``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(num, generator)")

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> Context:
        """Draw the ``num`` contexts of a fixed set: ``split`` is ``val``, ``test`` or ``pool`` (the training pool).

        Defaults to :meth:`sample`; a data module over a finite data set overrides it to draw the
        validation and test sets from held-out examples.
        """
        return self.sample(num, generator)

    # --- wiring -------------------------------------------------------------------------------
    def attach(self, objective: Objective, needs_target: bool = False) -> None:
        """Use ``objective`` for reference solutions (done automatically from the trainer's module)."""
        self._objective, self._needs_target = objective, needs_target

    @property
    def objective(self) -> Objective:
        """The objective whose oracle solves the reference solutions: the attached one, else the trainer's module's."""
        if self._objective is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if module is None or not hasattr(module, "objective"):
                raise RuntimeError(
                    f"{type(self).__name__} needs an objective for reference solutions: use it with a Trainer and an "
                    f"AmortizedModule, or call attach(objective) first"
                )
            return module.objective
        return self._objective

    @property
    def needs_target(self) -> bool:
        """Whether training batches must carry reference solutions (the module's loss is a regression)."""
        if self._needs_target is not None:
            return self._needs_target
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return bool(getattr(module, "needs_target", False))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    # --- fixed sets and their cache -----------------------------------------------------------
    def cache_key(self, split: str, size: int) -> Optional[str]:
        """A hash of everything that determines a fixed set's contexts and references (``None``: do not cache):
        the data module's class, code and settings, the split and its size, and the objective's
        :meth:`~lightning_amor.objective.Objective.cache_key` (its code and buffers included)."""
        objective_key = self.objective.cache_key()
        if objective_key is None or self.cache_dir == "none":
            return None
        config = {k: v for k, v in self.hparams.items() if k not in _NOT_IN_KEY}
        blob = json.dumps(
            {"data": f"{type(self).__module__}.{type(self).__qualname__}", "config": config, "split": split,
             "size": size, "objective": objective_key, "code": code_digest(type(self), ContextDataModule)},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def cache_file(self, split: str, size: Optional[int] = None) -> Optional[Path]:
        """The file that caches the reference solutions of ``split`` (``pool``, ``val`` or ``test``) with ``size``
        contexts (default: the configured size), whether or not it exists yet; ``None`` when that set is not
        cached (the cache is off, the objective learns, or there is no training pool)."""
        sizes = {"pool": self.train_size, "val": self.val_size, "test": self.test_size}
        if split not in sizes:
            raise ValueError(f"{type(self).__name__}.cache_file: split must be one of {sorted(sizes)}, got {split!r}")
        size = sizes[split] if size is None else size
        key = self.cache_key(split, size) if size is not None else None
        if key is None:
            return None
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return root / f"{type(self).__name__.lower()}-{key}.pt"

    def _refuse_nonfinite(self, what: str, rows: dict[int, str], fix: str) -> None:
        """Raise :class:`NonFiniteDataError` naming ``what`` and the first rows of ``rows`` (if any)."""
        if rows:
            shown = list(rows)[:10]
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            raise NonFiniteDataError(
                f"{type(self).__name__}: {what} hold NaN or infinite numbers in {len(rows)} rows {shown}{more}; {fix}"
            )

    def check_contexts(self, x: Context, where: str) -> None:
        """Refuse contexts with NaN or infinite numbers, naming this data module, ``where`` they come from and the
        rows (one ``isfinite`` test per tensor when all is well).

        Raises:
            NonFiniteDataError: some rows are not finite.
        """
        tensors = [x] if isinstance(x, Tensor) else list(x.values())
        if all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in tensors):
            return
        self._refuse_nonfinite(f"the contexts of {where}", nonfinite_rows(x),
                               f"fix {type(self).__name__}.sample (or its data) so that it draws finite contexts")

    def solve_references(self, x: Context, description: str = "reference solutions", split: str = "",
                         cache: Optional[ReferenceCache] = None) -> Tensor:
        """Reference solutions ``N x n`` of the objective's oracle for the contexts ``x`` of ``split``, solved in
        chunks of ``eval_batch_size`` (with a progress bar over them, see ``progress_bar``).

        With a ``cache``, each chunk is saved as soon as it is solved and the chunks an earlier, interrupted solve
        saved are not solved again; a SIGTERM stops the solve with exit status 75
        (:data:`~lightning_amor.preemption.PREEMPTED_EXIT_CODE`) keeping the chunks done. The oracle solves every
        context independently of the others (see :class:`~lightning_amor.solvers.MultiStart`), so the chunking
        does not change the answers.

        Raises:
            NonFiniteDataError: the oracle returned NaN or infinite solutions.
        """
        total = context_batch_size(x)
        solved = cache.chunks() if cache is not None else {}
        covered = torch.zeros(total, dtype=torch.bool)
        for first, part in solved.items():
            covered[first : first + len(part)] = True
        todo = [(start, min(start + self.eval_batch_size, stop)) for start, stop in _runs(~covered)
                for start in range(start, stop, self.eval_batch_size)]
        oracle = f"{type(self.objective).__name__}.solve"

        def kept() -> str:
            done = sum(len(part) for part in solved.values())
            if cache is None:
                return f"{done} of {total} {split} references solved, none kept (the cache is off)"
            return f"{done} of {total} {split} references solved and kept in {cache.partial}; rerun to continue"

        quiet = not self.progress_bar or self._rank_world()[0] != 0 or len(todo) < 2
        with StopOnSigterm(kept) as sigterm, tqdm(total=total, initial=int(covered.sum()), desc=description,
                                                  unit="contexts", delay=PROGRESS_DELAY_S, disable=quiet) as bar:
            for start, stop in todo:
                y = self.objective.solve_flat(context_index(x, slice(start, stop))).detach().cpu()
                rows = {start + row: reason for row, reason in nonfinite_rows(y).items()}
                self._refuse_nonfinite(f"the references that {oracle} returned for the {split} set", rows,
                                       f"fix the oracle {oracle}, or the contexts it fails on")
                with sigterm.critical():
                    if cache is not None:
                        cache.save_chunk(start, y)
                    solved[start] = y
                bar.update(stop - start)
        first = next(iter(solved.values()))
        y_star = first.new_empty((total, *first.shape[1:]))
        for start, part in solved.items():
            y_star[start : start + len(part)] = part
        return y_star

    def fixed_set(self, split: str, size: int, with_targets: bool = True) -> dict[str, Context]:
        """The seeded contexts of a split and, when asked, their reference solutions (from the cache if present).

        Raises:
            NonFiniteDataError: a context or a reference solution holds NaN or infinite numbers.
            RuntimeError: the cached references cannot be read or belong to other contexts.
        """
        x = self.sample_split(split, size, seeded_generator(self.seed, _STREAMS[split]))
        self.check_contexts(x, f"the {split} set")
        if not with_targets:
            return {"x": x}
        path = self.cache_file(split, size)
        cache = ReferenceCache(path, size, tensor_digest(x if isinstance(x, Tensor) else dict(x))) if path else None
        y_star = cache.load() if cache is not None else None
        if y_star is not None:
            self._refuse_nonfinite(f"the cached references {path} of the {split} set", nonfinite_rows(y_star),
                                   "delete the file to solve again")
            return {"x": x, "y_star": y_star}
        y_star = self.solve_references(x, f"{type(self).__name__}: solving the {split} references", split, cache)
        if cache is not None:
            cache.save(y_star)
        return {"x": x, "y_star": y_star}

    def _splits(self, stage: Optional[str]) -> list[tuple[str, int, bool]]:
        splits = []
        if stage in (None, "fit") and self.train_size is not None:
            splits.append(("pool", self.train_size, self.needs_target))
        # Evaluation sets carry y* only when it stays valid; objectives with learnable parameters (a VAE
        # decoder) are measured against a solver run from the prediction instead (AmortizedModule.refine).
        references = self.objective.references_fixed
        if stage in (None, "fit", "validate"):
            splits.append(("val", self.val_size, references))
        if stage in (None, "test"):
            splits.append(("test", self.test_size, references))
        if stage == "predict":
            splits.append(("test", self.test_size, False))
        return splits

    def prepare_data(self) -> None:
        """Solve and cache the fixed sets' references once per node (rank 0)."""
        for split, size, targets in self._splits(None if self.trainer is None else self.trainer.state.fn):
            if targets and self.cache_file(split, size) is not None:
                self.fixed_set(split, size)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the fixed sets of ``stage`` (the training pool, validation, test), loading or solving their references.

        Raises:
            ValueError: the loss needs reference solutions but there is no fixed pool (``train_size`` unset).
        """
        if self.needs_target and self.train_size is None and stage in (None, "fit"):
            raise ValueError(
                f"{type(self).__name__}: the loss needs reference solutions, which are solved once for a fixed pool: "
                f"set `data.init_args.train_size` (e.g. 8192) or use an objective-based loss"
            )
        for split, size, targets in self._splits(stage):
            if split not in self._sets or ("y_star" not in self._sets[split] and targets):
                self._sets[split] = self.fixed_set(split, size, targets)

    def _sampling_copy(self) -> ContextDataModule:
        """A shallow copy without the trainer, objective and fixed sets, cheap to send to DataLoader workers."""
        clone = copy.copy(self)
        clone.__dict__.update(trainer=None, _objective=None, _sets={}, _train_loader=None, stream=None)
        return clone

    def transfer_batch_to_device(self, batch: object, device: torch.device, dataloader_idx: int) -> object:
        """Move a batch to ``device`` (nothing to do on the CPU, where contexts are drawn)."""
        # Contexts are drawn on the CPU: on a CPU run there is nothing to move, so skip walking the batch.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- loaders -----------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, total: int, repeat_epochs: bool, sharded: bool = True,
                consumed: int = 0) -> DataLoader:
        rank, world = self._rank_world() if sharded else (0, 1)
        loader_class = ResumableLoader if repeat_epochs else DataLoader
        extra = {"consumed": consumed} if repeat_epochs else {}
        return loader_class(
            dataset,
            batch_size=None,
            sampler=BatchIndexSampler(total, rank, world, repeat_epochs),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # The loader's own generator seeds its iterators (and workers), so iterating a loader — a validation,
            # say — does not draw from the global generator that training's random numbers come from. The batches
            # themselves are seeded by their index.
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def _consumed_so_far(self) -> Optional[int]:
        """Training batches handed out by this trainer's previous training loader (``None``: start afresh).

        A loader reloaded during a fit (``reload_dataloaders_every_n_epochs``) continues where the previous one
        stopped; a new fit, or a loader made without a trainer, starts the stream from its beginning (a resumed
        fit then moves it on through the checkpointed state, see :class:`~datamodules.loader.ResumableLoader`).
        """
        if self.trainer is None or self._train_loader is None or self._train_loader[0] is not self.trainer:
            return None
        previous = self._train_loader[1]()
        return None if previous is None else previous.consumed

    def train_dataloader(self) -> Union[ResumableLoader, StreamLoader]:
        """Batches of ``batch_size`` training contexts (with ``y_star`` from the pool when the loss needs them),
        from the stream when there is one; a stateful loader whose position (and stream) checkpoints keep."""
        rank, world = self._rank_world()
        consumed = self._consumed_so_far()
        if self.stream is not None:
            if consumed is None:
                self.stream.setup(self.seed, rank, world)
            module = (lambda: self.trainer.lightning_module) if self.trainer is not None else (lambda: None)
            loader = StreamLoader(self.stream, self.batch_size, self.batches_per_epoch, module, consumed or 0)
        elif self.train_size is None:
            dataset = _FreshBatches(self._sampling_copy(), self.batch_size, self.seed)
            loader = self._loader(dataset, self.batches_per_epoch * world, True, consumed=consumed or 0)
        else:
            pool = self._sets["pool"]
            dataset = _FixedBatches(pool, self.batch_size, shuffle=True, seed=self.seed)
            if dataset.per_epoch < world:
                raise ValueError(
                    f"{type(self).__name__}: train_size={self.train_size} gives {dataset.per_epoch} batches of "
                    f"{self.batch_size}, fewer than the {world} ranks; raise train_size or lower batch_size"
                )
            total = dataset.per_epoch - dataset.per_epoch % world
            loader = self._loader(dataset, total, True, consumed=consumed or 0)
        self._train_loader = (self.trainer, weakref.ref(loader))
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        # Each rank evaluates every world-th context, so every rank has work and the metrics' sums over
        # ranks cover each context exactly once.
        rank, world = self._rank_world()
        data = self._sets[split]
        if context_batch_size(data["x"]) < world:
            raise ValueError(
                f"{type(self).__name__}: the {split} set has {context_batch_size(data['x'])} contexts, fewer than the "
                f"{world} ranks; raise {split}_size"
            )
        shard = {k: context_index(v, slice(rank, None, world)) for k, v in data.items()}
        dataset = _FixedBatches(shard, self.eval_batch_size, shuffle=False, seed=self.seed)
        return self._loader(dataset, dataset.per_epoch, False, sharded=False)

    def val_dataloader(self) -> DataLoader:
        """The fixed validation set in batches of ``eval_batch_size``, with reference solutions when they are fixed."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The fixed test set in batches of ``eval_batch_size``, with reference solutions when they are fixed."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The contexts of the fixed test set, in batches of ``eval_batch_size``."""
        return self._eval_loader("test")
