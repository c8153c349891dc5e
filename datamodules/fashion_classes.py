"""Fashion-MNIST images with their labels, as dict contexts for a classifier (``recipes/deq/deq_fashion.yaml``).

The images come from :func:`datamodules.fashion_mnist.load_fashion_mnist` (Debian's ``dataset-fashion-mnist``, a
folder given as ``root`` or ``$FASHION_MNIST_DIR``); the labels from the two IDX label files next to them
(``train-labels-idx1-ubyte`` and ``t10k-labels-idx1-ubyte``, plain or ``.gz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from datamodules.context import seeded_generator
from datamodules.fashion_mnist import INSTALL_HINT, FashionMNISTNotFound, fashion_mnist_folder, load_fashion_mnist
from datamodules.images import IDXFormatError, read_idx
from datamodules.labelled import LabelledImages

LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
"""The Fashion-MNIST label files (each may also be gzip-compressed, with ``.gz`` appended)."""

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
"""The ten classes, in label order."""


def load_fashion_labels(root: Optional[str | Path] = None, split: str = "train") -> Tensor:
    """The labels of ``split`` (``train``: 60000, ``test``: 10000) as int64 class indices 0..9.

    Raises:
        FashionMNISTNotFound: the folder (see :func:`~datamodules.fashion_mnist.fashion_mnist_folder`) lacks the label
            file; the message names it and the install command.
        IDXFormatError: the file is not a vector of class indices 0..9.
    """
    if split not in LABEL_FILES:
        raise ValueError(f"load_fashion_labels: split must be one of {sorted(LABEL_FILES)}, got {split!r}")
    folder = fashion_mnist_folder(root)
    name = LABEL_FILES[split]
    candidates = [folder / name, folder / f"{name}.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FashionMNISTNotFound(
            f"Fashion-MNIST: {folder} has the images but not the labels {name}.gz (a classifier needs them). Install "
            f"the whole data set with `{INSTALL_HINT}`, or put the four IDX files (images and labels of train and "
            f"t10k) in one folder and point root at it"
        )
    array = read_idx(path)
    if array.ndim != 1 or array.size and (int(array.min()) < 0 or int(array.max()) > 9):
        raise IDXFormatError(f"{path}: expected a vector of class indices 0..9, got shape {array.shape}")
    return torch.as_tensor(array.astype(np.int64))


class FashionClasses(LabelledImages):
    """Contexts ``{"image": B x 784, "label": B}``: Fashion-MNIST's 28×28 images (flattened, in [0, 1]) and their
    classes 0..9 (int64).

    The validation images (``val_size``) are held out from the 60000 training images by a fixed permutation
    (``split_seed``, independent of ``seed``); the test images are the first ``test_size`` of the 10000 of the t10k
    file, in its order. Training batches are drawn from the rest, distinct within a batch.

    Args:
        root: the folder with the four IDX files (``None``: ``$FASHION_MNIST_DIR`` or Debian's folder).
        download: must stay ``False``: the labels are read from local files only (install the Debian package).
        val_size: validation images.
        test_size: test images (the held-out inputs of ``benchmarks/deq.py``), at most 10000.
        split_seed: the seed of the validation permutation.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, val_size: int = 1000,
                 test_size: int = 1000, split_seed: int = 0, **kwargs) -> None:
        super().__init__(val_size=val_size, test_size=test_size, **kwargs)
        if download:
            raise ValueError(f"FashionClasses reads the images and labels from local files only; set download: false "
                             f"and install them with `{INSTALL_HINT}` (or point root at a folder that has them)")
        self.root = root
        self.download = False
        self.split_seed = split_seed

    def load_splits(self) -> dict[str, dict[str, Tensor]]:
        """The ``train``, ``val`` and ``test`` images as ``{"image": N x 784, "label": N}``."""
        parts = {}
        for source in ("train", "test"):
            images = load_fashion_mnist(self.root, source)
            labels = load_fashion_labels(self.root, source)
            if labels.shape[0] != images.shape[0]:
                raise IDXFormatError(f"Fashion-MNIST {source}: {images.shape[0]} images but {labels.shape[0]} "
                                     f"labels; the files do not belong together")
            parts[source] = (images.reshape(images.shape[0], -1).to(torch.get_default_dtype()), labels)
        images, labels = parts["train"]
        if self.val_size >= images.shape[0]:
            raise ValueError(f"FashionClasses: val_size={self.val_size} leaves none of the {images.shape[0]} "
                             f"training images to train on; lower val_size")
        if self.test_size > parts["test"][0].shape[0]:
            raise ValueError(f"FashionClasses: test_size={self.test_size} exceeds the {parts['test'][0].shape[0]} "
                             f"test images; lower data.init_args.test_size")
        order = torch.randperm(images.shape[0], generator=seeded_generator(self.split_seed, 0xFA5))
        held, kept = order[: self.val_size], order[self.val_size :]
        return {
            "train": {"image": images[kept], "label": labels[kept]},
            "val": {"image": images[held], "label": labels[held]},
            "test": {"image": parts["test"][0][: self.test_size], "label": parts["test"][1][: self.test_size]},
        }
