"""LightningDataModules, one per context distribution p(x)."""

from datamodules.binarized import BinarizedFashionMNIST
from datamodules.context import ContextDataModule
from datamodules.digits_classes import DigitsClasses
from datamodules.fashion_classes import FashionClasses
from datamodules.fashion_mnist import FashionMNISTImages, fashion_mnist_folder
from datamodules.few_shot_digits import FewShotDigits
from datamodules.gym_replay import GymReplayData, GymReplayStream
from datamodules.images import DigitsImages, ImageDataModule, MNISTImages
from datamodules.loader import BatchIndexSampler, ResumableLoader
from datamodules.meta_ot import ImagePairs
from datamodules.pendulum_states import PendulumStates
from datamodules.replay import ReplayBuffer
from datamodules.sinusoid import SinusoidTasks
from datamodules.sparse_coding import SparseSignals
from datamodules.sphere import SphereContexts
from datamodules.stream import ContextStream, StreamLoader

__all__ = [
    "BatchIndexSampler", "BinarizedFashionMNIST", "ContextDataModule", "ContextStream", "DigitsClasses",
    "DigitsImages", "FashionClasses", "FashionMNISTImages", "FewShotDigits", "GymReplayData", "GymReplayStream",
    "ImageDataModule", "ImagePairs", "MNISTImages", "PendulumStates", "ReplayBuffer", "ResumableLoader",
    "SinusoidTasks", "SparseSignals", "SphereContexts", "StreamLoader", "fashion_mnist_folder",
]
# PortfolioReturns (datamodules.convex_qp) is not imported here: it needs the `apps` extra (osqp).


def __getattr__(name: str) -> object:
    """A name this package lacks: the error also names another ``datamodules`` package that this one hides."""
    if name.startswith("__"):
        raise AttributeError(f"module 'datamodules' has no attribute '{name}'")
    from lightning_amor.datamodules_guard import missing_name_error

    raise missing_name_error(name)
