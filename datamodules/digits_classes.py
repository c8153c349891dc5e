"""scikit-learn's bundled 8×8 digits with their labels, as dict contexts for a classifier (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.context import seeded_generator
from datamodules.labelled import LabelledImages


class DigitsClasses(LabelledImages):
    """Contexts ``{"image": B x 64, "label": B}``: the 1797 digits (grey levels 0..16 over 16, flattened) and their
    classes 0..9 (int64).

    The validation (``val_size``) and test (``test_size``) digits are held out from the 1797 by a fixed permutation
    (``split_seed``, independent of ``seed``); training batches are drawn without replacement within a batch from
    the others. The label travels with the image so that a task loss (a classifier's cross-entropy) can be computed
    from the context alone.

    With ``shift``, a share ``shift_share`` of every training batch is moved by a random whole-pixel shift of at most
    ``shift`` pixels in each direction (the pixels moved in are blank), so a model sees many more distinct inputs than
    the 1029 or so training digits; the shift comes before :class:`~datamodules.labelled.LabelledImages`' mixing and
    noise. Moved digits are marked in ``"augmented"`` (``B`` bool) like those, so a loss can tell them apart (a DEQ's
    task loss skips them; its initializer learns from all). Validation and test digits are never moved.

    Args:
        val_size: validation digits.
        test_size: test digits (the held-out inputs of ``benchmarks/deq.py``).
        split_seed: the seed of the held-out permutation.
        shift: the largest shift of a training digit in pixels (0: none).
        shift_share: the share of each training batch that is shifted (with ``shift``).
        **kwargs: the :class:`~datamodules.labelled.LabelledImages` arguments (``mix_share``, ``noise``,
            ``noise_share``) and the :class:`~datamodules.context.ContextDataModule` ones.
    """

    noun = "digits"

    def __init__(self, val_size: int = 256, test_size: int = 512, split_seed: int = 0, shift: int = 0,
                 shift_share: float = 1.0, **kwargs) -> None:
        super().__init__(val_size=val_size, test_size=test_size, **kwargs)
        if int(shift) != shift or not 0 <= shift < 8:
            raise ValueError(f"DigitsClasses: shift must be a whole number of pixels from 0 to 7, got {shift}")
        if not 0.0 <= shift_share <= 1.0:
            raise ValueError(f"DigitsClasses: shift_share must lie in [0, 1], got {shift_share}")
        self.split_seed = split_seed
        self.shift = int(shift)
        self.shift_share = float(shift_share)

    def load_digits(self) -> tuple[Tensor, Tensor]:
        """All digits ``1797 x 64`` in [0, 1] and their labels ``1797`` (int64)."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "DigitsClasses needs scikit-learn (its bundled digits data set): pip install scikit-learn, or "
                "install lightning-amor with the `apps` extra"
            ) from err
        digits = load_digits()
        images = torch.as_tensor(digits.data / 16.0, dtype=torch.get_default_dtype())
        return images, torch.as_tensor(digits.target, dtype=torch.int64)

    def load_splits(self) -> dict[str, dict[str, Tensor]]:
        """The digits held out by the fixed permutation of ``split_seed``: ``{"train" | "val" | "test": {"image",
        "label"}}``."""
        images, labels = self.load_digits()
        holdout = self.val_size + self.test_size
        if holdout >= images.shape[0]:
            raise ValueError(
                f"DigitsClasses: val_size={self.val_size} + test_size={self.test_size} held-out digits leave none "
                f"of the {images.shape[0]} to train on; lower the held-out sizes"
            )
        order = torch.randperm(images.shape[0], generator=seeded_generator(self.split_seed, 0xD161))
        parts = {"val": order[: self.val_size], "test": order[self.val_size : holdout], "train": order[holdout:]}
        return {k: {"image": images[i], "label": labels[i]} for k, i in parts.items()}

    def augment(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """A share of the training digits ``{"image": B x 64, "label": B}`` shifted, then mixed and noised
        (:meth:`LabelledImages.augment`), with ``"augmented"`` (``B`` bool) when any augmentation is on."""
        if self.shift:
            num = batch["image"].shape[0]
            offsets = torch.randint(-self.shift, self.shift + 1, (num, 2), generator=generator)
            moved = torch.rand(num, generator=generator) < self.shift_share
            image = torch.where(moved[:, None], shifted(batch["image"], offsets), batch["image"])
            batch = {**batch, "image": image, "augmented": moved}
        return super().augment(batch, generator)


def shifted(images: Tensor, offsets: Tensor) -> Tensor:
    """8×8 digits ``B x 64`` each moved by its whole-pixel offset ``(down, right)`` (``B x 2`` ints), blank pixels
    moved in: ``B x 64``."""
    grid = images.reshape(-1, 8, 8)
    padded = torch.nn.functional.pad(grid, (7, 7, 7, 7))
    rows = torch.arange(8)
    top = 7 - offsets[:, 0]
    left = 7 - offsets[:, 1]
    index_rows = (top[:, None] + rows)[:, :, None].expand(-1, 8, 8)
    index_cols = (left[:, None] + rows)[:, None, :].expand(-1, 8, 8)
    batch = torch.arange(grid.shape[0])[:, None, None]
    return padded[batch, index_rows, index_cols].reshape(-1, 64)
