"""GPT, BERT and T5 through build_model on one process: each takes its batch contract, its
loss is the masked mean of the full logits' cross-entropy, its masks hold at the model level,
and each tiny config learns a synthetic task on CPU (plain torch AdamW, 30 steps)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig, load_config
from pretrain.generate import generate_seq2seq
from pretrain.models import build_model
from pretrain.models.bert import BERT
from pretrain.models.gpt import GPT
from pretrain.models.t5 import T5

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64


def tiny(family: str, **changes) -> ModelConfig:
    cfg = load_config(CONFIGS / f"tiny_{family}.yaml").model
    return dataclasses.replace(cfg, vocab_size=V, **changes)


def build(world1, cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, world1, 1)


def rand_ids(*shape, seed=0) -> torch.Tensor:
    return torch.randint(2, V, shape, generator=torch.Generator().manual_seed(seed))


def masked_ce(logits_BSV, targets_BS, mask_BS=None) -> torch.Tensor:
    ce = F.cross_entropy(logits_BSV.reshape(-1, V), targets_BS.reshape(-1), reduction="none")
    if mask_BS is None:
        return ce.mean()
    m = mask_BS.reshape(-1).float()
    return (ce * m).sum() / m.sum()


# --- synthetic batches with the contract's keys --------------------------------------------------


def pattern(b: int, s: int, period: int = 5, seed: int = 0) -> torch.Tensor:
    """Rows of one repeating motif at random phases: predictable from context alone."""
    motif = rand_ids(period, seed=seed)
    phase = torch.randint(0, period, (b, 1), generator=torch.Generator().manual_seed(seed + 1))
    return motif[(torch.arange(s)[None, :] + phase) % period]


def causal_batch(b=4, s=32) -> dict[str, torch.Tensor]:
    seq = pattern(b, s + 1)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}


MASK_ID = 1


def mlm_batch(b=4, s=32, seed=0) -> dict[str, torch.Tensor]:
    original = pattern(b, s)
    chosen = torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < 0.2
    padding = torch.ones(b, s, dtype=torch.bool)
    padding[0, s - 6 :] = False
    chosen &= padding
    return {
        "tokens": original.masked_fill(chosen, MASK_ID),
        "targets": original,
        "loss_mask": chosen.float(),
        "padding_mask": padding,
    }


PAD_ID = 0


def span_batch(b=4, le=16, ld=8) -> dict[str, torch.Tensor]:
    """A copy task: the decoder reproduces the first ld encoder tokens."""
    enc = rand_ids(b, le, seed=5)
    targets = enc[:, :ld].clone()
    dec = torch.cat([torch.full((b, 1), PAD_ID), targets[:, :-1]], dim=1)  # shifted right
    enc_padding = torch.ones(b, le, dtype=torch.bool)
    enc_padding[1, le - 3 :] = False
    return {
        "enc_tokens": enc.masked_fill(~enc_padding, PAD_ID),
        "dec_tokens": dec,
        "targets": targets,
        "loss_mask": torch.ones(b, ld),
        "enc_padding_mask": enc_padding,
        "dec_padding_mask": torch.ones(b, ld, dtype=torch.bool),
    }


BATCHES = {"gpt": causal_batch, "bert": mlm_batch, "t5": span_batch}


# --- registry and contracts --------------------------------------------------------------------


def test_build_model_picks_the_family(world1):
    assert isinstance(build(world1, tiny("gpt")), GPT)
    assert isinstance(build(world1, tiny("bert")), BERT)
    assert isinstance(build(world1, tiny("t5")), T5)


def test_gpt_loss_is_mean_cross_entropy_of_the_logits(world1):
    model = build(world1, tiny("gpt")).eval()
    batch = causal_batch()
    with torch.no_grad():
        loss = model(**batch)
        want = masked_ce(model(batch["tokens"]), batch["targets"])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - math.log(V)) < 0.5  # a fresh model is near uniform


def test_gpt_documents_do_not_see_each_other(world1):
    model = build(world1, tiny("gpt")).eval()
    tokens = rand_ids(2, 16)
    docs = torch.tensor([[0] * 6 + [1] * 10] * 2)
    changed = tokens.clone()
    changed[:, :6] = rand_ids(2, 6, seed=9)  # rewrite the first document
    with torch.no_grad():
        a = model(tokens, doc_ids=docs)
        b = model(changed, doc_ids=docs)
        a_plain, b_plain = model(tokens), model(changed)
    assert (a[:, 6:] - b[:, 6:]).abs().max() < 1e-5
    assert (a_plain[:, 6:] - b_plain[:, 6:]).abs().max() > 1e-3  # without doc_ids it leaks


def test_bert_scores_only_masked_positions(world1):
    model = build(world1, tiny("bert")).eval()
    batch = mlm_batch()
    with torch.no_grad():
        loss = model(**batch)
        logits = model(batch["tokens"], padding_mask=batch["padding_mask"])
        want = masked_ce(logits, batch["targets"], batch["loss_mask"])
        unmasked = masked_ce(logits, batch["targets"])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - unmasked.item()) > 1e-4
    # Changing a target where loss_mask is 0 leaves the loss as it was.
    other = dict(batch, targets=batch["targets"].masked_fill(batch["loss_mask"] == 0, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(**other), loss)


def test_bert_is_bidirectional_and_ignores_padding(world1):
    model = build(world1, tiny("bert")).eval()
    tokens = rand_ids(1, 12)
    padding = torch.ones(1, 12, dtype=torch.bool)
    padding[0, 9:] = False
    later = tokens.clone()
    later[0, 7] = (later[0, 7] + 1) % V
    in_padding = tokens.clone()
    in_padding[0, 10] = (in_padding[0, 10] + 1) % V
    with torch.no_grad():
        base = model(tokens, padding_mask=padding)
        assert (model(later, padding_mask=padding)[0, :7] - base[0, :7]).abs().max() > 1e-4
        same = model(in_padding, padding_mask=padding)
        assert (same[0, :9] - base[0, :9]).abs().max() < 1e-5
        leaky = model(in_padding)  # negative control: no padding mask
        assert (leaky[0, :9] - model(tokens)[0, :9]).abs().max() > 1e-4


def test_t5_loss_masks_and_causality(world1):
    model = build(world1, tiny("t5")).eval()
    batch = span_batch()
    mask = batch["loss_mask"].clone()
    mask[:, 5:] = 0
    with torch.no_grad():
        loss = model(**dict(batch, loss_mask=mask))
        logits = model(
            batch["enc_tokens"],
            batch["dec_tokens"],
            enc_padding_mask=batch["enc_padding_mask"],
            dec_padding_mask=batch["dec_padding_mask"],
        )
        torch.testing.assert_close(loss, masked_ce(logits, batch["targets"], mask))
        # The decoder is causal: a later decoder token leaves earlier logits alone.
        dec = batch["dec_tokens"].clone()
        dec[:, 6] = (dec[:, 6] + 1) % V
        later = model(batch["enc_tokens"], dec, enc_padding_mask=batch["enc_padding_mask"])
        assert (later[:, :6] - logits[:, :6]).abs().max() < 1e-5
        assert (later[:, 6:] - logits[:, 6:]).abs().max() > 1e-4
        # The encoder is read through cross-attention, except where it is padding.
        enc = batch["enc_tokens"].clone()
        enc[1, -2] = 7  # a padded position of row 1
        padded = model(enc, batch["dec_tokens"], enc_padding_mask=batch["enc_padding_mask"])
        assert (padded - logits).abs().max() < 1e-5
        enc[1, 0] = 7  # a real one
        real = model(enc, batch["dec_tokens"], enc_padding_mask=batch["enc_padding_mask"])
        assert (real[1] - logits[1]).abs().max() > 1e-4


def test_t5_tied_logits_are_scaled_by_inverse_sqrt_d_model(world1):
    model = build(world1, tiny("t5")).eval()
    batch = span_batch()
    captured = {}
    hook = model.dec_norm.register_forward_hook(lambda m, i, out: captured.update(h=out))
    with torch.no_grad():
        logits = model(batch["enc_tokens"], batch["dec_tokens"])
    hook.remove()
    h_BSD = captured["h"]  # the stream at TP=1 is [b, s, d]
    d = model.cfg.d_model
    want = h_BSD @ model.embed.weight.T * d**-0.5
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    assert (logits - h_BSD @ model.embed.weight.T).abs().max() > 1e-3


# --- each family learns ------------------------------------------------------------------------


def train(model, batch: dict[str, torch.Tensor], steps: int = 30, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_tiny_config_learns(world1, family):
    """30 AdamW steps at lr 3e-3 on one synthetic batch of the family's contract; the final
    loss must be below 0.4 of the first. Measured (seeds 0, 1, 2 of the weights): GPT
    4.04 -> 0.28, 4.23 -> 0.18, 4.16 -> 0.15 (ratios 0.04-0.07); BERT 4.15 -> 0.26,
    4.22 -> 0.23, 4.14 -> 0.17 (0.04-0.06); T5 7.98 -> 1.69, 8.15 -> 2.55, 7.88 -> 1.66
    (0.21-0.31). T5 starts above log(V) = 4.16: its N(0, 1) embeddings dominate the fresh
    residual stream, so it first predicts the decoder's own input token."""
    model = build(world1, tiny(family))
    losses = train(model, BATCHES[family]())
    assert losses[-1] < 0.4 * losses[0], losses


def test_dropout_is_active_in_training_only(world1):
    model = build(world1, tiny("gpt", dropout=0.3))
    batch = causal_batch()
    torch.manual_seed(1)
    a = model(**batch)
    torch.manual_seed(2)
    b = model(**batch)
    assert a.item() != b.item()
    model.eval()
    assert model(**batch).item() == model(**batch).item()


# --- T5 generation -----------------------------------------------------------------------------


def test_t5_greedy_generation_copies_after_training(world1):
    """Trained on the copy task, greedy decoding reproduces the first targets of an example;
    the untrained model does not (the negative control)."""
    cfg = tiny("t5")
    batch = span_batch()
    untrained = build(world1, cfg).eval()
    model = build(world1, cfg)
    # 60 steps sufficed for some inits and not others (measured over seeds 0-3 when the
    # per-unit init seeding came in); at 120 every seed tried copies the targets exactly.
    train(model, batch, steps=120)
    model.eval()
    enc = batch["enc_tokens"][0].tolist()
    want = batch["targets"][0].tolist()
    got = generate_seq2seq(model, enc, 8, start_id=PAD_ID, vocab_limit=V)
    assert got == want
    assert generate_seq2seq(untrained, enc, 8, start_id=PAD_ID, vocab_limit=V) != want


def test_t5_greedy_step_is_the_argmax_of_a_full_decode(world1):
    model = build(world1, tiny("t5")).eval()
    enc = rand_ids(10).tolist()
    out = generate_seq2seq(model, enc, 5, start_id=PAD_ID, vocab_limit=40)
    assert len(out) == 5 and max(out) < 40
    with torch.no_grad():
        logits = model(torch.tensor([enc]), torch.tensor([[PAD_ID, *out[:-1]]]))
    assert out == logits[0, :, :40].argmax(-1).tolist()
    # Stops at EOS when one is given.
    eos = out[1]
    stop = generate_seq2seq(model, enc, 5, start_id=PAD_ID, vocab_limit=40, eos_id=eos)
    assert stop == out[: out.index(eos) + 1]
