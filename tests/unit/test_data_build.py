"""The dataset builder: sources, tokenizers, parallel encoding, shards, manifest, verify,
idempotency, CLI."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from data_pipeline import encode
from data_pipeline import writer as writer_module
from data_pipeline.build import BuildResult, build
from data_pipeline.cli import main
from data_pipeline.digest import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.shards import (
    SPLITS,
    SplitWriter,
    fingerprint,
    iter_shard,
    load_token_counts,
    read_dataset_info,
    read_manifest,
    verify,
    write_manifest,
)
from data_pipeline.sources import (
    SourceStats,
    iter_documents,
    resolve_inputs,
    sample_documents,
    stdlib_sources,
)
from data_pipeline.tokenizer import (
    BYTE_OFFSET,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    byte_symbols,
    sentinel_token,
)
from data_pipeline.workers import OrderedWorkers
from data_pipeline.writer import assign_splits, in_val_split

# Above the 359 that 256 bytes and the 103 special tokens take.
VOCAB = 400
SHARD_TOKENS = 400
VAL_FRACTION = 0.2
WORDS = "the a data model token shard loss train value field über naïve 日本 🙂 def return".split()
EXPECTED_SKIPPED = {
    "empty": 5,
    "undecodable": 6,
    "undecodable_by_reason": {"bad_utf8": 3, "bad_json": 1, "missing_field": 1, "not_text": 1},
}


def _text(rng: random.Random) -> str:
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(2, 9))]
    return "\n".join(lines) + "\n"


def _write_corpus(root: Path) -> list[str]:
    """Write txt + jsonl + parquet sources with every kind of bad document.

    Returns the usable documents in the order the builder reads them (sorted paths).
    """
    rng = random.Random(0)
    by_file: dict[Path, list[str]] = {}
    root.mkdir(parents=True)
    for i in range(12):
        path = root / f"doc{i:02d}.txt"
        by_file[path] = [_text(rng)]
        path.write_text(by_file[path][0], encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"  \n\t\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # bad UTF-8
    jsonl = [_text(rng) for _ in range(10)]
    lines = [json.dumps({"text": t}) for t in jsonl[:5]]
    lines += ['{"text": "unterminated', '{"body": "no text"}', '{"text": ""}', '{"text": 5}']
    lines += ['{"text": "lone surrogate \\ud800"}']
    lines += [json.dumps({"text": t, "meta": 1}) for t in jsonl[5:]]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    by_file[root / "more.jsonl"] = jsonl
    rows = [_text(rng) for _ in range(10)]
    raw = [r.encode() for r in rows[:4]] + [b"", None, b"caf\xe9"] + [r.encode() for r in rows[4:]]
    # A string column holding invalid UTF-8, which Arrow only notices on conversion.
    text = pa.array(raw, pa.binary()).view(pa.string())
    table = pa.table({"id": list(range(len(raw))), "text": text})
    pq.write_table(table, root / "rows.parquet", row_group_size=3)
    by_file[root / "rows.parquet"] = rows
    return [doc for path in sorted(by_file) for doc in by_file[path]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus") / "src"
    return root, _write_corpus(root)


def _build(corpus_dir: Path, out: Path, **overrides) -> BuildResult:
    args = dict(
        vocab_size=VOCAB,
        val_fraction=VAL_FRACTION,
        shard_tokens=SHARD_TOKENS,
        workers=1,
        progress=False,
    )
    return build([corpus_dir], out, **{**args, **overrides})


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "ds"
    _build(corpus[0], out)
    return out


def _expected_splits(dataset: Path, documents: list[str]) -> dict[str, list[np.ndarray]]:
    """Re-encode every document with the dataset's tokenizer and split them the same way."""
    tok = Tokenizer.load(dataset / "tokenizer.json")
    ids = (np.array(tok.encode(d), dtype=np.uint16) for d in documents)
    expected: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for split, arr in assign_splits(ids, seed=0, val_fraction=VAL_FRACTION):
        expected[split].append(arr)
    return expected


def test_sources_read_every_format_and_count_skips(corpus) -> None:
    root, documents = corpus
    stats = SourceStats()
    got = list(iter_documents(resolve_inputs([root]), stats=stats))
    assert got == documents
    assert stats.skipped() == EXPECTED_SKIPPED
    assert stats.first_example["bad_json"].endswith("more.jsonl:6")
    assert stats.first_example["bad_utf8"].endswith("latin1.txt")


def test_resolve_inputs_globs_exclusions_and_errors(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    assert resolve_inputs([str(root / "*.jsonl")]) == [root / "more.jsonl"]
    assert resolve_inputs([root / "rows.parquet", root]) == resolve_inputs([root])
    assert root / "rows.parquet" not in resolve_inputs([root], exclude=[root / "rows.parquet"])
    with pytest.raises(DataError, match="nope.txt"):
        resolve_inputs([root / "nope.txt"])
    with pytest.raises(DataError, match=r"\*.csv"):
        resolve_inputs([str(root / "*.csv")])
    with pytest.raises(DataError, match="text-field"):
        list(iter_documents([root / "rows.parquet"], text_field="body"))


def test_stdlib_sources_lists_the_standard_library() -> None:
    files = stdlib_sources()
    assert files == sorted(files)
    assert any(f.parts[-2:] == ("json", "__init__.py") for f in files)
    excluded = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    assert not any(excluded & set(f.parts) for f in files)


def test_tokenizer_training_is_deterministic(corpus, tmp_path: Path) -> None:
    documents = corpus[1]
    first = Tokenizer.train(iter(documents), vocab_size=VOCAB)
    second = Tokenizer.train(iter(documents), vocab_size=VOCAB)
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert first.sha256 == second.sha256 == file_sha256(tmp_path / "a.json")
    assert Tokenizer.load(tmp_path / "a.json").sha256 == first.sha256
    assert first.vocab_size == VOCAB
    other = Tokenizer.train(iter(documents[:5]), vocab_size=VOCAB)
    assert other.sha256 != first.sha256


def _check_fixed_special_ids(tok: Tokenizer) -> None:
    """The special tokens sit at the ids the format promises, looked up by name."""
    specials = tok.specials
    assert (specials.eos_id, specials.pad_id, specials.mask_id) == (0, 1, 2)
    assert specials.sentinel_ids == tuple(range(3, 103))
    for token in (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, sentinel_token(0), sentinel_token(99)):
        assert tok.decode([tok._hf.token_to_id(token)]) == token
    assert tok.decode([5]) == sentinel_token(2)
    described = tok.describe()
    assert described["sentinel_ids"] == list(range(3, 103))
    assert (described["eos_id"], described["pad_id"], described["mask_id"]) == (0, 1, 2)


def test_trained_and_byte_tokenizers_have_the_special_tokens_first(corpus) -> None:
    _check_fixed_special_ids(Tokenizer.train(iter(corpus[1]), vocab_size=VOCAB))
    _check_fixed_special_ids(Tokenizer.bytes())
    assert len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 103


def test_tokenizer_round_trips_text_and_never_emits_special_ids(corpus) -> None:
    tok = Tokenizer.train(iter(corpus[1]), vocab_size=VOCAB)
    texts = [*corpus[1][:3], "unseen: Ωμέγα ✓ \x00 tabs\t", f"a {EOS_TOKEN} b"]
    texts += [f"{MASK_TOKEN}{PAD_TOKEN} {sentinel_token(7)}"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts
    # Special tokens spelled out in a document are text, never special ids.
    assert all(min(ids) >= len(SPECIAL_TOKENS) for ids in batch[-2:])
    with pytest.raises(DataError, match="vocab"):
        Tokenizer.train(iter(texts), vocab_size=358)


def _random_text(rng: random.Random, length: int) -> str:
    """Any Unicode scalar values (no surrogates, which UTF-8 cannot encode), all planes."""
    chars = []
    for _ in range(length):
        plane = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        code = rng.randrange(plane)
        chars.append(chr(code if not 0xD800 <= code < 0xE000 else 0x41))
    return "".join(chars)


def test_byte_tokenizer_is_the_utf8_bytes_and_decode_inverts_it() -> None:
    tok = Tokenizer.bytes()
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS) == 359
    assert sorted(byte_symbols()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    texts += ["", " ", "\n\n  \t", f"{EOS_TOKEN}{sentinel_token(3)}", "\x00\x7f\x80ÿ"]
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids == [BYTE_OFFSET + b for b in text.encode("utf-8")]
        assert tok.decode(ids) == text
    # Negative control: the comparison sees a single changed byte.
    ids = tok.encode("abc")
    assert tok.decode([ids[0] + 1, *ids[1:]]) != "abc"
    # The numpy shortcut the builder takes for this tokenizer gives the same ids as the
    # tokenizers library; a copy saved in another layout takes the library's path.
    lengths, flat = tok.encode_flat(texts, np.uint16)
    assert tok.is_byte_tokenizer and flat.dtype == np.uint16
    assert lengths.tolist() == [len(t.encode("utf-8")) for t in texts]
    assert flat.tolist() == [i for ids in tok.encode_batch(texts) for i in ids]
    compact = Tokenizer(tok._hf.to_str(pretty=False).encode("utf-8"))
    assert not compact.is_byte_tokenizer
    assert compact.vocab_size == tok.vocab_size
    assert np.array_equal(compact.encode_flat(texts, np.uint16)[1], flat)


def test_shards_round_trip_through_webdataset(dataset: Path, corpus) -> None:
    expected = _expected_splits(dataset, corpus[1])
    info = read_dataset_info(dataset)
    assert info["dtype"] == "uint16"
    for split in SPLITS:
        urls = [str(dataset / s) for s in info["splits"][split]["shards"]]
        assert len(urls) >= 1
        reader = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        ).decode()
        samples = list(reader)
        assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(samples))]
        assert len(samples) == len(expected[split])
        for sample, want in zip(samples, expected[split], strict=True):
            assert sample["npy"].dtype == np.uint16
            np.testing.assert_array_equal(sample["npy"], want)
        ours = [ids for url in urls for _, ids in iter_shard(url)]
        assert all(np.array_equal(a, s["npy"]) for a, s in zip(ours, samples, strict=True))


def test_counts_are_consistent(dataset: Path, corpus) -> None:
    info = read_dataset_info(dataset)
    records = read_manifest(dataset)
    counts = load_token_counts(dataset)
    expected = _expected_splits(dataset, corpus[1])
    assert info["skipped"] == EXPECTED_SKIPPED
    assert info["tokenizer"]["sha256"] == file_sha256(dataset / "tokenizer.json")
    assert sum(info["splits"][s]["documents"] for s in SPLITS) == len(corpus[1])
    for split in SPLITS:
        rows = [r for r in records if r.split == split]
        entry = info["splits"][split]
        assert [r.shard for r in rows] == entry["shards"]
        assert sum(r.documents for r in rows) == entry["documents"] == len(expected[split])
        assert sum(r.tokens for r in rows) == entry["tokens"]
        for i, row in enumerate(rows):
            arrays = [ids for _, ids in iter_shard(dataset / row.shard)]
            assert (row.documents, row.tokens) == (len(arrays), sum(a.size for a in arrays))
            assert row.sha256 == file_sha256(dataset / row.shard)
            # A shard closes at the first document that brings it to shard_tokens.
            assert row.tokens - arrays[-1].size < SHARD_TOKENS
            assert i == len(rows) - 1 or row.tokens >= SHARD_TOKENS
        want = np.bincount(np.concatenate(expected[split]), minlength=VOCAB)
        assert counts[split].dtype == np.int64 and counts[split].shape == (VOCAB,)
        np.testing.assert_array_equal(counts[split], want)
    assert len([r for r in records if r.split == "train"]) >= 2


def test_verify_names_the_corrupt_or_missing_shard(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    report = verify(copy)
    assert report.shards == len(read_manifest(copy))
    assert report.fingerprint == read_dataset_info(copy)["fingerprint"]
    shard = copy / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape("train/train-000001.tar")):
        verify(copy)
    (copy / "val" / "val-000000.tar").unlink()
    with pytest.raises(DataError, match=re.escape("val/val-000000.tar")):
        verify(copy)


def test_verify_and_readers_name_a_truncated_shard(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    shard = copy / "train" / "train-000000.tar"
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size // 3)
    with pytest.raises(
        DataError, match=rf"train/train-000000.tar .* truncated .*{size // 3} bytes"
    ):
        verify(copy)
    with pytest.raises(DataError, match=r"train-000000.tar \(truncated or corrupt"):
        list(iter_shard(shard))


def _rewrite_shard(root: Path, shard: str, documents: list[np.ndarray]) -> None:
    """Replace a shard and update manifest and fingerprint to match, as a dataset assembled
    from another tokenizer's shards would look: only reading the ids can tell."""
    split = shard.split("/")[0]
    staging = root / "rewrite"
    writer = SplitWriter(staging, split, 1 << 30, documents[0].dtype)
    for ids in documents:
        writer.add(ids)
    (new,) = writer.close()
    (staging / new.shard).replace(root / shard)
    shutil.rmtree(staging)
    records = [
        replace(r, sha256=new.sha256, bytes=new.bytes) if r.shard == shard else r
        for r in read_manifest(root)
    ]
    write_manifest(root / "manifest.parquet", records)
    info = read_dataset_info(root)
    info["fingerprint"] = fingerprint(
        info["tokenizer"]["sha256"], info["sources_sha256"], info["settings"], records
    )
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")


def test_verify_checks_every_token_id_against_the_vocabulary(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    shard = "val/val-000000.tar"
    documents = [ids for _, ids in iter_shard(copy / shard)]
    # Same documents, same token count, so every count in the manifest still holds.
    _rewrite_shard(copy, shard, documents)
    assert verify(copy).tokens == read_dataset_info(copy)["splits"]["train"]["tokens"] + sum(
        d.size for d in documents
    )
    documents[1] = documents[1].copy()
    documents[1][-1] = VOCAB
    _rewrite_shard(copy, shard, documents)
    with pytest.raises(DataError, match=rf"{shard}, document 0000000001: token id {VOCAB} "):
        verify(copy)


def test_rebuild_is_a_noop_and_builds_are_reproducible(corpus, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus[0], src)
    out = tmp_path / "ds"
    first = _build(src, out)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    again = _build(src, out)
    assert (again.reused, again.fingerprint) == (True, first.fingerprint)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    # The fingerprint depends on content only: a second build elsewhere matches exactly.
    assert _build(src, tmp_path / "elsewhere").fingerprint == first.fingerprint
    (src / "doc00.txt").write_text("changed content\n", encoding="utf-8")
    changed = _build(src, out)
    assert not changed.reused and changed.fingerprint != first.fingerprint
    verify(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "elsewhere", "src"]


def test_failed_build_leaves_the_old_dataset_and_no_temp_dirs(
    corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    before = _build(corpus[0], out).fingerprint

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer_module, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _build(corpus[0], out, seed=1)
    assert verify(out).fingerprint == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_build_errors_are_clear_and_leave_nothing(corpus, tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("a single document\n", encoding="utf-8")
    with pytest.raises(DataError, match="training split is empty"):
        build([one], tmp_path / "ds", vocab_size=VOCAB, progress=False)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["one.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.me").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="not a dataset"):
        _build(corpus[0], other)
    assert (other / "keep.me").exists()
    with pytest.raises(DataError, match="val-fraction"):
        _build(corpus[0], tmp_path / "ds", val_fraction=1.0)
    with pytest.raises(DataError, match="--workers"):
        _build(corpus[0], tmp_path / "ds", workers=0)
    with pytest.raises(DataError, match="tokenizer-sample-mb"):
        _build(corpus[0], tmp_path / "ds", tokenizer_sample_mb=0)
    with pytest.raises(DataError, match=r"input '.*nothing\.txt' does not exist"):
        _build(tmp_path / "nothing.txt", tmp_path / "ds")
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(3):
        (blank / f"{i}.txt").write_text(" \n" * i, encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable documents.*skipped 3 empty"):
        _build(blank, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank", "one.txt", "other"]


def test_loaded_tokenizer_is_used_as_is(dataset: Path, corpus, tmp_path: Path) -> None:
    tokenizer = dataset / "tokenizer.json"
    result = build(
        [corpus[0]],
        tmp_path / "ds",
        tokenizer=tokenizer,
        val_fraction=VAL_FRACTION,
        shard_tokens=SHARD_TOKENS,
        progress=False,
    )
    assert result.info["tokenizer"]["sha256"] == file_sha256(tokenizer)
    assert result.info["splits"] == read_dataset_info(dataset)["splits"]
    with pytest.raises(DataError, match="drop --vocab-size"):
        build([corpus[0]], tmp_path / "x", tokenizer=tokenizer, vocab_size=512, progress=False)
    with pytest.raises(DataError, match=re.escape("not a valid tokenizer.json")):
        build([corpus[0]], tmp_path / "x", tokenizer=corpus[0] / "doc00.txt", progress=False)


def _foreign_tokenizer(path: Path, documents: list[str], specials: list[str]) -> Path:
    """A byte-level BPE made elsewhere, with only ``specials`` as special tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(documents, trainer=trainer)
    hf.save(str(path))
    return path


def test_loaded_tokenizer_records_missing_specials_as_null(corpus, tmp_path: Path) -> None:
    plain = _foreign_tokenizer(tmp_path / "plain.json", corpus[1], ["x", EOS_TOKEN])
    result = _build(corpus[0], tmp_path / "ds", tokenizer=plain, vocab_size=None)
    tok = result.info["tokenizer"]
    assert (tok["eos_id"], tok["pad_id"], tok["mask_id"], tok["sentinel_ids"]) == (
        1,
        None,
        None,
        [],
    )
    assert read_dataset_info(tmp_path / "ds")["tokenizer"]["pad_id"] is None
    # Sentinels count only as an unbroken run from <|extra_id_0|>.
    some = [EOS_TOKEN, MASK_TOKEN, sentinel_token(0), sentinel_token(1), sentinel_token(3)]
    partial = Tokenizer.load(_foreign_tokenizer(tmp_path / "partial.json", corpus[1], some))
    assert partial.describe()["mask_id"] == 1
    assert partial.describe()["sentinel_ids"] == [2, 3]
    no_eos = _foreign_tokenizer(tmp_path / "no_eos.json", corpus[1], [PAD_TOKEN])
    with pytest.raises(DataError, match=re.escape(f"no_eos.json has no {EOS_TOKEN} token")):
        _build(corpus[0], tmp_path / "x", tokenizer=no_eos, vocab_size=None)


def test_byte_tokenizer_dataset(corpus, tmp_path: Path) -> None:
    result = _build(corpus[0], tmp_path / "ds", tokenizer="bytes", vocab_size=None)
    info = result.info
    assert info["settings"]["tokenizer"] == "bytes"
    assert info["tokenizer"]["vocab_size"] == 359 and info["dtype"] == "uint16"
    assert info["tokenizer"]["sentinel_ids"] == list(range(3, 103))
    train = [
        ids for s in info["splits"]["train"]["shards"] for _, ids in iter_shard(tmp_path / "ds" / s)
    ]
    val = [
        ids for s in info["splits"]["val"]["shards"] for _, ids in iter_shard(tmp_path / "ds" / s)
    ]
    expected = {s: [] for s in SPLITS}
    raw = (
        np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.uint16) + BYTE_OFFSET
        for d in corpus[1]
    )
    for split, ids in assign_splits(raw, 0, VAL_FRACTION):
        expected[split].append(ids)
    for got, want in ((train, expected["train"]), (val, expected["val"])):
        assert len(got) == len(want)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(DataError, match="drop --vocab-size"):
        _build(corpus[0], tmp_path / "x", tokenizer="bytes")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_parallel_workers_write_identical_bytes(
    corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of a few documents, so that two workers take many chunks each.
    monkeypatch.setattr(encode, "CHUNK_BYTES", 300)
    tok = tmp_path / "tokenizer.json"
    Tokenizer.train(iter(corpus[1]), vocab_size=VOCAB).save(tok)
    one = _build(corpus[0], tmp_path / "one", tokenizer=tok, vocab_size=None, workers=1)
    two = _build(corpus[0], tmp_path / "two", tokenizer=tok, vocab_size=None, workers=2)
    assert not one.reused and not two.reused
    assert len(list(encode.chunk_documents(corpus[1], lambda: 0))) >= 8
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    assert one.fingerprint == two.fingerprint

    # Negative control: a pool that waits on the newest chunk's worker first changes the bytes.
    monkeypatch.setattr(OrderedWorkers, "_oldest", lambda self: self._in_flight.pop())
    shuffled = _build(corpus[0], tmp_path / "shuffled", tokenizer=tok, vocab_size=None, workers=2)
    assert shuffled.fingerprint != one.fingerprint
    assert _tree(tmp_path / "shuffled") != _tree(tmp_path / "one")


def test_progress_bar_shows_documents_tokens_rate_and_eta(
    corpus, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _build(corpus[0], tmp_path / "ds", progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    total = sum(p.stat().st_size for p in resolve_inputs([corpus[0]])) / 1000
    assert last.startswith("tokenizing: 100%")
    assert f"docs={len(corpus[1])}" in last and "tokens=" in last
    assert re.search(r"[\d.]+[kMG]?B/s", last) and "<00:00" in last
    assert f"/{total:.1f}k" in last
    _build(corpus[0], tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_tokenizer_sample_is_deterministic_bounded_and_spread(tmp_path: Path) -> None:
    files = []
    for i in range(40):
        path = tmp_path / f"f{i:02d}.jsonl"
        lines = [json.dumps({"text": f"file {i} doc {j} " + "x" * 90}) for j in range(200)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(path)
    sizes = [p.stat().st_size for p in files]
    budget = 2_000_000 // 4

    def sample() -> tuple[list[str], SourceStats]:
        stats = SourceStats()
        return list(sample_documents(files, sizes, budget, stats=stats)), stats

    first, stats = sample()
    assert first == sample()[0]
    assert budget <= stats.text_bytes < budget + 200
    # Whole documents, from many files, not just the first ones in corpus order.
    everything = list(iter_documents(files))
    assert set(first) <= set(everything) and first != everything[: len(first)]
    assert len({text.split()[1] for text in first}) >= 3
    # A corpus that fits the budget is taken whole, in order.
    assert list(sample_documents(files, sizes, sum(sizes))) == everything


def test_split_assignment() -> None:
    docs = [np.array([i], dtype=np.uint16) for i in range(3)]
    assert [s for s, _ in assign_splits(docs, seed=0, val_fraction=0)] == ["train"] * 3
    # No document hashes into val at this tiny fraction, so the last one is moved there.
    assert [s for s, _ in assign_splits(docs, seed=0, val_fraction=1e-9)][-1] == "val"
    # Otherwise the hash alone decides: a last document hashed into train stays there.
    many = [np.array([i], dtype=np.uint16) for i in range(20)]
    for seed in range(5):
        want = ["val" if in_val_split(seed, i, 0.3) else "train" for i in range(20)]
        assert [s for s, _ in assign_splits(many, seed, 0.3)] == want
    assert [s for s, _ in assign_splits(many, 0, 0.3)][-1] == "train"
    share = np.mean([in_val_split(7, i, 0.1) for i in range(20000)])
    assert 0.09 < share < 0.11
    assert [in_val_split(1, i, 0.5) for i in range(50)] != [
        in_val_split(2, i, 0.5) for i in range(50)
    ]


def test_cli_build_inspect_verify(corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    args = ["--vocab-size", str(VOCAB), "--shard-tokens", str(SHARD_TOKENS), "--no-progress"]
    assert main(["build", "--input", str(corpus[0]), "--out", str(out), *args]) == 0
    fingerprint = read_dataset_info(out)["fingerprint"]
    assert fingerprint in capsys.readouterr().out
    assert main(["build", "--input", str(corpus[0]), "--out", str(out), *args]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["inspect", str(out), "--tokens", "10", "--samples", "2"]) == 0
    shown = capsys.readouterr().out
    tok = Tokenizer.load(out / "tokenizer.json")
    shard = iter_shard(out / "train" / "train-000000.tar")
    first, second, third = (next(shard)[1] for _ in range(3))
    assert fingerprint in shown and tok.decode(first[:10].tolist()) in shown
    assert tok.decode(second[:10].tolist()) in shown
    assert tok.decode(third[:10].tolist()) not in shown
    assert "eos 0, pad 1, mask 2, sentinels 3..102 (100)" in shown
    for split in SPLITS:
        entry = read_dataset_info(out)["splits"][split]
        assert re.search(rf"{split}\s+{entry['documents']:,}\s+{entry['tokens']:,}\s", shown)
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    (out / "train" / "train-000000.tar").write_bytes(b"garbage")
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train/train-000000.tar" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no dataset.json" in capsys.readouterr().err


def test_cli_runs_as_a_module(dataset: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.cli", "verify", str(dataset)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert read_dataset_info(dataset)["fingerprint"] in result.stdout
