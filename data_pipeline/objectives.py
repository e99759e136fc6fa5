"""Training objectives: packed sequences in, the model's batch dict out.

An objective is called with a batch of sequences cut from the packed stream ([n, raw_len +
overlap] token ids) and their global sequence indices ([n]). Whatever it draws at random is a
hash of (seed, global index, position), never the state of a generator, so a batch depends only
on which sequences it holds: a resumed run, another data-parallel size or another number of
loader workers produce the same batches. Everything is vectorised over the batch.

Batch keys (the model takes them as keyword arguments):

- causal: tokens [n, L], targets [n, L] (shifted by one), and doc_ids [n, L] with
  document_mask (index of each token's document inside its sequence; an end-of-document token
  belongs to the document it ends).
- mlm (BERT): tokens [n, L] (corrupted), targets [n, L] (original ids), loss_mask [n, L]
  float32 (1.0 where chosen for prediction), padding_mask [n, L] bool (True: real token).
- span (T5): enc_tokens [n, Le], dec_tokens [n, Ld] (targets shifted right behind the pad id),
  targets [n, Ld], loss_mask [n, Ld] float32, enc_padding_mask [n, Le], dec_padding_mask [n, Ld].
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from data_pipeline.dataset import DatasetInfo
from data_pipeline.errors import DataError

OBJECTIVES = ("causal", "mlm", "span")
_U64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finaliser multipliers
_GOLDEN64, _M1_64, _M2_64 = np.uint64(_GOLDEN), np.uint64(_M1), np.uint64(_M2)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
# Independent random streams per purpose, so that changing one draw moves no other.
STREAM_CHOOSE, STREAM_REPLACE, STREAM_RANDOM_ID, STREAM_NOISE, STREAM_KEEP = 1, 2, 3, 4, 5


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int: a bijection of 64-bit values."""
    x ^= x >> 30
    x = (x * _M1) & _U64
    x ^= x >> 27
    x = (x * _M2) & _U64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """The same finaliser on a uint64 array (arrays wrap on overflow without a warning)."""
    x = x ^ (x >> _S30)
    x *= _M1_64
    x ^= x >> _S27
    x *= _M2_64
    return x ^ (x >> _S31)


def hash_uniform(seed: int, stream: int, index: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) that are a pure function of (seed, stream, global index, position);
    `index` and `pos` are arrays that broadcast against each other (e.g. [n, 1] and [1, L]).

    Two levels of splitmix64: the (seed, stream) key seeds one sequence read at each global
    index, and that value seeds another read at each position. Statistically sound for
    sampling masks, and as fast as numpy's own generators on whole batches.
    """
    key = np.uint64(_mix_int((seed & _U64) ^ _mix_int(stream)))
    row = _mix(np.asarray(index).astype(np.uint64) * _GOLDEN64 + key)
    h = _mix(row + (np.asarray(pos).astype(np.uint64) + np.uint64(1)) * _GOLDEN64)
    return (h >> _S11).astype(np.float64) * 2.0**-53


class Objective(Protocol):
    name: str
    seq_len: int  # the model's sequence length (the encoder's for span corruption)
    raw_len: int  # tokens taken from the packed stream per sequence (stride)
    overlap: int  # extra tokens read past the stride (1 for causal: the last target)

    def describe(self) -> dict[str, Any]: ...

    def emitted_ids(self) -> tuple[int, ...]: ...

    def __call__(self, rows: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]: ...


class Causal:
    """Next-token prediction on packed sequences of L + 1 tokens."""

    name = "causal"
    overlap = 1

    def __init__(self, seq_len: int, eos_id: int, document_mask: bool = False):
        self.seq_len = self.raw_len = seq_len
        self.eos_id, self.document_mask = eos_id, document_mask

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "document_mask": self.document_mask}

    def emitted_ids(self) -> tuple[int, ...]:
        return ()

    def __call__(self, rows: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        ids = rows.astype(np.int64)  # embedding lookups take int64 ids
        tokens = np.ascontiguousarray(ids[:, :-1])
        batch = {"tokens": tokens, "targets": np.ascontiguousarray(ids[:, 1:])}
        if self.document_mask:
            ends = tokens == self.eos_id
            batch["doc_ids"] = np.cumsum(ends, axis=1) - ends
        return batch


class MaskedLM:
    """BERT's masked language modelling on packed sequences of L tokens.

    In each sequence round(mask_prob * m) of its m non-special positions (at least one) are
    chosen, uniformly, as in BERT's create_pretraining_data; each chosen position then becomes
    the mask token with probability `mask_token`, a random non-special token with probability
    `random_token`, and stays as it is otherwise. Sequences are not padded (packing fills them).
    """

    name = "mlm"
    overlap = 0

    def __init__(
        self,
        seq_len: int,
        seed: int,
        vocab_size: int,
        mask_id: int,
        special_ids: tuple[int, ...],
        mask_prob: float = 0.15,
        mask_token: float = 0.8,
        random_token: float = 0.1,
    ):
        self.seq_len = self.raw_len = seq_len
        self.seed, self.mask_id, self.mask_prob = seed, int(mask_id), mask_prob
        self.mask_token, self.random_token = mask_token, random_token
        self.special = np.array(sorted({*special_ids, self.mask_id}), dtype=np.int64)
        self.candidates = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special)
        # A lookup table is several times faster than np.isin on small batches. Ids past the
        # table (data beyond the tokenizer, refused by check_vocab) read its last entry.
        self._is_special = np.zeros(max(vocab_size, int(self.special.max()) + 1) + 1, bool)
        self._is_special[self.special] = True
        if len(self.candidates) == 0:
            raise DataError(f"a vocabulary of {vocab_size} has no non-special token to sample")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mask_prob": self.mask_prob,
            "mask_token": self.mask_token,
            "random_token": self.random_token,
            "mask_id": self.mask_id,
        }

    def emitted_ids(self) -> tuple[int, ...]:
        return (self.mask_id, int(self.candidates[-1]))

    def __call__(self, rows: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        ids = rows.astype(np.int64)
        n, L = ids.shape
        g = np.asarray(index, dtype=np.int64)[:, None]
        special = np.take(self._is_special, ids, mode="clip")
        eligible = L - special.sum(axis=1)
        k = np.where(eligible > 0, np.maximum(1, np.rint(eligible * self.mask_prob)), 0)
        k = k.astype(np.int64)
        # The k smallest of uniform keys are a uniform k-subset; special positions get keys
        # above every uniform so they are never among them.
        keys = hash_uniform(self.seed, STREAM_CHOOSE, g, np.arange(L)[None, :])
        keys[special] = 2.0
        kth = np.sort(keys, axis=1)[np.arange(n), np.maximum(k - 1, 0)]
        chosen = (keys <= kth[:, None]) & (k[:, None] > 0) & ~special
        r, c = np.nonzero(chosen)
        u = hash_uniform(self.seed, STREAM_REPLACE, g[r, 0], c)
        tokens = ids.copy()
        to_mask = u < self.mask_token
        tokens[r[to_mask], c[to_mask]] = self.mask_id
        rand = (u >= self.mask_token) & (u < self.mask_token + self.random_token)
        rr, rc = r[rand], c[rand]
        pick = hash_uniform(self.seed, STREAM_RANDOM_ID, g[rr, 0], rc)
        tokens[rr, rc] = self.candidates[(pick * len(self.candidates)).astype(np.int64)]
        return {
            "tokens": tokens,
            "targets": ids,
            "loss_mask": chosen.astype(np.float32),
            "padding_mask": np.ones((n, L), dtype=bool),
        }


def span_counts(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw sequence, rounded as T5 does, and clamped so that
    every noise span and every span between them holds at least one token."""
    noise = min(max(round(raw_len * noise_density), 1), raw_len - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, min(spans, noise, raw_len - noise)


def span_lengths(enc_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(raw_len, dec_len): the longest raw sequence whose corrupted form (kept tokens, one
    sentinel per noise span, EOS) fits in `enc_len`, and the length of its targets (noise
    tokens, one sentinel per span, EOS). The same search as T5's random_spans_helper."""
    if enc_len < 4:
        raise DataError(f"span corruption needs model.seq_len >= 4, got {enc_len}")

    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = span_counts(raw, noise_density, mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    raw = enc_len - 1  # fits: at least one noise token is dropped for each sentinel added
    while lengths(raw + 1)[0] <= enc_len:
        raw += 1
    return raw, lengths(raw)[1]


def _segment(total: int, parts: int, keys: np.ndarray) -> np.ndarray:
    """[n, parts] positive lengths summing to `total`, uniform over such compositions: the cut
    points are the `parts - 1` smallest of `total - 1` uniform keys per row."""
    n = keys.shape[0]
    if parts == 1:
        return np.full((n, 1), total, dtype=np.int64)
    cuts = np.argpartition(keys, parts - 2, axis=1)[:, : parts - 1] + 1
    cuts.sort(axis=1)
    bounds = np.concatenate(
        [np.zeros((n, 1), np.int64), cuts, np.full((n, 1), total, np.int64)], axis=1
    )
    return np.diff(bounds, axis=1)


class SpanCorruption:
    """T5's span corruption with a fixed encoder length.

    A raw sequence of raw_len tokens is split into alternating kept and noise spans, starting
    with a kept span and ending with a noise span, the noise spans holding noise_density of the
    tokens with mean length mean_span. Inputs: the kept spans with noise span k replaced by
    sentinel k, then EOS, padded to seq_len. Targets: sentinel k followed by noise span k, for
    every k, then EOS. Inputs and targets together give back the raw sequence exactly.
    """

    name = "span"
    overlap = 0

    def __init__(
        self,
        seq_len: int,
        seed: int,
        eos_id: int,
        pad_id: int,
        sentinel_ids: tuple[int, ...],
        noise_density: float = 0.15,
        mean_span: float = 3.0,
    ):
        self.seq_len, self.seed, self.eos_id, self.pad_id = seq_len, seed, eos_id, pad_id
        self.noise_density, self.mean_span = noise_density, mean_span
        self.raw_len, self.dec_len = span_lengths(seq_len, noise_density, mean_span)
        self.noise, self.spans = span_counts(self.raw_len, noise_density, mean_span)
        if len(sentinel_ids) < self.spans:
            raise DataError(
                f"span corruption of {self.raw_len} raw tokens (seq_len {seq_len}) makes "
                f"{self.spans} noise spans, but the tokenizer has only {len(sentinel_ids)} "
                f"sentinel ids; raise data.mean_span, lower data.noise_density or "
                f"model.seq_len, or rebuild the data with more sentinel tokens"
            )
        self.sentinels = np.asarray(sentinel_ids[: self.spans], dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "noise_density": self.noise_density,
            "mean_span": self.mean_span,
            "raw_len": self.raw_len,
            "dec_len": self.dec_len,
        }

    def emitted_ids(self) -> tuple[int, ...]:
        return (self.eos_id, self.pad_id, *map(int, self.sentinels))

    def __call__(self, rows: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        ids = rows.astype(np.int64)
        n, R = ids.shape
        N, S = self.noise, self.spans
        g = np.asarray(index, dtype=np.int64)[:, None]
        noise_len = _segment(N, S, hash_uniform(self.seed, STREAM_NOISE, g, np.arange(N - 1)))
        keep_len = _segment(R - N, S, hash_uniform(self.seed, STREAM_KEEP, g, np.arange(R - N - 1)))
        # Span j (0 .. 2S-1) of each row: kept span j // 2 when j is even, noise span j // 2
        # when odd; every row has the same total R, so the flat repeat reshapes to [n, R].
        lengths = np.stack([keep_len, noise_len], axis=2).reshape(-1)
        span = np.repeat(np.tile(np.arange(2 * S), n), lengths).reshape(n, R)
        noise = (span & 1).astype(bool)
        first = np.ones((n, R), dtype=bool)
        first[:, 1:] = span[:, 1:] != span[:, :-1]
        sentinel = self.sentinels[span >> 1]
        enc = np.where(noise, sentinel, ids)[~noise | first].reshape(n, R - N + S)
        dec = np.where(noise, ids, sentinel)[noise | first].reshape(n, N + S)
        eos = np.full((n, 1), self.eos_id, dtype=np.int64)
        enc_tokens = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        enc_tokens[:, : R - N + S + 1] = np.concatenate([enc, eos], axis=1)
        enc_padding = np.zeros((n, self.seq_len), dtype=bool)
        enc_padding[:, : R - N + S + 1] = True
        targets = np.concatenate([dec, eos], axis=1)
        dec_tokens = np.concatenate([np.full((n, 1), self.pad_id, np.int64), targets[:, :-1]], 1)
        return {
            "enc_tokens": enc_tokens,
            "dec_tokens": dec_tokens,
            "targets": targets,
            "loss_mask": np.ones(targets.shape, dtype=np.float32),
            "enc_padding_mask": enc_padding,
            "dec_padding_mask": np.ones(targets.shape, dtype=bool),
        }


def make_objective(
    name: str,
    info: DatasetInfo,
    seq_len: int,
    seed: int,
    document_mask: bool = False,
    mask_prob: float = 0.15,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> Objective:
    """The objective `name` with the special ids of `info`'s tokenizer; DataError when the
    dataset lacks an id the objective needs."""
    if name == "causal":
        return Causal(seq_len, info.eos_id, document_mask)
    if name == "mlm":
        mask_id = info.require("mask_id", "mlm")
        return MaskedLM(seq_len, seed, info.vocab_size, mask_id, info.special_ids, mask_prob)
    if name == "span":
        sentinels = info.require("sentinel_ids", "span corruption")
        return SpanCorruption(
            seq_len, seed, info.eos_id, info.pad_id, sentinels, noise_density, mean_span
        )
    raise DataError(f"unknown objective {name!r}; use one of {list(OBJECTIVES)}")
