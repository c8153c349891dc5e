"""p(x) of the sphere problem (tutorial §4.3): random centres on S² and offsets."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.context import ContextDataModule


class SphereContexts(ContextDataModule):
    """Contexts ``x = (z_1, …, z_m, α_1, …, α_m)`` of size ``4m``: centres z_i uniform on S² and
    offsets α_i = ``alpha_scale`` · U[0, 1), as the tutorial's reference code (m = 4, scale 0.7).

    Args:
        centres: m, the number of centres.
        alpha_scale: the scale of the uniform offsets.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(self, centres: int = 4, alpha_scale: float = 0.7, **kwargs) -> None:
        if centres < 1:
            raise ValueError(f"SphereContexts: centres must be at least 1, got {centres}")
        super().__init__(**kwargs)
        self.centres = centres
        self.alpha_scale = alpha_scale

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num x 4m`` contexts."""
        z = torch.randn(num, self.centres, 3, generator=generator)
        z = z / z.norm(dim=-1, keepdim=True)
        alpha = self.alpha_scale * torch.rand(num, self.centres, generator=generator)
        return torch.cat([z.flatten(1), alpha], dim=1)
