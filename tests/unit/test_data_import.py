"""Importing already-tokenized data: Megatron-LM indexed datasets (written here by
megatron-core's own IndexedDatasetBuilder) and flat token files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.importers import import_tokens
from data_pipeline.shards import SPLITS, iter_shard, read_dataset_info, verify
from data_pipeline.tokenizer import BYTE_OFFSET, SPECIAL_TOKENS, Tokenizer, byte_symbols
from data_pipeline.writer import assign_splits

BYTES_VOCAB = 256 + len(SPECIAL_TOKENS)
EOS = 0  # <|endoftext|> in every tokenizer made here


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "bytes.json"
    Tokenizer.bytes().save(path)
    return path


def _big_tokenizer(path: Path, vocab_size: int) -> Path:
    """A tokenizer.json with ``vocab_size`` ids: our special tokens, the byte symbols, then
    filler tokens (enough to give every id a meaning; nothing is encoded with it)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"filler{len(vocab)}"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    hf.save(str(path))
    assert Tokenizer.load(path).vocab_size == vocab_size
    return path


def _documents(seed: int, count: int, vocab_size: int, top: bool = True) -> list[np.ndarray]:
    """Random documents of content ids (no special ids), the largest id in the first one."""
    rng = np.random.default_rng(seed)
    docs = [
        rng.integers(len(SPECIAL_TOKENS), vocab_size, size=int(rng.integers(1, 60)))
        for _ in range(count)
    ]
    if top:
        docs[0][-1] = vocab_size - 1
    return docs


def _write_megatron(prefix: Path, docs: list[np.ndarray], dtype: type) -> list[np.ndarray]:
    """Write ``docs`` with megatron-core's builder, as preprocess_data.py does with
    --append-eod, every third document split into two "sentences". Two more documents that
    are empty after the end-of-document id is removed are added in the middle.

    Returns what megatron's own reader sees: each document's sequences, concatenated.
    """
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, doc in enumerate(docs):
        tokens = torch.from_numpy(np.append(doc, EOS).astype(np.int64))
        if i % 3 == 2 and len(tokens) > 2:
            cut = len(tokens) // 2
            builder.add_item(tokens[:cut])
            builder.add_item(tokens[cut:])
            builder.end_document()
        else:
            builder.add_document(tokens, [len(tokens)])
        if i == len(docs) // 2:
            builder.end_document()  # a document of no sequences
            builder.add_document(torch.tensor([EOS]), [1])  # only its end-of-document id
    builder.finalize(f"{prefix}.idx")
    reader = IndexedDataset(str(prefix))
    bounds = reader.document_indices
    return [
        np.concatenate([reader[s] for s in range(bounds[d], bounds[d + 1])] or [np.zeros(0)])
        for d in range(len(bounds) - 1)
    ]


def _read_splits(out: Path) -> dict[str, list[np.ndarray]]:
    info = read_dataset_info(out)
    return {
        split: [
            ids for shard in info["splits"][split]["shards"] for _, ids in iter_shard(out / shard)
        ]
        for split in SPLITS
    }


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_megatron_import_round_trips_every_document(byte_tokenizer: Path, tmp_path: Path) -> None:
    docs = _documents(0, 120, BYTES_VOCAB)
    seen_by_megatron = _write_megatron(tmp_path / "corpus_text_document", docs, np.uint16)
    # Our reading of the format agrees with megatron's reader (its documents end in EOD).
    nonempty = [d for d in seen_by_megatron if d.size > 1]
    assert _same([d[:-1] for d in nonempty], docs)

    out = tmp_path / "ds"
    result = import_tokens(
        out,
        tokenizer=byte_tokenizer,
        megatron=[str(tmp_path / "corpus_text_document")],
        val_fraction=0,
        shard_tokens=500,
        progress=False,
    )
    info = result.info
    assert info["dtype"] == "uint16" and info["tokenizer"]["vocab_size"] == BYTES_VOCAB
    assert info["settings"]["source_format"] == "megatron"
    assert info["skipped"]["empty"] == 2
    assert info["imported"]["eos_stripped"] == len(docs) + 1
    imported = _read_splits(out)
    assert imported["val"] == [] and len(info["splits"]["train"]["shards"]) > 1
    assert _same(imported["train"], docs)
    assert all(d.dtype == np.uint16 for d in imported["train"])
    assert verify(out).documents == len(docs)
    again = import_tokens(
        out,
        tokenizer=byte_tokenizer,
        megatron=[str(tmp_path / "corpus_text_document.idx")],
        val_fraction=0,
        shard_tokens=500,
        progress=False,
    )
    assert again.reused and again.fingerprint == result.fingerprint

    # Negative control: one token changed in the .bin is seen by the same comparison.
    data = bytearray((tmp_path / "corpus_text_document.bin").read_bytes())
    data[10] ^= 1
    (tmp_path / "corpus_text_document.bin").write_bytes(bytes(data))
    changed = import_tokens(
        tmp_path / "changed",
        tokenizer=byte_tokenizer,
        megatron=[str(tmp_path / "corpus_text_document")],
        val_fraction=0,
        progress=False,
    )
    assert not _same(_read_splits(tmp_path / "changed")["train"], docs)
    assert changed.fingerprint != result.fingerprint


def test_megatron_int32_with_a_large_vocabulary_gives_uint32(tmp_path: Path) -> None:
    tokenizer = _big_tokenizer(tmp_path / "big.json", 70_000)
    docs = _documents(1, 40, 70_000)
    _write_megatron(tmp_path / "a", docs[:20], np.int32)
    _write_megatron(tmp_path / "b", docs[20:], np.int32)
    out = tmp_path / "ds"
    result = import_tokens(
        out,
        tokenizer=tokenizer,
        megatron=[str(tmp_path / "[ab]")],
        val_fraction=0.25,
        progress=False,
    )
    assert result.info["dtype"] == "uint32"
    assert result.info["sources"] == [
        str(tmp_path / f"{p}.{s}") for p in "ab" for s in ("idx", "bin")
    ]
    expected = {s: [] for s in SPLITS}
    for split, ids in assign_splits(iter(docs), seed=0, val_fraction=0.25):
        expected[split].append(ids)
    imported = _read_splits(out)
    assert len(imported["val"]) > 0
    for split in SPLITS:
        assert _same(imported[split], expected[split])
        assert all(d.dtype == np.uint32 for d in imported[split])
    assert max(int(d.max()) for d in imported["train"] + imported["val"]) == 69_999


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65_536, "uint16"), (65_537, "uint32")])
def test_flat_import_and_the_dtype_boundary(tmp_path: Path, vocab_size: int, dtype: str) -> None:
    tokenizer = _big_tokenizer(tmp_path / "tok.json", vocab_size)
    docs = _documents(2, 30, vocab_size)
    source = np.dtype(dtype).newbyteorder("<")
    # Separator after every document but the last; one empty document in the middle.
    pieces = []
    for i, doc in enumerate(docs):
        pieces += [doc, [EOS] if i < len(docs) - 1 else []]
        if i == 10:
            pieces.append([EOS])
    flat = tmp_path / "tokens.bin"
    np.concatenate(pieces).astype(source).tofile(flat)
    out = tmp_path / "ds"
    result = import_tokens(
        out,
        tokenizer=tokenizer,
        flat=[str(flat)],
        dtype=dtype,
        eos_id=EOS,
        val_fraction=0,
        progress=False,
    )
    assert result.info["dtype"] == dtype
    assert result.info["skipped"]["empty"] == 1
    imported = _read_splits(out)["train"]
    assert _same(imported, docs)
    assert max(int(d.max()) for d in imported) == vocab_size - 1
    verify(out)


def _flat_file(path: Path, ids: list[int], dtype: str = "uint16") -> Path:
    np.array(ids, dtype=np.dtype(dtype).newbyteorder("<")).tofile(path)
    return path


def test_import_errors_name_the_file_and_the_fix(byte_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "ds"

    def flat(path: Path, **kwargs) -> None:
        args = dict(tokenizer=byte_tokenizer, dtype="uint16", eos_id=EOS, progress=False)
        import_tokens(out, flat=[str(path)], **{**args, **kwargs})

    good = _flat_file(tmp_path / "good.bin", [200, 201, EOS, 202, EOS, 203])
    bad_id = _flat_file(tmp_path / "bad.bin", [200, EOS, 201, BYTES_VOCAB, 5, EOS, 7])
    with pytest.raises(DataError, match=rf"bad.bin, document 1: token id {BYTES_VOCAB} is outside"):
        flat(bad_id)
    with pytest.raises(DataError, match="no usable documents.*skipped 3 empty"):
        flat(_flat_file(tmp_path / "empty.bin", [EOS, EOS, EOS]))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"odd.bin has 3 bytes, not a multiple of 2"):
        flat(odd)
    with pytest.raises(DataError, match=r"--flat '.*nope\*.bin' matches no file"):
        flat(tmp_path / "nope*.bin")
    with pytest.raises(DataError, match="pass --dtype"):
        flat(good, dtype=None)
    with pytest.raises(DataError, match="pass --eos-id"):
        flat(good, eos_id=None)
    with pytest.raises(DataError, match="exactly one kind of input"):
        import_tokens(out, tokenizer=byte_tokenizer, flat=[str(good)], megatron=["x"])
    # Nothing was written by any of them.
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    def megatron(prefix: str, **kwargs) -> None:
        import_tokens(out, tokenizer=byte_tokenizer, megatron=[prefix], progress=False, **kwargs)

    prefix = tmp_path / "m"
    _write_megatron(prefix, _documents(3, 10, BYTES_VOCAB), np.uint16)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/missing.idx does not exist")):
        megatron(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="matches no .idx file"):
        megatron(str(tmp_path / "zz*"))
    with pytest.raises(DataError, match="drop --dtype"):
        megatron(str(prefix), dtype="uint16")
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    index_bytes, data = idx.read_bytes(), bin_.read_bytes()
    bin_.write_bytes(data[:-4])
    with pytest.raises(DataError, match=rf"m.bin is truncated: the index needs {len(data)} bytes"):
        megatron(str(prefix))
    bin_.write_bytes(data)
    idx.write_bytes(index_bytes[:-8])
    with pytest.raises(DataError, match=r"m.idx is truncated or corrupt"):
        megatron(str(prefix))
    idx.write_bytes(b"NOTMEGA" + index_bytes[7:])
    with pytest.raises(DataError, match=r"m.idx is not a Megatron-LM index \(magic"):
        megatron(str(prefix))
    idx.write_bytes(index_bytes)
    signed = tmp_path / "signed"
    docs = _documents(4, 5, BYTES_VOCAB)
    docs[3][2] = -7
    _write_megatron(signed, docs, np.int32)
    # Megatron's numbering: _write_megatron put two empty documents after document 2.
    with pytest.raises(DataError, match=r"signed.bin, document 5: token id -7 is outside"):
        megatron(str(signed))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    megatron(str(prefix))  # the restored pair imports
    verify(out)


def test_cli_import_inspect_verify(
    byte_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    docs = _documents(5, 50, BYTES_VOCAB, top=False)
    _write_megatron(tmp_path / "m", docs, np.uint16)
    out = tmp_path / "ds"
    common = ["--tokenizer", str(byte_tokenizer), "--out", str(out), "--no-progress"]
    assert main(["import", "--megatron", str(tmp_path / "m"), *common]) == 0
    printed = capsys.readouterr().out
    assert "imported in" in printed and read_dataset_info(out)["fingerprint"] in printed
    assert main(["inspect", str(out), "--samples", "1", "--tokens", "5"]) == 0
    shown = capsys.readouterr().out
    first = next(iter_shard(out / "train" / "train-000000.tar"))[1]
    # The byte tokenizer decodes ids back to the bytes they stand for.
    assert bytes(int(i) - BYTE_OFFSET for i in first[:5]).decode("utf-8", "replace") in shown
    assert main(["verify", str(out)]) == 0
    assert "every id below the vocabulary size 359" in capsys.readouterr().out

    flat = _flat_file(tmp_path / "f.bin", [300, 301, EOS, 302])
    flat_out = ["--tokenizer", str(byte_tokenizer), "--out", str(tmp_path / "flat")]
    assert main(["import", "--flat", str(flat), "--dtype", "uint16", *flat_out]) == 2
    assert "pass --eos-id" in capsys.readouterr().err
    args = ["--dtype", "uint16", "--eos-id", "0", "--val-fraction", "0", "--no-progress"]
    assert main(["import", "--flat", str(flat), *args, *flat_out]) == 0
    assert _same(_read_splits(tmp_path / "flat")["train"], [np.array([300, 301]), np.array([302])])
