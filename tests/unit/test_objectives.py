"""The objectives: causal document ids, BERT masking and T5 span corruption, checked against
their settings on 100,000 tokens and against direct per-row reconstructions."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.objectives import (
    Causal,
    MaskedLM,
    SpanCorruption,
    hash_uniform,
    span_counts,
    span_lengths,
)

EOS, PAD, MASK = 0, 1, 2
SENTINELS = tuple(range(3, 103))
SPECIAL = (EOS, PAD, MASK, *SENTINELS)
VOCAB = 1000
TOKENS = 100_000


def packed_rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    """Rows of ordinary ids with end-of-document tokens at random places (about 1 in 50)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(103, VOCAB, (n, width)).astype(np.uint16)
    rows[rng.random((n, width)) < 0.02] = EOS
    return rows


def test_causal_shifts_and_numbers_documents():
    rows = packed_rows(50, 33)
    batch = Causal(32, EOS, document_mask=True)(rows, np.arange(50))
    np.testing.assert_array_equal(batch["tokens"], rows[:, :-1])
    np.testing.assert_array_equal(batch["targets"], rows[:, 1:])
    for row, doc in zip(batch["tokens"], batch["doc_ids"], strict=True):
        current = 0
        for t, d in zip(row, doc, strict=True):
            assert d == current  # an EOS belongs to the document it ends ...
            current += t == EOS  # ... and the next token starts the next one
    assert batch["doc_ids"].max() > 0
    assert "doc_ids" not in Causal(32, EOS)(rows, np.arange(50))


def mlm_batch(mask_prob=0.15, seed=0, rows=None, index=None):
    rows = packed_rows(TOKENS // 128, 128) if rows is None else rows
    index = np.arange(len(rows)) if index is None else index
    return rows, MaskedLM(128, seed, VOCAB, MASK, SPECIAL, mask_prob)(rows, index)


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_mlm_statistics_match_the_settings(mask_prob):
    rows, batch = mlm_batch(mask_prob)
    original = rows.astype(np.int64)
    chosen = batch["loss_mask"] == 1.0
    special = np.isin(original, SPECIAL)
    assert original.size >= TOKENS * 0.99 and special.sum() > 1000
    np.testing.assert_array_equal(batch["targets"], original)
    assert not (chosen & special).any()  # specials are never predicted
    # The rate is fixed per row by rounding (BERT's rule): round(mask_prob * m) of a row's m
    # ordinary positions, at least one. Checked row by row, which a wrong count in any row fails.
    eligible = (~special).sum(axis=1)
    want = [max(1, round(mask_prob * m)) if m else 0 for m in eligible.tolist()]
    assert chosen.sum(axis=1).tolist() == want
    tokens = batch["tokens"]
    assert (tokens[~chosen] == original[~chosen]).all()  # only chosen positions change
    masked = (tokens == MASK)[chosen].mean()
    replaced = ((tokens != MASK) & (tokens != original))[chosen].mean()
    kept = (tokens == original)[chosen].mean()
    # A random replacement draws the original id back 1 time in len(candidates).
    candidates = VOCAB - len(SPECIAL)
    assert masked == pytest.approx(0.8, abs=0.01)
    assert replaced == pytest.approx(0.1 * (1 - 1 / candidates), abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / candidates, abs=0.01)
    randoms = tokens[chosen & (tokens != MASK) & (tokens != original)]
    assert not np.isin(randoms, SPECIAL).any()
    # Uniform over the candidates: the mean id is the candidates' mean, within 3 std errors.
    spread = np.arange(len(SPECIAL), VOCAB)
    assert abs(randoms.mean() - spread.mean()) < 3 * spread.std() / np.sqrt(len(randoms))
    assert batch["padding_mask"].all() and batch["loss_mask"].dtype == np.float32


def test_mlm_depends_on_seed_and_index_only():
    rows, batch = mlm_batch()
    # The same sequences in other batches (another DP size, micro-batch or worker) ...
    part = MaskedLM(128, 0, VOCAB, MASK, SPECIAL)(rows[100:107], np.arange(100, 107))
    for key in batch:
        np.testing.assert_array_equal(part[key], batch[key][100:107])
    # ... but another global index (the same sequence in the next epoch) or seed differ.
    _, next_epoch = mlm_batch(rows=rows, index=np.arange(len(rows)) + len(rows))
    _, other_seed = mlm_batch(seed=1, rows=rows)
    for other in (next_epoch, other_seed):
        assert (other["loss_mask"] != batch["loss_mask"]).mean() > 0.1


def test_hash_uniform_is_uniform_and_independent():
    u = hash_uniform(7, 1, np.arange(1000)[:, None], np.arange(100)[None, :])
    assert u.min() >= 0 and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx([10_000] * 10, rel=0.05)
    # Neighbouring rows, columns and streams are uncorrelated.
    v = hash_uniform(7, 2, np.arange(1000)[:, None], np.arange(100)[None, :])
    for a, b in [(u[:-1], u[1:]), (u[:, :-1], u[:, 1:]), (u, v)]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    assert np.array_equal(u, hash_uniform(7, 1, np.arange(1000)[:, None], np.arange(100)))


def test_span_lengths_match_t5():
    # The lengths T5's random_spans_helper gives for a 512-token encoder at density 0.15 and
    # mean span 3 (and that the HF T5 span-corruption example uses): 568 raw, 114 targets.
    assert span_lengths(512, 0.15, 3.0) == (568, 114)
    for enc_len in range(4, 700):
        raw, dec = span_lengths(enc_len, 0.15, 3.0)
        noise, spans = span_counts(raw, 0.15, 3.0)
        assert raw - noise + spans + 1 <= enc_len  # fits the encoder ...
        more, more_spans = span_counts(raw + 1, 0.15, 3.0)
        assert raw + 1 - more + more_spans + 1 > enc_len  # ... and one more token would not
        assert dec == noise + spans + 1


def decode(enc: np.ndarray, targets: np.ndarray) -> tuple[list[int], list[bool]]:
    """The raw sequence from one row's inputs and targets (both without their final EOS), read
    token by token, and which of its positions were corrupted."""
    spans: dict[int, list[int]] = {}
    current: list[int] = []
    for t in targets:
        if t in SENTINELS:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    raw, corrupted = [], []
    for t in enc:
        span = spans.pop(int(t)) if t in SENTINELS else [int(t)]
        raw += span
        corrupted += [t in SENTINELS] * len(span)
    assert not spans  # every target span was used
    return raw, corrupted


def span_batch(enc_len=128, density=0.15, mean_span=3.0, seed=0):
    obj = SpanCorruption(enc_len, seed, EOS, PAD, SENTINELS, density, mean_span)
    rows = packed_rows(TOKENS // obj.raw_len + 1, obj.raw_len)
    return obj, rows, obj(rows, np.arange(len(rows)))


@pytest.mark.parametrize("enc_len", [16, 128, 512])
def test_span_corruption_round_trips(enc_len):
    obj, rows, batch = span_batch(enc_len)
    real = batch["enc_padding_mask"]
    for i in range(0, len(rows), max(1, len(rows) // 150)):
        enc = batch["enc_tokens"][i][real[i]]
        assert enc[-1] == EOS and (batch["enc_tokens"][i][~real[i]] == PAD).all()
        targets = batch["targets"][i]
        assert targets[-1] == EOS
        assert decode(enc[:-1], targets[:-1])[0] == rows[i].astype(np.int64).tolist()
    # Decoder input is the targets shifted right behind the pad id.
    assert (batch["dec_tokens"][:, 0] == PAD).all()
    np.testing.assert_array_equal(batch["dec_tokens"][:, 1:], batch["targets"][:, :-1])
    assert batch["loss_mask"].all() and batch["dec_padding_mask"].all()
    assert batch["targets"].shape[1] == obj.dec_len and batch["enc_tokens"].shape[1] == enc_len


def test_span_corruption_round_trip_catches_a_wrong_row():
    """Negative control for the round trip: another row's targets do not decode."""
    _, rows, batch = span_batch(128)
    enc = batch["enc_tokens"][0][batch["enc_padding_mask"][0]][:-1]
    assert decode(enc, batch["targets"][1][:-1])[0] != rows[0].tolist()


# T5 fixes the noise tokens and spans of every sequence by rounding: a raw sequence of n
# tokens has round(n * density) noise tokens in round(noise / mean_span) spans. Aggregate rates
# would hold by construction, so the counts are checked row by row against that rule.
@pytest.mark.parametrize(
    "enc_len,density,mean_span", [(128, 0.15, 3.0), (512, 0.3, 8.0), (256, 0.5, 3.0)]
)
def test_span_statistics_match_the_settings(enc_len, density, mean_span):
    obj, rows, batch = span_batch(enc_len, density, mean_span)
    raw_tokens = rows.size
    assert raw_tokens >= TOKENS
    # Counted from the batches: sentinels in the inputs are the spans, target tokens that are
    # neither sentinels nor the final EOS are the corrupted tokens.
    real = batch["enc_padding_mask"]
    row_spans = np.isin(batch["enc_tokens"], SENTINELS).sum(axis=1)
    row_noise = (~np.isin(batch["targets"][:, :-1], SENTINELS)).sum(axis=1)
    n = rows.shape[1]
    assert set(row_noise.tolist()) == {round(n * density)}
    assert set(row_spans.tolist()) == {round(round(n * density) / mean_span)}
    spans, noise = row_spans.sum(), row_noise.sum()
    assert real.sum() == (raw_tokens - noise + spans + len(rows))
    # Span k of every row uses sentinel k, in order.
    first = batch["enc_tokens"][0][np.isin(batch["enc_tokens"][0], SENTINELS)]
    np.testing.assert_array_equal(first, SENTINELS[: len(first)])
    # The segmentation is random: span lengths vary, and corruption falls on the second and
    # third quarter of the sequences alike. As in T5 a sequence starts with a kept span and
    # ends with a corrupted one, which makes the ends differ.
    lengths = np.diff(np.flatnonzero(np.isin(batch["targets"][0], (*SENTINELS, EOS))))
    assert len(set(lengths.tolist())) > 1
    corrupted = np.array(
        [
            decode(e[r][:-1], t[:-1])[1]
            for e, r, t in zip(batch["enc_tokens"], real, batch["targets"], strict=True)
        ]
    )
    assert corrupted.shape == rows.shape
    assert not corrupted[:, 0].any() and corrupted[:, -1].all()
    q = rows.shape[1] // 4
    assert corrupted[:, q : 2 * q].mean() == pytest.approx(
        corrupted[:, 2 * q : 3 * q].mean(), rel=0.1
    )


def test_span_corruption_depends_on_seed_and_index_only():
    obj, rows, batch = span_batch(128)
    part = obj(rows[40:45], np.arange(40, 45))
    for key in batch:
        np.testing.assert_array_equal(part[key], batch[key][40:45])
    other = obj(rows[40:45], np.arange(40, 45) + 1000)
    assert not np.array_equal(other["targets"], part["targets"])
