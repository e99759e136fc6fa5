"""Corpus statistics a training run compares itself with."""

from __future__ import annotations

import numpy as np

from data_pipeline.dataset import DatasetInfo


def unigram_loss(info: DatasetInfo) -> float:
    """Cross-entropy (nats/token) of the validation stream under a unigram model of the training
    stream: the loss a model reaches by learning token frequencies alone, and no context.

    Both streams include one end-of-document token per document, as the loader packs them;
    add-one smoothing keeps tokens unseen in training finite.
    """
    counts = np.load(info.path / "token_counts.npz")
    train = counts["train"].astype(np.float64)
    val = counts["val"].astype(np.float64)
    train[info.eos_id] += sum(s.documents for s in info.split("train"))
    val[info.eos_id] += sum(s.documents for s in info.split("val"))
    p = (train + 1.0) / (train.sum() + len(train))
    return float(-(val * np.log(p)).sum() / val.sum())
