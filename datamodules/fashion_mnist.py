"""Fashion-MNIST (Xiao et al. 2017, 28×28 grey images of clothes) read from Debian's ``dataset-fashion-mnist``.

The Debian package installs the four gzipped IDX files under ``/usr/share/datasets/fashion-mnist/`` with the MNIST
file names (``train-images-idx3-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and the labels), so every MNIST reader
reads them. :func:`fashion_mnist_folder` finds that folder (or a folder given explicitly, or
``$FASHION_MNIST_DIR``) and otherwise raises one error that says how to install it;
:func:`load_fashion_mnist` returns the images; :class:`FashionMNISTImages` is the image data module (any
application that takes images as contexts: a VAE, Meta OT's pairs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.images import MNIST_FILES, IDXFormatError, MNISTImages, read_idx

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the files."""

ENVIRONMENT_VARIABLE = "FASHION_MNIST_DIR"
"""A folder with the files, looked at before :data:`DEBIAN_FOLDER`."""

INSTALL_HINT = "apt-get install dataset-fashion-mnist"

FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
"""The authors' public mirror (same file names as MNIST), for ``download: true``."""


class FashionMNISTNotFound(FileNotFoundError):
    """No folder with the Fashion-MNIST image files was found."""


def _has_images(folder: Path) -> bool:
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in MNIST_FILES.values())


def fashion_mnist_folder(root: Optional[str | os.PathLike] = None) -> Path:
    """The folder that holds the Fashion-MNIST image files (plain or ``.gz`` IDX).

    ``root`` when given; otherwise ``$FASHION_MNIST_DIR`` when set, else :data:`DEBIAN_FOLDER`.

    Raises:
        FashionMNISTNotFound: the folder does not exist or lacks the image files; the message names the folder and
            the install command (``apt-get install dataset-fashion-mnist``).
    """
    if root is not None:
        folder, origin = Path(root), "the given folder"
    elif os.environ.get(ENVIRONMENT_VARIABLE):
        folder, origin = Path(os.environ[ENVIRONMENT_VARIABLE]), f"${ENVIRONMENT_VARIABLE}"
    else:
        folder, origin = DEBIAN_FOLDER, "Debian's package folder"
    if folder.is_dir() and _has_images(folder):
        return folder
    state = "does not exist" if not folder.is_dir() else "lacks the image files"
    names = " and ".join(f"{name}.gz" for name in MNIST_FILES.values())
    raise FashionMNISTNotFound(
        f"Fashion-MNIST: {origin} {folder} {state} (it must hold {names}). Install the data set with "
        f"`{INSTALL_HINT}` (it puts the files in {DEBIAN_FOLDER}), or point root (or ${ENVIRONMENT_VARIABLE}) at a "
        f"folder that has them"
    )


def load_fashion_mnist(root: Optional[str | os.PathLike] = None, split: str = "train") -> Tensor:
    """The ``N x 28 x 28`` images of ``split`` (``train``: 60000, ``test``: 10000) as floats in [0, 1].

    Raises:
        FashionMNISTNotFound: see :func:`fashion_mnist_folder`.
        IDXFormatError: a file is not an ``N x H x W`` IDX image file.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"load_fashion_mnist: split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    folder = fashion_mnist_folder(root)
    name = MNIST_FILES[split]
    path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
    array = read_idx(path)
    if array.ndim != 3:
        raise IDXFormatError(f"{path}: expected images N x H x W, got shape {array.shape}")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.as_tensor(array.astype(np.float32) / scale)


class FashionMNISTImages(MNISTImages):
    """Fashion-MNIST images (``1 x 28 x 28`` in [0, 1]) as contexts: 60000 training and 10000 test images.

    As :class:`~datamodules.images.MNISTImages`, but ``root`` defaults to the folder :func:`fashion_mnist_folder`
    finds, and ``download`` fetches from the authors' mirror.

    Args:
        root: the folder with the IDX files (``None``: ``$FASHION_MNIST_DIR`` or Debian's folder).
        download: fetch missing files into ``root`` (which must then be given; needs network access).
        **kwargs: the :class:`~datamodules.images.MNISTImages` arguments.
    """

    def __init__(
        self, root: Optional[str] = None, download: bool = False, mirrors: Sequence[str] = FASHION_MNIST_MIRRORS,
        **kwargs,
    ) -> None:
        if root is None:
            if download:
                raise ValueError("FashionMNISTImages: download: true needs a root folder to download into")
            root = str(fashion_mnist_folder())
        super().__init__(root=root, download=download, mirrors=mirrors, **kwargs)

    def load_images(self) -> tuple[Tensor, Tensor]:
        """The training and test images, ``N x 28 x 28`` in [0, 1]."""
        if self.download and self.missing_files():
            self.fetch()
        return load_fashion_mnist(self.root, "train"), load_fashion_mnist(self.root, "test")
