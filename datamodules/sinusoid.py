"""p(T) of sinusoid regression (Finn et al. 2017): tasks y = A sin(x + φ), a support set and a query set each."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from datamodules.context import ContextDataModule


class SinusoidTasks(ContextDataModule):
    """Sinusoid regression tasks as contexts: amplitude A ~ U[0.1, 5], phase φ ~ U[0, π], inputs x ~ U[−5, 5].

    Each context is one task, a dict of ``support_x``, ``support_y`` (``B x shots x 1``), ``query_x`` and
    ``query_y`` (``B x query x 1``; the fixed validation and test tasks have ``eval_query`` query points, so the
    held-out score is precise). Training draws fresh tasks from p(T) every batch (a meta-batch of ``batch_size``
    tasks); the validation and test sets are fixed, seeded task sets that training never sees.

    Args:
        shots: K, the support points per task.
        query: the query points per training task.
        eval_query: the query points per validation and test task.
        amplitude: the range of A.
        phase: the range of φ.
        inputs: the range of x.
        **kwargs: the :class:`~datamodules.context.ContextDataModule` arguments.
    """

    def __init__(
        self,
        shots: int = 10,
        query: int = 10,
        eval_query: int = 100,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, 3.141592653589793),
        inputs: Sequence[float] = (-5.0, 5.0),
        **kwargs,
    ) -> None:
        for name, value in (("shots", shots), ("query", query), ("eval_query", eval_query)):
            if int(value) != value or value < 1:
                raise ValueError(f"SinusoidTasks: {name} must be a positive integer, got {value}")
        for name, bounds in (("amplitude", amplitude), ("phase", phase), ("inputs", inputs)):
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"SinusoidTasks: {name} must be a range [low, high] with low < high, got "
                                 f"{list(bounds)}")
        super().__init__(**kwargs)
        self.shots, self.query, self.eval_query = int(shots), int(query), int(eval_query)
        self.amplitude, self.phase, self.inputs = tuple(amplitude), tuple(phase), tuple(inputs)

    def tasks(self, num: int, query: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``num`` tasks with ``shots`` support and ``query`` query points each."""

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape, generator=generator)

        amplitude = uniform((num, 1, 1), self.amplitude)
        phase = uniform((num, 1, 1), self.phase)
        support_x = uniform((num, self.shots, 1), self.inputs)
        query_x = uniform((num, query, 1), self.inputs)
        return {"support_x": support_x, "support_y": amplitude * torch.sin(support_x + phase),
                "query_x": query_x, "query_y": amplitude * torch.sin(query_x + phase)}

    def sample(self, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``num`` training tasks, fresh from p(T)."""
        return self.tasks(num, self.query, generator)

    def sample_split(self, split: str, num: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The fixed validation / test tasks (``eval_query`` query points), or a fixed training pool."""
        return self.tasks(num, self.query if split == "pool" else self.eval_query, generator)
