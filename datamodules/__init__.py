"""LightningDataModules, one per context distribution p(x)."""

from datamodules.context import ContextDataModule
from datamodules.images import DigitsImages, ImageDataModule, MNISTImages
from datamodules.sphere import SphereContexts

__all__ = ["ContextDataModule", "DigitsImages", "ImageDataModule", "MNISTImages", "SphereContexts"]
