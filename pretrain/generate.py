"""Sampling from the models: GPT continues a prompt (greedy, temperature, top-k); T5 decodes
greedily from an encoder input. Both recompute the full forward pass per new token (no KV
cache): simple and exact, fast enough for samples and tests."""

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
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-seq_len:]], dtype=torch.long, device=device)
        logits = model(context)[0, -1, :vocab_limit].float().cpu()
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
) -> list[int]:
    """Greedy decoding for an encoder-decoder model (T5): encode once, then extend the decoder
    input (which starts with `start_id`, T5's pad id) by its most likely next token until
    `max_new_tokens` or `eos_id` (included in the output)."""
    was_training = model.training
    model.eval()
    enc = torch.tensor([encoder_input], dtype=torch.long, device=device)
    memory = model.encode(enc)
    out: list[int] = []
    for _ in range(max_new_tokens):
        dec = torch.tensor([[start_id, *out]], dtype=torch.long, device=device)
        next_id = int(model.decode(dec, memory)[0, -1, :vocab_limit].argmax())
        out.append(next_id)
        if next_id == eos_id:
            break
    model.train(was_training)
    return out
