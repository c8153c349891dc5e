"""LightningDataModules, one per context distribution p(x)."""

from datamodules.context import ContextDataModule
from datamodules.images import DigitsImages, ImageDataModule, MNISTImages
from datamodules.loader import BatchIndexSampler, ResumableLoader
from datamodules.replay import ReplayBuffer
from datamodules.sphere import SphereContexts
from datamodules.stream import ContextStream, StreamLoader

__all__ = [
    "BatchIndexSampler", "ContextDataModule", "ContextStream", "DigitsImages", "ImageDataModule", "MNISTImages",
    "ReplayBuffer", "ResumableLoader", "SphereContexts", "StreamLoader",
]


def __getattr__(name: str) -> object:
    """A name this package lacks: the error also names another ``datamodules`` package that this one hides."""
    if name.startswith("__"):
        raise AttributeError(f"module 'datamodules' has no attribute '{name}'")
    from lightning_amor.datamodules_guard import missing_name_error

    raise missing_name_error(name)
