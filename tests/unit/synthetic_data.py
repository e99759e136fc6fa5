"""Dataset directories written directly in the on-disk format, with chosen token ids.

The loader tests need data whose content they control: tokens that identify their own stream
position or their dataset, exact special ids, a given vocabulary. The shards go through the
builder's own SplitWriter, so they are real webdataset shards; dataset.json, the manifest and
the token counts are written as the builder writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.digest import file_sha256, json_sha256
from data_pipeline.shards import FORMAT_VERSION, SplitWriter, token_dtype, write_manifest

EOS, PAD, MASK = 0, 1, 2
SENTINELS = tuple(range(3, 103))
FIRST_ID = 103  # the first ordinary token id


def write_dataset(
    root: Path,
    docs: dict[str, list[np.ndarray]],
    vocab_size: int,
    shard_tokens: int = 200,
    mask_id: int | None = MASK,
    sentinel_ids: tuple[int, ...] = SENTINELS,
    tokenizer_tag: str = "synthetic",
) -> Path:
    """A dataset at `root` holding `docs` (lists of id arrays per split, in order).

    `tokenizer_tag` stands for the tokenizer's identity: datasets with the same tag count as
    built with the same tokenizer.
    """
    root.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    (root / "tokenizer.json").write_text(json.dumps({"tag": tokenizer_tag}))
    counts, records, splits = {}, [], {}
    for split in ("train", "val"):
        writer = SplitWriter(root, split, shard_tokens, dtype)
        for doc in docs.get(split, []):
            writer.add(np.asarray(doc, dtype=dtype))
        split_records = writer.close()
        records += split_records
        ids = [np.asarray(d, dtype=np.int64) for d in docs.get(split, [])]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        counts[split] = np.bincount(flat, minlength=vocab_size).astype(np.int64)
        splits[split] = {
            "documents": writer.documents,
            "tokens": writer.tokens,
            "shards": [r.shard for r in split_records],
        }
    np.savez(root / "token_counts.npz", **counts)
    write_manifest(root / "manifest.parquet", records)
    tokenizer = {
        "file": "tokenizer.json",
        "sha256": file_sha256(root / "tokenizer.json"),
        "vocab_size": vocab_size,
        "eos_id": EOS,
        "pad_id": PAD,
        "mask_id": mask_id,
        "sentinel_ids": list(sentinel_ids),
    }
    info = {
        "format_version": FORMAT_VERSION,
        "fingerprint": json_sha256([tokenizer, [r.sha256 for r in records]]),
        "dtype": dtype.name,
        "tokenizer": tokenizer,
        "settings": {"vocab_size": vocab_size, "shard_tokens": shard_tokens},
        "splits": splits,
        "skipped": {},
        "sources_sha256": "",
        "sources": [],
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))
    return root


def serial_docs(n_tokens: int, seed: int, first: int = FIRST_ID, max_len: int = 20):
    """Documents of random lengths (1 .. max_len) whose tokens are first, first + 1, ...: every
    ordinary token occurs once, so a token tells its position in the split."""
    rng = np.random.default_rng(seed)
    docs, start = [], first
    while start < first + n_tokens:
        n = int(min(rng.integers(1, max_len + 1), first + n_tokens - start))
        docs.append(np.arange(start, start + n))
        start += n
    return docs


def random_docs(n_tokens: int, seed: int, low: int, high: int, max_len: int = 400):
    """Documents of random lengths holding uniform ids in [low, high)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(1, max_len + 1))
        docs.append(rng.integers(low, high, n))
        total += n
    return docs
