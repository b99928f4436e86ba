"""Pieces of the attention backward on their own, through the interpreter, against float64:
the ``delta = rowsum(dO o O)`` preprocess kernel."""

from __future__ import annotations

import pytest
import torch

from kernels.flash_attention import launcher
from tests.kernels.test_flash_attention import (  # noqa: F401 - _poisoned_outputs: autouse
    _poisoned_outputs,
)


@pytest.mark.parametrize("dtype, head_dim, q_len", [(torch.float16, 80, 37),
                                                    (torch.float32, 16, 130)])
def test_delta_preprocess_matches_float64(dtype, head_dim, q_len):
    """A head dim that is no power of two (80: masked columns), lengths crossing partial
    blocks, and a non-contiguous dO (the model's layout)."""
    gen = torch.Generator().manual_seed(head_dim + q_len)
    out = torch.randn(2, 3, q_len, head_dim, generator=gen).to(dtype)
    do = torch.randn(2, q_len, 3, head_dim, generator=gen).to(dtype).transpose(1, 2)
    assert not do.is_contiguous()
    delta = launcher._delta(out, do)
    want = (out.double() * do.double()).sum(-1)
    assert delta.dtype == torch.float32 and delta.shape == want.shape
    assert not delta.isnan().any()  # every row written (the buffer starts as NaN)
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5)
