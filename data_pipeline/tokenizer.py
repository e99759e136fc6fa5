"""A byte-level BPE tokenizer: trained locally with Hugging Face ``tokenizers``, or loaded.

The wrapper keeps the exact tokenizer.json bytes it was made from, so ``sha256`` identifies
the tokenizer and ``save`` writes a file with that same hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Special tokens come first in the vocabulary, so a trained tokenizer has eos_id=0, pad_id=1.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# 256 byte symbols plus the special tokens: below this BPE cannot represent every input.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**32


class Tokenizer:
    """Byte-level BPE with ``encode``/``decode`` and the ids a data loader needs."""

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
        eos_id = hf.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(
                f"tokenizer {origin} has no {EOS_TOKEN} token, which marks document ends; "
                f"add it as a special token or leave out --tokenizer to train one"
            )
        pad_id = hf.token_to_id(PAD_TOKEN)
        # A document that literally contains "<|endoftext|>" must not turn into an end of
        # document mid-text, so special tokens in the input are encoded as plain text.
        # (This switch is not stored in tokenizer.json; every load sets it again here.)
        hf.encode_special_tokens = True
        self._hf = hf
        self._json_bytes = json_bytes
        self._eos_id = eos_id
        # Tokenizers made elsewhere (GPT-2's) often have no pad token; padding with the end
        # of document token is the usual stand-in, since padded positions are masked anyway.
        self._pad_id = eos_id if pad_id is None else pad_id
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
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 byte symbols are in the vocabulary even if the corpus lacks some,
            # so any later text can be encoded.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(documents, trainer=trainer)
        return cls(hf.to_str(pretty=True).encode("utf-8"), origin="<trained>")

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

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; the Rust side spreads the batch over the cores."""
        texts = list(texts)
        # encode_batch_fast skips character offsets, which we never use; it is about twice
        # as fast on byte-level BPE. Older tokenizers releases lack it.
        fast = getattr(self._hf, "encode_batch_fast", None)
        if fast is not None:
            encodings = fast(texts, add_special_tokens=False)
        else:
            encodings = self._hf.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are kept so document ends stay visible."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (may be below the requested size)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of the padding token (the end-of-document id if the tokenizer has none)."""
        return self._pad_id

    @property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.json bytes."""
        return self._sha256

    def describe(self) -> dict[str, object]:
        """The ``tokenizer`` entry of dataset.json (without the file name)."""
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def check_vocab_size(vocab_size: int) -> None:
    """Reject sizes byte-level BPE cannot have."""
    if type(vocab_size) is not int or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size!r} is out of range; pass --vocab-size between "
            f"{MIN_VOCAB_SIZE} (256 bytes + special tokens) and {MAX_VOCAB_SIZE}"
        )
