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

    Training batches can be augmented, to give a model that needs no label (an initializer learning a function of the
    image, such as a DEQ's fixed point) many more distinct inputs than the training split holds:

    - ``mix_share``: that share of each batch is replaced by mixtures λ x + (1 − λ) x' of the image with another
      training image x', λ ~ U(0, 1) per image;
    - ``noise``: Gaussian noise of that standard deviation is added to a share ``noise_share`` of each batch (after
      mixing; the two shares are drawn independently).

    An augmented batch carries ``"augmented"`` (``B`` bool): such images have no true label, so a task loss must
    skip them (a DEQ's does; its initializer learns from all). Validation and test images are never augmented and
    carry no such entry. Everything is drawn from the batch's generator, so batches stay reproducible.

    Args:
        mix_share: the share of each training batch replaced by mixtures of two training images (0: none).
        noise: the standard deviation of the added noise (0: none).
        noise_share: the share of each training batch that gets noise (with ``noise``).
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    noun = "images"
    """What one context is called in error messages (``"digits"``, ``"images"``)."""

    def __init__(self, mix_share: float = 0.0, noise: float = 0.0, noise_share: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        for label, share in (("mix_share", mix_share), ("noise_share", noise_share)):
            if not 0.0 <= share <= 1.0:  # also catches NaN
                raise ValueError(f"{name}: {label} must lie in [0, 1] (a share of each training batch), got {share}")
        if not 0.0 <= noise < float("inf"):
            raise ValueError(f"{name}: noise must be a finite standard deviation ≥ 0 (0: none), got {noise}")
        self.mix_share, self.noise, self.noise_share = float(mix_share), float(noise), float(noise_share)
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
        return self.augment({"image": train["image"][index], "label": train["label"][index]}, generator)

    def augment(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The training ``batch`` (``{"image": B x D, "label": B}``) with a share mixed and a share noised, and
        ``"augmented"`` (``B`` bool) marking them; unchanged without ``mix_share`` and ``noise``. Subclasses add their
        own augmentations here (and OR them into ``"augmented"``)."""
        if not self.mix_share and not self.noise:
            return batch
        image = batch["image"]
        num = image.shape[0]
        augmented = batch.get("augmented", torch.zeros(num, dtype=torch.bool))
        if self.mix_share:
            train = self.split("train")["image"]
            other = train[torch.randint(train.shape[0], (num,), generator=generator)].reshape(image.shape)
            weight = torch.rand(num, generator=generator, dtype=image.dtype).reshape(-1, *[1] * (image.dim() - 1))
            mixed = torch.rand(num, generator=generator) < self.mix_share
            image = torch.where(mixed.reshape(weight.shape), weight * image + (1 - weight) * other, image)
            augmented = augmented | mixed
        if self.noise:
            draws = torch.randn(image.shape, generator=generator, dtype=image.dtype)
            noised = torch.rand(num, generator=generator) < self.noise_share
            image = torch.where(noised.reshape(-1, *[1] * (image.dim() - 1)), image + self.noise * draws, image)
            augmented = augmented | noised
        return {**batch, "image": image, "augmented": augmented}

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
