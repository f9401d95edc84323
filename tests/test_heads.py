"""The projection head's dropout: the distribution of nn.Dropout, drawn another way."""

from __future__ import annotations

import torch

from featcache.train.heads import Dropout, ProjectionHead


def test_dropout_zeroes_a_fraction_p_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    drop = Dropout(0.2).train()
    y = drop(x.requires_grad_(True))
    dropped = y == 0
    # 10^6 draws: the dropped fraction's standard deviation is sqrt(0.2 * 0.8 / 10^6) = 4e-4.
    assert abs(dropped.float().mean().item() - 0.2) < 0.002
    assert torch.allclose(y[~dropped], x[~dropped] / 0.8, rtol=1e-6, atol=0)
    y.sum().backward()
    assert torch.allclose(x.grad, (~dropped).float() / 0.8, rtol=1e-6, atol=0)
    # fresh masks each call, the identity in eval mode and for p = 0
    assert not torch.equal(drop(x) == 0, dropped)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x


def test_head_is_dropout_then_linear():
    head = ProjectionHead(12, 4, dropout=0.5).eval()
    x = torch.randn(3, 12)
    assert torch.equal(head(x), x @ head.net[1].weight.T + head.net[1].bias)
    assert list(head.state_dict()) == ["net.1.weight", "net.1.bias"]
