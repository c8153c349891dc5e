"""Fashion-MNIST from Debian's layout: finding the folder (or one clear error with the install hint) and reading the
gzipped IDX files, on small generated files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import fashion_mnist
from datamodules.fashion_mnist import (
    FashionMNISTImages,
    FashionMNISTNotFound,
    fashion_mnist_folder,
    load_fashion_mnist,
)
from datamodules.images import IDXFormatError, write_idx

LAYOUT = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
          "t10k-labels-idx1-ubyte.gz")


def debian_layout(folder, train: int = 30, test: int = 12):
    """The four gzipped IDX files of Debian's package, with ``train`` and ``test`` images of known pixels."""
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8)}
    for split, array in images.items():
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", array)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, len(array), dtype=np.uint8))
    return images


@pytest.fixture
def no_default(monkeypatch, tmp_path):
    """Neither $FASHION_MNIST_DIR nor Debian's folder (pointed at an empty temporary path)."""
    monkeypatch.delenv(fashion_mnist.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "not-installed")


def test_a_missing_folder_is_one_error_with_the_install_hint(no_default, tmp_path):
    with pytest.raises(FashionMNISTNotFound, match=r"Debian's package folder .*not-installed does not exist.*"
                       r"`apt-get install dataset-fashion-mnist`"):
        fashion_mnist_folder()
    with pytest.raises(FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTImages()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FashionMNISTNotFound, match=r"the given folder .*empty lacks the image files"):
        fashion_mnist_folder(empty)


def test_the_folder_is_found_given_by_the_environment_or_debians(no_default, tmp_path, monkeypatch):
    given = tmp_path / "given"
    debian_layout(given)
    assert fashion_mnist_folder(given) == given
    monkeypatch.setenv(fashion_mnist.ENVIRONMENT_VARIABLE, str(given))
    assert fashion_mnist_folder() == given
    monkeypatch.delenv(fashion_mnist.ENVIRONMENT_VARIABLE)
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    debian_layout(debian)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", debian)
    assert fashion_mnist_folder() == debian


def test_reading_the_debian_layout(tmp_path):
    images = debian_layout(tmp_path)
    train, test = load_fashion_mnist(tmp_path, "train"), load_fashion_mnist(tmp_path, "test")
    assert train.shape == (30, 28, 28) and test.shape == (12, 28, 28)
    torch.testing.assert_close(train, torch.as_tensor(images["train"] / 255.0, dtype=torch.float32))
    torch.testing.assert_close(test, torch.as_tensor(images["t10k"] / 255.0, dtype=torch.float32))
    data = FashionMNISTImages(root=str(tmp_path), val_size=10, test_size=12, batch_size=4)
    assert data.images("train").shape == (20, 1, 28, 28) and data.images("test").shape == (12, 1, 28, 28)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist(tmp_path, "validation")


def test_a_labels_file_in_place_of_images_is_refused(tmp_path):
    debian_layout(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match=r"expected images N x H x W, got shape \(5,\)"):
        load_fashion_mnist(tmp_path, "test")


def test_download_needs_a_folder(no_default):
    with pytest.raises(ValueError, match="download: true needs a root folder"):
        FashionMNISTImages(download=True)
