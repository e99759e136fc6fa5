"""Blending datasets by weight: proportions, the schedule's closed form, the realised mixture
report, and bad blend settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_data import random_docs, write_dataset

from data_pipeline.blend import BlendSchedule, open_datasets, parse_blend
from data_pipeline.errors import DataError
from data_pipeline.loader import make_batches

# Dataset d holds only ids in RANGES[d] (plus end-of-document tokens), so every sequence
# tells which dataset it came from.
RANGES = [(200, 1000), (1000, 2000), (2000, 3000)]


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("blend")
    return [
        write_dataset(
            base / f"d{i}", {"train": random_docs(n, i, *RANGES[i])}, 4096, shard_tokens=800
        )
        for i, n in enumerate([5000, 3000, 2000])
    ]


def source_of(tokens: np.ndarray) -> np.ndarray:
    """The dataset each row came from, from its largest id."""
    top = tokens.max(axis=1)
    return np.searchsorted([r[1] for r in RANGES], top, side="right")


def served_sources(data: dict, sequences: int) -> np.ndarray:
    loader = make_batches(data, "train", 16, 0, 50, grad_accum=2)
    out = [
        source_of(b["tokens"].numpy())
        for _ in range(sequences // loader.global_batch)
        for b in loader.next_step()
    ]
    return np.concatenate(out), loader


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, 2.0, 7.0), (0.05, 0.9, 0.05)])
def test_blend_proportions_follow_the_weights(three, weights):
    data = {"blend": [f"{w} {p}" for w, p in zip(weights, three, strict=True)]}
    got, loader = served_sources(data, 10_000)
    assert len(got) == 10_000
    want = np.array(weights) / sum(weights)
    fractions = np.bincount(got, minlength=3) / len(got)
    np.testing.assert_allclose(fractions, want, rtol=0.01)
    # The loader's own report of the realised mixture says the same.
    report = loader.mixture()
    assert [r["path"] for r in report] == [str(p) for p in three]
    np.testing.assert_array_equal([r["sequences"] for r in report], np.bincount(got))
    np.testing.assert_allclose([r["weight"] for r in report], want)
    # Datasets are interleaved, not served in runs: every window of w consecutive sequences
    # holds each dataset's share of w to within twice the per-prefix bound (3 sequences).
    prefix = np.concatenate([np.zeros((1, 3)), np.cumsum(np.eye(3)[got], axis=0)])
    for w in (10, 100, 1000):
        window = prefix[w:] - prefix[:-w]
        assert np.abs(window - w * want).max() <= 2 * 3


def test_other_weights_give_other_proportions(three):
    """Negative control: the proportions come from the weights, not from dataset sizes."""
    a, _ = served_sources({"blend": [f"1 {three[0]}", f"1 {three[1]}", f"1 {three[2]}"]}, 3000)
    b, _ = served_sources({"blend": [f"8 {three[0]}", f"1 {three[1]}", f"1 {three[2]}"]}, 3000)
    assert abs(np.mean(a == 0) - 1 / 3) < 0.01 and abs(np.mean(b == 0) - 0.8) < 0.01


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (3.0, 1.0), (0.001, 1.0, 0.2, 5.0), (1.0,)])
def test_schedule_positions_are_each_datasets_own_order(weights):
    """Global sequences 0 .. n-1 take each dataset's sequences 0, 1, 2 ... in order with no gap
    or repeat, and `counts` (closed form) agrees with the assignment at every n."""
    schedule = BlendSchedule(weights)
    n = 20_000
    dataset, position = schedule.assign(np.arange(n))
    for d in range(len(weights)):
        np.testing.assert_array_equal(position[dataset == d], np.arange((dataset == d).sum()))
    cumulative = np.zeros(len(weights), dtype=np.int64)
    for i in range(0, n, 997):
        cumulative = np.bincount(dataset[:i], minlength=len(weights))
        np.testing.assert_array_equal(schedule.counts(i), cumulative)
        # Within one sequence per level of the exact share.
        assert np.abs(cumulative - i * np.array(schedule.weights)).max() <= len(weights)
    # Any range can be assigned on its own (what a resume or a rank does).
    part = schedule.assign(np.arange(12_345, 12_400))
    np.testing.assert_array_equal(part[0], dataset[12_345:12_400])
    np.testing.assert_array_equal(part[1], position[12_345:12_400])


def test_schedule_far_out_stays_exact():
    schedule = BlendSchedule([0.7, 0.2, 0.1])
    start = 10**12
    dataset, position = schedule.assign(np.arange(start, start + 1000))
    before = schedule.counts(start)
    for d in range(3):
        mine = position[dataset == d]
        np.testing.assert_array_equal(mine, before[d] + np.arange(len(mine)))
    np.testing.assert_array_equal(schedule.counts(start + 1000) - before, np.bincount(dataset))


@pytest.mark.parametrize(
    "entries,match",
    [
        (["0.5"], r"data.blend\[0\] = '0.5'"),
        (["1 a", "0 b"], r"data.blend\[1\] = '0 b'.*positive weight"),
        (["x a"], "positive weight"),
        ([], "data.blend is empty"),
    ],
)
def test_bad_blend_entries(entries, match):
    with pytest.raises(DataError, match=match):
        parse_blend(entries)


def test_parse_blend_keeps_paths_with_spaces():
    assert parse_blend(["0.25 my data/set one", "3 b"]) == [(0.25, "my data/set one"), (3.0, "b")]


def test_blend_of_different_tokenizers_is_refused(three, tmp_path):
    other = write_dataset(
        tmp_path / "other", {"train": random_docs(2000, 9, 200, 1000)}, 4096, tokenizer_tag="x"
    )
    with pytest.raises(DataError, match="different tokenizers"):
        open_datasets("", [f"1 {three[0]}", f"1 {other}"])
    assert len(open_datasets("", [f"1 {three[0]}", f"1 {three[1]}"])) == 2


def test_missing_blend_dataset_names_it(three, tmp_path):
    with pytest.raises(DataError, match="nowhere.*pretrain-data build"):
        open_datasets("", [f"1 {three[0]}", f"1 {tmp_path / 'nowhere'}"])
