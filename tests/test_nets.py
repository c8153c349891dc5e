"""The small networks used as amortization models: MLP and LearnedConstant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amor.nets import MLP, LearnedConstant


@pytest.mark.parametrize("batch", [1, 5])
def test_mlp_shapes(batch: int) -> None:
    net = MLP(6, 3, hidden=(8, 4))
    assert net(torch.randn(batch, 6)).shape == (batch, 3)
    assert net(torch.randn(batch, 2, 3)).shape == (batch, 3)  # B x ... is flattened
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [8, 4, 3]


def test_mlp_without_hidden_layers_is_linear() -> None:
    net = MLP(4, 2, hidden=())
    assert [type(m) for m in net.layers] == [nn.Linear]


@pytest.mark.parametrize(
    ("activation", "module"),
    [("relu", nn.ReLU), ("elu", nn.ELU), ("gelu", nn.GELU), ("tanh", nn.Tanh), ("silu", nn.SiLU)],
)
def test_mlp_activation_and_layer_norm(activation: str, module: type) -> None:
    net = MLP(4, 2, hidden=(8, 8), activation=activation, layer_norm=True)
    assert sum(isinstance(m, module) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == 2
    assert not any(isinstance(m, nn.LayerNorm) for m in MLP(4, 2, hidden=(8,)).modules())


def test_mlp_reads_a_dict_context_by_key() -> None:
    net = MLP(3, 2, hidden=(4,), context_key="signal")
    x = {"signal": torch.randn(5, 3), "other": torch.randn(5, 7)}
    torch.testing.assert_close(net(x), net(x["signal"]))


def test_mlp_errors() -> None:
    with pytest.raises(ValueError, match=r"set `context_key`.*\['a', 'b'\]|\['a', 'b'\].*set `context_key`"):
        MLP(3, 2)({"a": torch.randn(2, 3), "b": torch.randn(2, 3)})
    with pytest.raises(ValueError, match=r"expects inputs with 3 features, got shape \(2, 4\)"):
        MLP(3, 2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(3, 2, activation="swish")
    for sizes in (
        {"in_features": 0, "out_features": 2},
        {"in_features": 3, "out_features": 0},
        {"in_features": 3, "out_features": 2, "hidden": (4, 0)},
    ):
        with pytest.raises(ValueError, match="sizes must be positive"):
            MLP(**sizes)


def test_learned_constant_broadcasts_over_the_batch() -> None:
    torch.manual_seed(0)
    net = LearnedConstant(3, init_scale=1.0)
    out = net(torch.randn(4, 10))
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, net.value.detach().expand(4, 3))
    assert net.value.abs().sum() > 0
    assert net({"a": torch.randn(2, 5), "b": torch.randn(2)}).shape == (2, 3)
    assert not LearnedConstant(3).value.any()  # init_scale 0: zeros


def test_learned_constant_is_trained_by_every_context() -> None:
    net = LearnedConstant(3)
    net(torch.randn(4, 10)).sum().backward()
    torch.testing.assert_close(net.value.grad, torch.full((3,), 4.0))


def test_learned_constant_rejects_a_context_without_batch() -> None:
    with pytest.raises(ValueError, match="leading batch dimension"):
        LearnedConstant(3)(torch.tensor(1.0))
