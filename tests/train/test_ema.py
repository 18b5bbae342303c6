"""EmaWeights: fp32 shadows that follow the weights and swap in without disturbing them."""
from __future__ import annotations

import torch

from hcpdiff.train.ema import EmaWeights


def test_update_is_the_moving_average_and_decay_zero_is_the_weights():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema, copy = EmaWeights([param], decay=0.9), EmaWeights([param], decay=0.0)
    with torch.no_grad():
        param.add_(torch.tensor([1.0, -1.0]))
    ema.update()
    copy.update()
    assert torch.allclose(ema.shadow[0], torch.tensor([1.1, 1.9]))
    assert torch.equal(copy.shadow[0], param.detach())


def test_swapped_in_restores_the_raw_weights_bit_for_bit():
    param = torch.nn.Parameter(torch.randn(5))
    raw = param.detach().clone()
    ema = EmaWeights([param], decay=0.5)
    ema.shadow[0].add_(1.0)
    with ema.swapped_in():
        assert torch.equal(param.detach(), raw + 1.0)
    assert torch.equal(param.detach(), raw)
    assert param.requires_grad


def test_previews_put_the_global_random_state_back():
    import random

    import numpy as np

    from hcpdiff.train.preview import kept_random_state

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with kept_random_state():
        torch.rand(100), random.random(), np.random.rand(7)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_foreach_update_equals_the_per_parameter_formula_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 5), (7,), (2, 2, 2))]
    params.append(torch.nn.Parameter(torch.randn(4).to(torch.bfloat16)))  # a non-fp32 weight: averaged in fp32
    ema = EmaWeights(params, decay=0.997)
    expected = [p.detach().float().clone() for p in params]
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        for shadow, p in zip(expected, params):
            shadow.mul_(0.997).add_(p.detach().float(), alpha=1.0 - 0.997)
    for got, want in zip(ema.shadow, expected):
        assert torch.equal(got, want)
