"""p(T) of few-shot classification: N-way K-shot tasks over scikit-learn's bundled 8×8 digits, with held-out classes.

A task picks N classes, gives them the labels 0..N−1 in a random order, and draws K support and ``query`` query
images of each (without replacement). Training tasks come from the meta-training classes only; the validation and
test tasks from the held-out classes, which training never sees (the held-out images are split in two, so the
validation and test tasks share no image).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from datamodules.context import ContextDataModule, seeded_generator


class FewShotDigits(ContextDataModule):
    """N-way K-shot classification tasks of 8×8 digits as contexts.

    Each context is one task, a dict of ``support_x`` (``B x N·K x 64``, grey levels in [0, 1]), ``support_y``
    (``B x N·K`` labels in 0..N−1), ``query_x`` (``B x N·query x 64``) and ``query_y``.

    Args:
        ways: N, the classes per task.
        shots: K, the support images per class.
        query: the query images per class.
        train_classes: the digits of the meta-training tasks.
        test_classes: the held-out digits of the validation and test tasks (at least ``ways`` of them).
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self,
        ways: int = 3,
        shots: int = 5,
        query: int = 5,
        train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5, 6),
        test_classes: Sequence[int] = (7, 8, 9),
        **kwargs,
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("query", query)):
            if int(value) != value or value < 1:
                raise ValueError(f"FewShotDigits: {name} must be a positive integer, got {value}")
        train, test = [int(c) for c in train_classes], [int(c) for c in test_classes]
        if set(train) & set(test):
            raise ValueError(f"FewShotDigits: the held-out classes {sorted(set(train) & set(test))} are also "
                             f"meta-training classes; give disjoint train_classes and test_classes")
        if any(not 0 <= c <= 9 for c in train + test):
            raise ValueError(f"FewShotDigits: classes are digits 0..9, got {train} and {test}")
        if len(set(train)) < ways or len(set(test)) < ways:
            raise ValueError(f"FewShotDigits: a {ways}-way task needs at least {ways} classes in both train_classes "
                             f"({train}) and test_classes ({test}); lower ways or give more classes")
        super().__init__(**kwargs)
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.train_classes, self.test_classes = sorted(set(train)), sorted(set(test))
        self._images: Optional[dict[str, dict[int, Tensor]]] = None

    def _pools(self) -> dict[str, dict[int, Tensor]]:
        """The images of every class, per split: ``train`` (meta-training classes), ``val`` and ``test`` (the two
        halves of each held-out class, by a fixed shuffle)."""
        if self._images is None:
            try:
                from sklearn.datasets import load_digits
            except ImportError as err:
                raise ImportError("FewShotDigits needs scikit-learn (its bundled digits data set): pip install "
                                  "scikit-learn, or install lightning-amor with the `apps` extra") from err
            data = load_digits()
            images = torch.as_tensor(data.data / 16.0, dtype=torch.get_default_dtype())
            labels = torch.as_tensor(data.target)
            pools: dict[str, dict[int, Tensor]] = {"train": {}, "val": {}, "test": {}}
            need = self.shots + self.query
            for c in self.train_classes:
                pools["train"][c] = images[labels == c]
            for c in self.test_classes:
                own = images[labels == c]
                own = own[torch.randperm(len(own), generator=seeded_generator(c, 7919))]
                half = len(own) // 2
                pools["val"][c], pools["test"][c] = own[:half], own[half:]
            for split, pool in pools.items():
                for c, imgs in pool.items():
                    if len(imgs) < need:
                        raise ValueError(f"FewShotDigits: the {split} images of digit {c} are {len(imgs)}, fewer than "
                                         f"shots + query = {need}; lower shots or query")
            self._images = pools
        return self._images

    def tasks(self, num: int, split: str, generator: torch.Generator) -> dict[str, Tensor]:
        """``num`` tasks from the classes of ``split`` (``train``, ``val`` or ``test``)."""
        pool = self._pools()[split]
        classes = list(pool)
        support_x, support_y, query_x, query_y = [], [], [], []
        for _ in range(num):
            chosen = torch.randperm(len(classes), generator=generator)[: self.ways].tolist()
            sx, sy, qx, qy = [], [], [], []
            for label, index in enumerate(chosen):
                imgs = pool[classes[index]]
                picked = imgs[torch.randperm(len(imgs), generator=generator)[: self.shots + self.query]]
                sx.append(picked[: self.shots])
                qx.append(picked[self.shots :])
                sy.append(torch.full((self.shots,), label))
                qy.append(torch.full((self.query,), label))
            support_x.append(torch.cat(sx))
            support_y.append(torch.cat(sy))
            query_x.append(torch.cat(qx))
            query_y.append(torch.cat(qy))
        return {"support_x": torch.stack(support_x), "support_y": torch.stack(support_y),
                "query_x": torch.stack(query_x), "query_y": torch.stack(query_y)}

    def sample(self, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``num`` training tasks from the meta-training classes."""
        return self.tasks(num, "train", generator)

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The fixed validation or test tasks, from the held-out classes (a training pool: meta-training ones)."""
        return self.tasks(num, "train" if split == "pool" else split, generator)
