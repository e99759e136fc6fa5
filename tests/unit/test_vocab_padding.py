"""The vocabulary's padding rows do not change the model (layers.mask_padding), which is what lets
a checkpoint resume under another TP's padding (pretrain.reshard) and the HF export cut them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig, load_config, resolve_vocab
from pretrain.models.gpt import GPT

REAL = 90  # the tokenizer's size
BASE = ModelConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, dropout=0.0)


def pair(world1, masked: bool) -> tuple[GPT, GPT]:
    """Two GPTs that agree on every real row and differ in padding (96 rows against 128 rows of
    other values)."""
    real = REAL if masked else None
    torch.manual_seed(0)
    a = GPT(dataclasses.replace(BASE, vocab_size=96, tokenizer_vocab=real), world1)
    b = GPT(dataclasses.replace(BASE, vocab_size=128, tokenizer_vocab=real), world1)
    sd = a.state_dict()
    big = b.state_dict()
    for k, v in sd.items():
        if v is not None and v.shape != big[k].shape:  # the embedding: real rows copied
            big[k][:REAL] = v[:REAL]
            big[k][REAL:] = torch.randn_like(big[k][REAL:])
        elif v is not None:
            big[k] = v
    b.load_state_dict(big)
    return a, b


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, REAL, (2, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def test_padding_rows_change_nothing(world1):
    a, b = pair(world1, masked=True)
    x, y = batch()
    la, lb = a(x, y), b(x, y)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    la.backward()
    lb.backward()
    ga, gb = a.embed.weight.grad, b.embed.weight.grad
    assert torch.allclose(ga[:REAL], gb[:REAL], atol=1e-6)
    assert gb[REAL:].abs().max() == 0  # no gradient into the padding


def test_negative_control_unmasked_padding_changes_the_loss(world1):
    a, b = pair(world1, masked=False)
    x, y = batch()
    assert abs(a(x, y).item() - b(x, y).item()) > 1e-3


def test_resolve_vocab_records_the_tokenizer(tmp_path):
    cfg = load_config(None, ["parallel.tp=2", "data.path=x"])
    out = resolve_vocab(cfg, 500)
    assert (out.model.vocab_size, out.model.tokenizer_vocab) == (512, 500)
    bad = load_config(None, ["model.tokenizer_vocab=400", "data.path=x"])
    with pytest.raises(ConfigError, match="model.tokenizer_vocab"):
        resolve_vocab(bad, 500)
