"""Sampling from the models: GPT continues a prompt (greedy, temperature, top-k); T5 decodes
greedily from an encoder input.

With a KV cache (the default where the model allows it: GPT and T5 without sequence
parallelism) the prompt runs once and each new token runs alone against the cached keys and
values of the earlier ones (pretrain.models.attention.KVCache; a windowed layer keeps only its
window). The same tokens as recomputing the whole context per token, which the uncached path
does (and every path does once a GPT context outgrows seq_len: the positions then shift)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    seq_len: int,
    vocab_limit: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    kv_cache: bool = True,
) -> list[int]:
    """Continue `prompt` by `max_new_tokens` tokens.

    temperature 0 is greedy. `vocab_limit` masks the embedding rows added to pad the vocabulary
    (they are no tokenizer's tokens). The context is the last `seq_len` tokens. The same seed
    gives the same sample on every rank, so all ranks can run it together (ZeRO-3 needs that).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt)
    cached = kv_cache and caches_kv(model)
    caches = None
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-seq_len:]], dtype=torch.long, device=device)
        if not cached:
            logits_BSV = model(context)
        elif caches is None or len(ids) > seq_len:  # (re)fill from the whole context
            caches = new_caches(model.blocks)
            logits_BSV = gpt_step(model, context, caches)
        else:
            logits_BSV = gpt_step(model, context[:, -1:], caches)
        logits = logits_BSV[0, -1, :vocab_limit].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab_limit)).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(next_id)
    model.train(was_training)
    return ids[len(prompt) :]


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    encoder_input: list[int],
    max_new_tokens: int,
    *,
    start_id: int,
    vocab_limit: int,
    eos_id: int | None = None,
    device: torch.device | str = "cpu",
    kv_cache: bool = True,
) -> list[int]:
    """Greedy decoding for an encoder-decoder model (T5): encode once, then extend the decoder
    input (which starts with `start_id`, T5's pad id) by its most likely next token until
    `max_new_tokens` or `eos_id` (included in the output)."""
    was_training = model.training
    model.eval()
    enc = torch.tensor([encoder_input], dtype=torch.long, device=device)
    memory = model.encode(enc)
    caches = new_caches(model.decoder) if kv_cache and caches_kv(model) else None
    out: list[int] = []
    for _ in range(max_new_tokens):
        dec = torch.tensor([[start_id, *out]], dtype=torch.long, device=device)
        if caches is None:
            logits_BSV = model.decode(dec, memory)
        else:
            logits_BSV = t5_step(model, dec[:, -1:], memory, caches)
        next_id = int(logits_BSV[0, -1, :vocab_limit].argmax())
        out.append(next_id)
        if next_id == eos_id:
            break
    model.train(was_training)
    return out


# --- cached steps --------------------------------------------------------------------------------


def caches_kv(model: nn.Module) -> bool:
    """Whether the cached steps below can run `model`: a whole GPT or T5 on this rank's
    tensor-parallel shard, without sequence parallelism (whose shards of one token do not
    exist) and not partitioned by ZeRO-3 (whose weights only the model's own forward gathers);
    pipeline stages and other wrappers recompute instead."""
    from pretrain.models.gpt import GPT
    from pretrain.models.t5 import T5

    if not isinstance(model, GPT | T5) or model.tpc.sequence_parallel:
        return False
    return not any(hasattr(p, "ds_id") for p in model.parameters())


def new_caches(blocks: nn.ModuleList) -> list:
    from pretrain.models.attention import BlockCache

    return [BlockCache() for _ in blocks]


def gpt_step(model: nn.Module, tokens_BS: torch.Tensor, caches: list) -> torch.Tensor:
    """Logits [b, s, v] of the new tokens, which follow the cached ones: the first call takes
    the context, the later ones one token each."""
    from pretrain.models.attention import AttentionMask, attention_mask
    from pretrain.models.collectives import gather_last_dim
    from pretrain.models.layers import absolute_positions, embed_tokens, stream_order

    offset, s = caches[0].self_attn.offset, tokens_BS.shape[1]
    x_TD = embed_tokens(model.embed, tokens_BS, model.tpc)
    x_TD = model.drop(absolute_positions(model, x_TD, offset))
    # One new token sees every cached key (a windowed layer's cache holds only its window).
    mask = AttentionMask()
    if offset == 0:
        mask = attention_mask(s, s, causal=True, dtype=x_TD.dtype, device=x_TD.device)
    for block, cache in zip(model.blocks, caches, strict=True):
        x_TD = block(x_TD, mask, cache=cache)
    if model.ln_f is not None:
        x_TD = model.ln_f(x_TD)
    return stream_order(gather_last_dim(model.logits_parallel(x_TD), model.tpc.group), model.tpc)


def t5_step(model: nn.Module, dec_BS: torch.Tensor, memory, caches: list) -> torch.Tensor:
    """T5 decoder logits [b, s, v] of the new decoder tokens after the cached ones; the
    cross-attention projects the encoder output once, on the first call."""
    from pretrain.models.attention import attention_mask
    from pretrain.models.collectives import gather_last_dim
    from pretrain.models.layers import embed_tokens, stream_length, stream_order

    offset, s = caches[0].self_attn.offset, dec_BS.shape[1]
    x_TD = model.drop(embed_tokens(model.embed, dec_BS, model.tpc))
    kw = dict(dtype=x_TD.dtype, device=x_TD.device)
    bias = model.dec_bias(s, offset + s, q_offset=offset)
    # The first call is causal over its tokens; a later single token sees all cached keys.
    self_mask = attention_mask(s, offset + s, causal=offset == 0, position_bias_1HQK=bias, **kw)
    enc = memory.hidden_TD
    cross_mask = attention_mask(
        s, stream_length(enc, model.tpc), causal=False, key_padding_BK=memory.padding_mask_BS, **kw
    )
    for block, cache in zip(model.decoder, caches, strict=True):
        x_TD = block(x_TD, self_mask, enc, cross_mask, cache=cache)
    if model.dec_norm is not None:
        x_TD = model.dec_norm(x_TD)
    logits_TV = model._logits_parallel(model.drop(x_TD))
    return stream_order(gather_last_dim(logits_TV, model.tpc.group), model.tpc)
