"""LightningDataModules, one per context distribution p(x)."""

from datamodules.context import ContextDataModule
from datamodules.sphere import SphereContexts

__all__ = ["ContextDataModule", "SphereContexts"]
