"""The base linear op: oneDNN for fp32 on the CPU, the same numbers as F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve.linear import linear


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    weight = torch.randn(130, 96, generator=gen)
    bias = torch.randn(130, generator=gen) if with_bias else None
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))


def test_linear_keeps_half_precision_on_the_stock_path():
    x, weight = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    out = linear(x, weight)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, weight))
