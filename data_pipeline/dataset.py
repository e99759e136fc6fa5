"""A built dataset directory as the loader sees it: metadata, special ids, shard streams.

The directory format is described in ``data_pipeline.shards``; this module reads it fast and
checks what the loader relies on, raising DataError with the fix.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

REBUILD = "rebuild it with the current `pretrain-data build`"
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Shard:
    path: Path
    documents: int
    tokens: int
    sha256: str | None = None  # from the manifest: checked when a shard is read whole
    bytes: int | None = None
    # The shard's range index (data_pipeline.shard_index); None in datasets built before it,
    # which are then read whole.
    index_sha256: str | None = None
    index_bytes: int | None = None

    @property
    def stream_length(self) -> int:
        """Tokens this shard contributes to the stream: its documents plus one EOS each."""
        return self.tokens + self.documents


class DatasetInfo:
    """The metadata of a dataset directory written by `pretrain-data build`."""

    def __init__(self, path: str | Path):
        # The one reader of dataset.json and the manifest (shards imports this module).
        from data_pipeline.shards import read_dataset_info

        self.path = Path(path)
        meta_file = self.path / "dataset.json"
        if not meta_file.is_file():
            raise DataError(
                f"no dataset at {self.path} (missing dataset.json); build one with "
                f"`pretrain-data build --out {self.path} ...` or fix data.path"
            )
        self.meta = read_dataset_info(self.path)  # keys, format version, dtype, splits
        try:
            self.fingerprint: str = self.meta["fingerprint"]
            self.dtype = np.dtype(self.meta["dtype"])
            tok = self.meta["tokenizer"]
            self.vocab_size: int = int(tok["vocab_size"])
            self.eos_id: int = int(tok["eos_id"])
            self.tokenizer_sha256: str = tok["sha256"]
            self.tokenizer_file = self.path / tok["file"]
            # Padding falls back to the end-of-document id for tokenizers without a pad
            # token: padded positions are masked anyway. Mask and sentinels are optional
            # (datasets built before they existed); the objectives that need them say so.
            pad_id, mask_id = tok.get("pad_id"), tok.get("mask_id")
            self.pad_id: int = self.eos_id if pad_id is None else int(pad_id)
            self.mask_id: int | None = None if mask_id is None else int(mask_id)
            self.sentinel_ids = tuple(int(i) for i in tok.get("sentinel_ids") or ())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {meta_file} ({e!r}); {REBUILD}") from None
        self.tokenizer: dict = tok
        self.shards = self._read_manifest()

    def _read_manifest(self) -> dict[str, list[Shard]]:
        from data_pipeline.shards import read_manifest

        shards: dict[str, list[Shard]] = {}
        for row in read_manifest(self.path):
            shard = Shard(
                self.path / row.shard,
                row.documents,
                row.tokens,
                row.sha256,
                row.bytes,
                row.index_sha256,
                row.index_bytes,
            )
            shards.setdefault(row.split, []).append(shard)
        return shards

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that never occur inside a document: end of document, padding, mask, sentinels."""
        ids = {self.eos_id, self.pad_id, *self.sentinel_ids}
        if self.mask_id is not None:
            ids.add(self.mask_id)
        return tuple(sorted(ids))

    def require(self, name: str, objective: str):
        """The tokenizer id(s) `name` ("mask_id", "sentinel_ids"), or DataError naming the fix."""
        value = getattr(self, name)
        if value is None or value == ():
            raise DataError(
                f"the {objective} objective needs the tokenizer's {name}, which "
                f"{self.path / 'dataset.json'} does not have (it was built before special "
                f"tokens for it existed); {REBUILD}"
            )
        return value

    def split(self, name: str) -> list[Shard]:
        shards = self.shards.get(name, [])
        if not shards or sum(s.stream_length for s in shards) == 0:
            raise DataError(
                f"dataset {self.path} has no '{name}' split (or an empty one); rebuild it "
                f"with a non-zero share for that split"
                + (" (--val-fraction, e.g. 0.02)" if name == "val" else "")
            )
        return shards

    def check_sizes(self, split: str) -> None:
        """DataError unless every shard of `split` exists with the manifest's size: a stat per
        shard, cheap enough before every run (read_shard_stream checks contents later)."""
        for shard in self.split(split):
            try:
                size = shard.path.stat().st_size
            except OSError as e:
                raise DataError(f"cannot read shard {shard.path} ({e}); {SHARD_FIX}") from None
            check_digest(shard.path, size, "", shard.bytes, None)
            if shard.index_bytes is not None:
                from data_pipeline.shard_index import index_path

                index = index_path(shard.path)
                try:
                    size = index.stat().st_size
                except OSError as e:
                    raise DataError(f"cannot read shard index {index} ({e}); {SHARD_FIX}") from None
                check_digest(index, size, "", shard.index_bytes, None)

    def max_token_id(self) -> int:
        """The largest id the loader can serve from this dataset, from token_counts.npz (no
        shard is read): the largest id counted in either split, or the end-of-document id."""
        path = self.path / "token_counts.npz"
        try:
            with np.load(path) as counts:
                top = [int(np.flatnonzero(counts[s]).max(initial=-1)) for s in counts.files]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read {path} ({e}); {REBUILD}") from None
        return max([self.eos_id, *top])


def check_vocab(info: DatasetInfo, vocab_size: int, emitted: tuple[int, ...] = ()) -> None:
    """DataError unless every id the data holds, and every id in `emitted` (the special ids
    an objective writes into batches), is below the model's embedding size `vocab_size`."""
    data_top = info.max_token_id()
    top = max([data_top, *emitted])
    if top >= vocab_size:
        what = "its token counts hold" if top == data_top else "the objective emits"
        raise DataError(
            f"dataset {info.path}: {what} id {top}, but the model has only {vocab_size} "
            f"embedding rows; set model.vocab_size to at least {top + 1} (or null to take the "
            f"tokenizer's size), or use data built with a tokenizer of that model"
        )


SHARD_FIX = (
    "run `pretrain-data verify` on the dataset to check the other shards, then restore the "
    "shard from a copy or rebuild the dataset"
)


def check_digest(
    shard: str | Path,
    size: int,
    sha256: str,
    expected_bytes: int | None,
    expected_sha256: str | None,
) -> None:
    """DataError unless a shard's size and sha256 are the manifest's (None: not recorded)."""
    if expected_bytes is not None and size != expected_bytes:
        raise DataError(
            f"shard {shard} is truncated or corrupt: {size} bytes, the manifest says "
            f"{expected_bytes}; {SHARD_FIX}"
        )
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise DataError(
            f"shard {shard} is corrupt: sha256 {sha256[:12]} != {expected_sha256[:12]} in the "
            f"manifest; {SHARD_FIX}"
        )


def read_shard_stream(
    shard: Shard, eos_id: int, dtype: np.dtype | None = None, verify: bool = False
) -> np.ndarray:
    """All documents of one shard, each followed by EOS, as one array in the shard's token
    dtype (uint16 for vocabularies up to 65536: a quarter of int64's memory in the window).
    With `verify`, the bytes are first checked against the manifest's size and sha256, which
    catches corruption that keeps every id in range (hashing costs a fraction of the read).

    The tar members are located with tarfile and their npy payloads viewed in place, which
    reads a shard several times faster than decoding it sample by sample.
    """
    try:
        data = shard.path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard {shard.path} ({e}); {SHARD_FIX}") from None
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        check_digest(shard.path, len(data), digest, shard.bytes, shard.sha256)
    docs = [member_ids(data, m) for m in shard_members(data, shard.path)]
    tokens = sum(len(d) for d in docs)
    if len(docs) != shard.documents or tokens != shard.tokens:
        raise DataError(
            f"shard {shard.path} holds {tokens} tokens in {len(docs)} documents, the "
            f"manifest says {shard.tokens} in {shard.documents}: it is truncated or corrupt; "
            f"{SHARD_FIX}"
        )
    if dtype is None:
        dtype = docs[0].dtype if docs else np.dtype(np.uint32)
    dtype = np.dtype(dtype)
    stream = np.empty(tokens + len(docs), dtype=dtype)
    pos = 0
    for doc in docs:
        if doc.dtype != dtype:
            raise DataError(
                f"shard {shard.path} holds {doc.dtype} ids where the dataset has {dtype}; "
                f"rebuild the dataset"
            )
        stream[pos : pos + len(doc)] = doc
        stream[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    return stream


@dataclass(frozen=True)
class Member:
    """One document of a shard: where its token ids lie in the shard's bytes."""

    key: str
    offset: int  # byte offset of the first token id
    dtype: np.dtype
    count: int


def shard_members(data: bytes, path: str | Path) -> list[Member]:
    """The documents of a shard's bytes, in order: the one parser of the shard format (the
    loader, `iter_shard` and the range index all read through it). DataError naming `path`
    when the bytes are not a tar of 1-D `.npy` members."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
        return [_npy_member(data, m) for m in members]
    except (OSError, ValueError, tarfile.TarError) as e:
        raise DataError(
            f"cannot read shard {path} (truncated or corrupt: {e}); {SHARD_FIX}"
        ) from None


def member_ids(data: bytes, member: Member) -> np.ndarray:
    """A document's token ids, viewed in the shard's bytes without a copy."""
    return np.frombuffer(data, dtype=member.dtype, count=member.count, offset=member.offset)


def _npy_member(data: bytes, member: tarfile.TarInfo) -> Member:
    """Where the 1-D array of one `.npy` tar member lies in `data`."""
    if not member.isfile():
        raise ValueError(f"unexpected member {member.name!r}, not a .npy file")
    start, end = member.offset_data, member.offset_data + member.size
    if not member.name.endswith(".npy") or end > len(data) or data[start : start + 6] != NPY_MAGIC:
        raise ValueError(f"member {member.name!r} is not a complete .npy file")
    fp = io.BytesIO(data[start : start + 4096 if member.size > 4096 else end])
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"member {member.name!r} has .npy version {version}")
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError(f"member {member.name!r} holds a {shape} {dtype} array, not token ids")
    offset = start + fp.tell()
    if offset + shape[0] * dtype.itemsize != end:
        raise ValueError(f"member {member.name!r} is truncated")
    return Member(member.name.partition(".")[0], offset, dtype, shape[0])
