"""Hugging Face export mapping (pretrain/export.py), in one process on models with random
weights: each family's export, saved and loaded back with transformers' from_pretrained (no
network), gives our logits within 1e-4. Negative controls break one mapping step each (q and k
swapped, gate/up split in halves instead of de-interleaved, T5's relative bias left off) and
must lose the match. Options transformers cannot express are refused with one error naming them.

(Exports of real TP=2 and single-process checkpoints through pretrain-ckpt:
tests/distributed/test_export_ckpt.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain import export
from pretrain.config import load_config
from pretrain.models import build_model

VOCAB = 150  # not a multiple of anything the tokenizer has: padded rows are exported too
TOL = 1e-4

FAMILIES = {
    "gpt2": ("configs/tiny.yaml", {}, "GPT2LMHeadModel"),
    "llama": ("configs/tiny_gpt.yaml", {}, "LlamaForCausalLM"),
    "bert": ("configs/tiny_bert.yaml", {}, "BertForMaskedLM"),
    "t5": ("configs/tiny_t5.yaml", {}, "T5ForConditionalGeneration"),
    # variants through the same mappers: untied heads, GeGLU in Llama and T5, biased Llama
    "gpt2_untied": ("configs/tiny.yaml", {"tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama_geglu_bias": (
        "configs/tiny_gpt.yaml",
        {"activation": "geglu", "bias": True, "tie_embeddings": False},
        "LlamaForCausalLM",
    ),
    "bert_untied": ("configs/tiny_bert.yaml", {"tie_embeddings": False}, "BertForMaskedLM"),
    "t5_gated": ("configs/tiny_t5.yaml", {"activation": "geglu"}, "T5ForConditionalGeneration"),
}


def _cfg(path: str, **model_overrides):
    cfg = load_config(path)
    m = dataclasses.replace(cfg.model, vocab_size=VOCAB, **model_overrides)
    m.validate()
    return dataclasses.replace(cfg, model=m)


def _model(cfg, world1):
    torch.manual_seed(0)
    model = build_model(cfg.model, world1, 1).eval()
    # Norm weights start at 1 and biases at 0, where a swapped or dropped one goes unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _logits(model, family: str, hf: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        if family == "t5":
            d = torch.randint(0, VOCAB, (2, 11), generator=g)
            return model(input_ids=x, decoder_input_ids=d).logits if hf else model(x, d)
        return model(input_ids=x).logits if hf else model(x)


def _hf_roundtrip(cfg, state, tmp_path):
    """Build, save_pretrained and from_pretrained the transformers model of `state`."""
    import transformers

    from data_pipeline.tokenizer import Tokenizer

    # Our special ids go into the config as an export writes them (pad_token_id=1 etc.).
    export.hf_model(cfg, state, Tokenizer.bytes().specials).save_pretrained(tmp_path)
    cls = getattr(transformers, export.hf_target(cfg))
    return cls.from_pretrained(tmp_path, local_files_only=True).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_matches_our_logits(name, world1, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, over, target = FAMILIES[name]
    cfg = _cfg(path, **over)
    assert export.hf_target(cfg) == target
    model = _model(cfg, world1)
    hf = _hf_roundtrip(cfg, export.hf_state_dict(model, cfg), tmp_path)
    assert type(hf).__name__ == target
    ours, theirs = _logits(model, cfg.model.family, False), _logits(hf, cfg.model.family, True)
    assert theirs.shape == ours.shape  # the padded vocabulary is kept (VOCAB rows)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.3g}")
    assert diff <= TOL


def _swap_qk(state, q_key, k_key):
    state[q_key], state[k_key] = state[k_key].clone(), state[q_key].clone()


def _llama_gate_up_halves(state, sd, cfg):
    """The wrong de-interleave: the first half of our fused rows as gate, the second as up."""
    for i in range(cfg.model.n_layers):
        w = sd[f"blocks.{i}.mlp.up.weight"]
        half = w.shape[0] // 2
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = w[:half].clone()
        state[f"model.layers.{i}.mlp.up_proj.weight"] = w[half:].clone()


BREAKS = {
    # q and k swapped in the first layer (Llama: GQA split; GPT-2: Conv1D column blocks)
    "llama_qk": ("llama", lambda st, sd, cfg: _swap_llama_qk_rows(st)),
    "gpt2_qk": ("gpt2", lambda st, sd, cfg: _swap_gpt2_qk(st)),
    "bert_qk": (
        "bert",
        lambda st, sd, cfg: _swap_qk(
            st,
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.key.weight",
        ),
    ),
    "t5_qk": (
        "t5",
        lambda st, sd, cfg: _swap_qk(
            st,
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.k.weight",
        ),
    ),
    "llama_gate_up": ("llama", _llama_gate_up_halves),
    "t5_no_relative_bias": ("t5", lambda st, sd, cfg: st[T5_BIAS].zero_()),
    "gpt2_conv1d_untransposed": ("gpt2", lambda st, sd, cfg: _gpt2_untransposed(st, sd)),
}


T5_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _gpt2_untransposed(state, sd):
    """Our [out, in] MLP down projection reshaped, not transposed, into Conv1D's [in, out]."""
    key = "transformer.h.0.mlp.c_proj.weight"
    state[key] = sd["blocks.0.mlp.down.weight"].clone().reshape(state[key].shape)


def _swap_llama_qk_rows(state):
    """Llama with GQA has fewer k rows than q rows: swap the first head's q and k rows."""
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    e = k.shape[0] // 2
    q[:e], k[:e] = k[:e].clone(), q[:e].clone()


def _swap_gpt2_qk(state):
    """GPT-2's c_attn columns are [q | k | v]: swap the q and k blocks of the first layer."""
    w = state["transformer.h.0.attn.c_attn.weight"]
    d = w.shape[0]
    q, k = w[:, :d].clone(), w[:, d : 2 * d].clone()
    w[:, :d], w[:, d : 2 * d] = k, q


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_mapping_loses_the_match(name, world1, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, brk = BREAKS[name]
    path, over, _ = FAMILIES[family]
    cfg = _cfg(path, **over)
    model = _model(cfg, world1)
    state = export.hf_state_dict(model, cfg)
    brk(state, export.tensors_of(model), cfg)
    hf = _hf_roundtrip(cfg, state, tmp_path)
    diff = (_logits(model, cfg.model.family, False) - _logits(hf, cfg.model.family, True)).abs()
    assert diff.max().item() > 100 * TOL


@pytest.mark.parametrize(
    "path, over, option",
    [
        ("configs/tiny.yaml", {"activation": "geglu"}, "model.activation='geglu'"),
        ("configs/tiny.yaml", {"positions": "sinusoidal"}, "model.positions='sinusoidal'"),
        ("configs/tiny.yaml", {"norm_position": "post"}, "model.norm_position='post'"),
        ("configs/tiny.yaml", {"n_kv_heads": 2}, "model.n_kv_heads=2"),
        ("configs/tiny_gpt.yaml", {"activation": "gelu"}, "model.activation='gelu'"),
        ("configs/tiny_gpt.yaml", {"norm": "layernorm"}, "model.norm='layernorm'"),
        ("configs/tiny_bert.yaml", {"norm_position": "pre"}, "model.norm_position='pre'"),
        ("configs/tiny_t5.yaml", {"tie_embeddings": False}, "model.tie_embeddings=False"),
        ("configs/tiny_t5.yaml", {"n_kv_heads": 2}, "model.n_kv_heads=2"),
    ],
)
def test_options_without_equivalent_are_refused(path, over, option):
    cfg = _cfg(path, **over)
    with pytest.raises(export.ExportError) as e:
        export.hf_target(cfg)
    msg = str(e.value)
    assert msg.startswith(f"config {option}:") and "no equivalent in transformers'" in msg
