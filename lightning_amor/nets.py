"""Small networks used as amortization models: an MLP and a learned constant."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_amor.objective import Context, context_batch_size

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """A multilayer perceptron ``B x in_features -> B x out_features``.

    Args:
        in_features: size of the (flattened) input.
        out_features: size of the output.
        hidden: widths of the hidden layers.
        activation: one of ``relu``, ``elu``, ``gelu``, ``tanh``, ``silu``.
        layer_norm: add a LayerNorm after every hidden linear layer.
        context_key: when contexts are dicts, the key of the tensor to read.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        layer_norm: bool = False,
        context_key: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP: sizes must be positive, got in={in_features}, out={out_features}, hidden={hidden}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(_ACTIVATIONS[activation]())
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.context_key = context_key

    def forward(self, x: Context) -> Tensor:
        """``B x in_features`` (or ``B x ...`` flattening to it) -> ``B x out_features``."""
        if not isinstance(x, Tensor):
            if self.context_key is None:
                raise ValueError(
                    f"MLP got a dict context with keys {sorted(x)}; set `context_key` to the key to read"
                )
            x = x[self.context_key]
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        return self.layers(x)


class LearnedConstant(nn.Module):
    """An initial iterate that ignores the context: a learned ``n`` vector broadcast to ``B x n`` (as MAML).

    Args:
        dim: n, the dimension of a solution.
        init_scale: the standard deviation of the vector's random initialisation (0: start at zero).
    """

    def __init__(self, dim: int, init_scale: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Parameter(init_scale * torch.randn(dim))

    def forward(self, x: Context) -> Tensor:
        """Any context with batch ``B`` -> ``B x n``."""
        return self.value.expand(context_batch_size(x), -1)
