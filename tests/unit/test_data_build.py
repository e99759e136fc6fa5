"""The dataset builder: sources, tokenizer, shards, manifest, verify, idempotency, CLI."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipeline import build as build_module
from data_pipeline.build import assign_splits, build, in_val_split
from data_pipeline.cli import main
from data_pipeline.digest import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.shards import (
    SPLITS,
    iter_shard,
    load_token_counts,
    read_dataset_info,
    read_manifest,
    verify,
)
from data_pipeline.sources import SourceStats, iter_documents, resolve_inputs, stdlib_sources
from data_pipeline.tokenizer import EOS_TOKEN, Tokenizer

VOCAB = 300
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


def _build(corpus_dir: Path, out: Path, **overrides) -> build_module.BuildResult:
    args = dict(
        vocab_size=VOCAB, val_fraction=VAL_FRACTION, shard_tokens=SHARD_TOKENS, progress=False
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
    assert (first.vocab_size, first.eos_id, first.pad_id) == (VOCAB, 0, 1)
    other = Tokenizer.train(iter(documents[:5]), vocab_size=VOCAB)
    assert other.sha256 != first.sha256


def test_tokenizer_round_trips_text_and_never_emits_eos(corpus) -> None:
    tok = Tokenizer.train(iter(corpus[1]), vocab_size=VOCAB)
    texts = [*corpus[1][:3], "unseen: Ωμέγα ✓ \x00 tabs\t", f"a {EOS_TOKEN} b"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts
    assert tok.eos_id not in batch[-1]
    with pytest.raises(DataError, match="vocab"):
        Tokenizer.train(iter(texts), vocab_size=100)


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

    monkeypatch.setattr(build_module, "write_manifest", crash)
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
    assert main(["inspect", str(out), "--tokens", "10"]) == 0
    shown = capsys.readouterr().out
    tok = Tokenizer.load(out / "tokenizer.json")
    first = next(iter_shard(out / "train" / "train-000000.tar"))[1]
    assert fingerprint in shown and tok.decode(first[:10].tolist()) in shown
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
