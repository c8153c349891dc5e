"""Labelled images as dict contexts ``{"image", "label"}`` for a classifier: the shared sampling of the held-out
splits and of training batches; a subclass says how its splits are read (:meth:`LabelledImages.load_splits`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from datamodules.context import ContextDataModule


class LabelledImages(ContextDataModule):
    """Contexts ``{"image": B x D, "label": B}`` drawn from fixed ``train``, ``val`` and ``test`` splits.

    Training batches are distinct images of ``train`` (the ``pool`` split too); ``val`` and ``test`` contexts are the
    first ``val_size`` / ``test_size`` images of their split, in a fixed order. Subclasses implement
    :meth:`load_splits` (read once, on first use) and name their items in :attr:`noun`.
    """

    noun = "images"
    """What one context is called in error messages (``"digits"``, ``"images"``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._splits_cache: Optional[dict[str, dict[str, Tensor]]] = None

    def load_splits(self) -> dict[str, dict[str, Tensor]]:
        """``{"train" | "val" | "test": {"image": N x D, "label": N}}``, read and split once."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_splits()")

    def split(self, name: str) -> dict[str, Tensor]:
        """The ``train``, ``val`` or ``test`` split as ``{"image", "label"}``, read on first use."""
        if self._splits_cache is None:
            self._splits_cache = self.load_splits()
        return self._splits_cache[name]

    def sample(self, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``num`` random training images, distinct within the batch: ``{"image": num x D, "label": num}``."""
        train = self.split("train")
        available = train["label"].shape[0]
        if num > available:
            raise ValueError(f"{type(self).__name__}: a batch of {num} {self.noun} exceeds the {available} training "
                             f"{self.noun}; lower data.init_args.batch_size")
        index = torch.randperm(available, generator=generator)[:num]
        return {"image": train["image"][index], "label": train["label"][index]}

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The first ``num`` held-out images of ``val`` or ``test`` (in a fixed order); training images for
        ``pool``."""
        if split == "pool":
            return self.sample(num, generator)
        held = self.split(split)
        if num > held["label"].shape[0]:
            raise ValueError(f"{type(self).__name__}: {split}_size={num} exceeds the {held['label'].shape[0]} held-out "
                             f"{split} {self.noun}; lower data.init_args.{split}_size")
        return {k: v[:num] for k, v in held.items()}
