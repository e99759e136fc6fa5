"""Tokenizers: byte-level BPE trained locally with Hugging Face ``tokenizers``, a byte
tokenizer for tokenizer-free runs, or any tokenizer.json loaded from a file.

Every tokenizer we make starts with the same special tokens at fixed ids, so that all three
model families find what they need at the same place:

    0 <|endoftext|>   end of document (the loader puts it between documents)
    1 <|pad|>         padding
    2 <|mask|>        the MLM (BERT) mask
    3..102            T5 span sentinels <|extra_id_0|> .. <|extra_id_99|>

The wrapper keeps the exact tokenizer.json bytes it was made from, so ``sha256`` identifies
the tokenizer and ``save`` writes a file with that same hash.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SENTINEL_COUNT = 100


def sentinel_token(index: int) -> str:
    """The T5 span sentinel number ``index`` (the k-th masked span of a sequence)."""
    return f"<|extra_id_{index}|>"


SPECIAL_TOKENS = (
    EOS_TOKEN,
    PAD_TOKEN,
    MASK_TOKEN,
    *(sentinel_token(i) for i in range(SENTINEL_COUNT)),
)
# 256 byte symbols plus the special tokens: below this BPE cannot represent every input.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**32
# The byte tokenizer: the special tokens, then byte b at id BYTE_OFFSET + b.
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTES_VOCAB_SIZE = BYTE_OFFSET + 256


@dataclass(frozen=True)
class SpecialIds:
    """Where a tokenizer keeps the special tokens; None / () where it lacks them."""

    eos_id: int
    pad_id: int | None
    mask_id: int | None
    # Sentinel k is sentinel_ids[k]; only the unbroken run from <|extra_id_0|> counts, since
    # T5 numbers the masked spans of a sequence from 0.
    sentinel_ids: tuple[int, ...]


class Tokenizer:
    """A Hugging Face tokenizer with ``encode``/``decode`` and the ids a data loader needs."""

    def __init__(self, json_bytes: bytes, origin: str = "<memory>") -> None:
        """Build from tokenizer.json bytes; ``origin`` names the file in error messages."""
        try:
            hf = HFTokenizer.from_str(json_bytes.decode("utf-8"))
        # tokenizers raises a bare Exception for malformed JSON or unknown components.
        except Exception as e:
            raise DataError(
                f"{origin} is not a valid tokenizer.json ({e}); pass a file saved by "
                f"Hugging Face tokenizers or leave out --tokenizer to train one"
            ) from e
        # A document that literally contains "<|endoftext|>" must not turn into an end of
        # document mid-text, so special tokens in the input are encoded as plain text.
        # (This switch is not stored in tokenizer.json; every load sets it again here.)
        hf.encode_special_tokens = True
        self._hf = hf
        self._json_bytes = json_bytes
        self._specials = _find_specials(hf, origin)
        # The byte tokenizer's ids are the UTF-8 bytes shifted by BYTE_OFFSET: numpy computes
        # them ~100x faster than the BPE machinery, with the same result (the tests check).
        # Only our own file, byte for byte, takes this path.
        self._is_bytes = hf.get_vocab_size() == BYTES_VOCAB_SIZE and (
            json_bytes == _byte_tokenizer_json()
        )
        # Ids can have holes (added tokens placed far up); the embedding needs max id + 1 rows.
        self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        self._sha256 = hashlib.sha256(json_bytes).hexdigest()

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train byte-level BPE on ``documents``; the same corpus gives the same bytes."""
        check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            # The trainer gives the special tokens the first ids, in this order.
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 byte symbols are in the vocabulary even if the corpus lacks some,
            # so any later text can be encoded.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(documents, trainer=trainer)
        return cls(hf.to_str(pretty=True).encode("utf-8"), origin="<trained>")

    @classmethod
    def bytes(cls) -> Tokenizer:
        """The byte tokenizer: the special tokens, then one id per byte value, no merges.

        It is a BPE with an empty merge list over the same byte-level alphabet, so it is a
        plain tokenizer.json any Hugging Face tooling can load, and byte b has id
        BYTE_OFFSET + b.
        """
        return cls(_byte_tokenizer_json(), origin="<bytes>")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(
                f"cannot read tokenizer {path}: {e.strerror}; pass an existing tokenizer.json"
            ) from e
        return cls(data, origin=str(path))

    def save(self, path: str | Path) -> None:
        """Write the exact bytes this tokenizer was made from (so the sha256 matches)."""
        Path(path).write_bytes(self._json_bytes)

    @property
    def json_bytes(self) -> builtins.bytes:  # `bytes` alone is the classmethod below
        """The tokenizer.json bytes (what a worker process rebuilds the tokenizer from)."""
        return self._json_bytes

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text.

        The Rust side spreads a batch over its own thread pool unless the environment sets
        TOKENIZERS_PARALLELISM=false (the build's worker processes do).
        """
        # encode_batch_fast skips character offsets, which we never use; it is about twice
        # as fast on byte-level BPE.
        encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_flat(self, texts: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, ids) of ``texts``: int64 token counts, and every text's ids one after
        the other as ``dtype``, the form worker processes send back."""
        if self._is_bytes:
            encoded = [t.encode("utf-8") for t in texts]
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            ids = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(dtype) + BYTE_OFFSET
            return lengths, ids
        batch = self.encode_batch(texts)
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        ids = np.fromiter(
            itertools.chain.from_iterable(batch), dtype=np.dtype(dtype), count=int(lengths.sum())
        )
        return lengths, ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are kept so document ends stay visible."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids: the largest id plus one, special tokens included.

        A trained vocabulary may come out below the requested size on a small corpus.
        """
        return self._vocab_size

    @property
    def is_byte_tokenizer(self) -> bool:
        """Whether this is our byte tokenizer, which ``encode_flat`` computes with numpy."""
        return self._is_bytes

    @property
    def specials(self) -> SpecialIds:
        """The ids of the special tokens this tokenizer has."""
        return self._specials

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token."""
        return self._specials.eos_id

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, None if the tokenizer has none."""
        return self._specials.pad_id

    @property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.json bytes."""
        return self._sha256

    def describe(self) -> dict[str, object]:
        """The ``tokenizer`` entry of dataset.json (without the file name)."""
        s = self._specials
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": s.eos_id,
            "pad_id": s.pad_id,
            "mask_id": s.mask_id,
            "sentinel_ids": list(s.sentinel_ids),
        }


def _byte_tokenizer_json() -> bytes:
    """tokenizer.json of the byte tokenizer (see ``Tokenizer.bytes``)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for value, symbol in enumerate(byte_symbols()):
        vocab[symbol] = BYTE_OFFSET + value
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return hf.to_str(pretty=True).encode("utf-8")


def _find_specials(hf: HFTokenizer, origin: str) -> SpecialIds:
    """Look the special tokens up by name; only the end-of-document token is required.

    Every objective packs documents with it, so a tokenizer without it cannot build a
    dataset. Padding, mask and sentinels are recorded as missing (None / ()), and the loader
    refuses an objective that needs one.
    """
    eos_id = hf.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise DataError(
            f"tokenizer {origin} has no {EOS_TOKEN} token, which marks document ends; "
            f"add it as a special token or leave out --tokenizer to train one"
        )
    sentinels = []
    for index in range(SENTINEL_COUNT):
        token_id = hf.token_to_id(sentinel_token(index))
        if token_id is None:
            break
        sentinels.append(token_id)
    return SpecialIds(
        eos_id=eos_id,
        pad_id=hf.token_to_id(PAD_TOKEN),
        mask_id=hf.token_to_id(MASK_TOKEN),
        sentinel_ids=tuple(sentinels),
    )


def byte_symbols() -> list[str]:
    """The character that byte-level tokenizers use for each byte value 0..255.

    GPT-2's mapping: bytes that are printable Latin-1 characters stand for themselves, the
    rest (controls, space, a few others) are moved to code points from 256 up, in order.
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    symbols, shifted = [], 0
    for value in range(256):
        if value in printable:
            symbols.append(chr(value))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def check_vocab_size(vocab_size: int) -> None:
    """Reject sizes byte-level BPE cannot have."""
    if type(vocab_size) is not int or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size!r} is out of range; pass --vocab-size between "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens) and "
            f"{MAX_VOCAB_SIZE}"
        )
