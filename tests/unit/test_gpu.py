"""Checks that need CUDA: the FlashAttention path of SDPA. Skipped without CUDA
(tests/conftest.py); CI machines have none, so these run where a GPU is lent. bf16 training on
a GPU is checked through the engine by tests/distributed/test_zero.py (gpu-marked)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.models.layers import Attention, AttentionMask, TensorParallel

pytestmark = pytest.mark.gpu

CFG = ModelConfig(n_layers=2, d_model=256, n_heads=4, seq_len=256, vocab_size=512)


def test_flash_attention_kernel_matches_the_math_kernel(world1):
    """Our attention module runs on the FlashAttention kernel (forcing it raises if the inputs
    do not qualify) and agrees with the reference math kernel in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(CFG, TensorParallel.build(world1), n_layers=CFG.n_layers)
    attn = attn.cuda().to(torch.bfloat16).eval()
    causal = AttentionMask(causal=True)
    x = torch.randn(4, CFG.seq_len, CFG.d_model, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = attn(x, causal).float()
        with sdpa_kernel(SDPBackend.MATH):
            math_ = attn(x, causal).float()
    rel = (flash - math_).norm() / math_.norm()
    assert rel < 1e-2  # bf16 operands: 1e-3..1e-2 relative is the expected band
    assert torch.isfinite(flash).all()
