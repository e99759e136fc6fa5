"""The MLflow outbox (pretrain.tracking_outbox) against a fake store that can be taken down:
queueing never waits for the store, nothing is lost or reordered across an outage, the outage is
reported once, a refused call is skipped, and closing gives up after its timeout. And the
tracking hook's generic path for model statistics (MoE expert load and the like)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from pretrain.tracking import step_metrics
from pretrain.tracking_outbox import Outbox


class Refused(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class FakeStore:
    """Records what reaches it; raises ConnectionError while `up` is clear."""

    def __init__(self, up: bool = True):
        self.up = threading.Event()
        if up:
            self.up.set()
        self.got: list[tuple[str, object]] = []
        self.attempts = 0

    def connect(self) -> FakeStore:
        return self

    def _check(self) -> None:
        self.attempts += 1
        if not self.up.is_set():
            raise ConnectionError("connection refused")

    def send_metrics(self, client, records) -> None:
        self._check()
        self.got.append(("metrics", list(records)))

    def op(self, name: str):
        def fn(client):
            self._check()
            self.got.append((name, None))

        return fn


def outbox(store: FakeStore, **kw) -> Outbox:
    return Outbox(store.connect, store.send_metrics, "fake://store", **kw)


def test_an_outage_delays_delivery_but_loses_and_reorders_nothing(capsys):
    store = FakeStore(up=False)
    box = outbox(store, max_backoff=0.05)
    t0 = time.perf_counter()
    box.call("create", store.op("create"))
    box.metrics([("loss", 1)])
    box.metrics([("loss", 2), ("lr", 3)])
    box.call("artifact", store.op("artifact"))
    box.metrics([("loss", 4)])
    queued = time.perf_counter() - t0
    deadline = time.monotonic() + 5
    while store.attempts < 3 and time.monotonic() < deadline:  # tried, and failed, a few times
        time.sleep(0.01)
    assert store.got == []
    store.up.set()
    assert box.close(timeout=10) == 0
    assert queued < 0.05  # five calls queued while the store was down, without waiting for it
    assert store.got == [
        ("create", None),
        ("metrics", [("loss", 1), ("loss", 2), ("lr", 3)]),  # consecutive records: one batch
        ("artifact", None),
        ("metrics", [("loss", 4)]),
    ]
    err = capsys.readouterr().err
    assert err.count("cannot reach fake://store") == 1  # reported once, not per retry


def test_a_refused_call_is_skipped_with_a_warning(capsys):
    store = FakeStore()
    box = outbox(store)

    def bad(client):
        raise Refused("param changed")

    box.call("params", bad)
    box.call("end", store.op("end"))
    assert box.close(timeout=10) == 0
    assert store.got == [("end", None)]
    assert "refused params, skipped: param changed" in capsys.readouterr().err


def test_closing_gives_up_after_its_timeout(capsys):
    store = FakeStore(up=False)
    box = outbox(store, max_backoff=0.05)
    box.call("create", store.op("create"))
    box.metrics([("loss", 1)])
    t0 = time.perf_counter()
    assert box.close(timeout=0.5) == 2
    assert time.perf_counter() - t0 < 2.0
    assert "2 queued calls not delivered" in capsys.readouterr().err


def test_a_long_outage_drops_the_oldest_metrics_first(capsys):
    store = FakeStore(up=False)
    box = outbox(store, max_records=4, max_backoff=0.05)
    box.call("create", store.op("create"))  # the head, held back by the outage
    box.metrics([("a", 1), ("a", 2)])
    box.call("artifact", store.op("artifact"))
    box.metrics([("b", 1), ("b", 2)])
    box.metrics([("c", 1)])  # one over the limit: a's batch goes
    store.up.set()
    assert box.close(timeout=10) == 0
    assert store.got == [
        ("create", None),
        ("artifact", None),
        ("metrics", [("b", 1), ("b", 2), ("c", 1)]),
    ]
    assert box.dropped == 2
    assert "dropping the oldest" in capsys.readouterr().err


def batches(store: FakeStore) -> list[list]:
    return [records for name, records in store.got if name == "metrics"]


def wait_until(check, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not check() and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    return time.monotonic() - t0


def test_metrics_wait_their_hold_and_travel_as_one_batch():
    """Three log steps 0.1 s apart with a 0.8 s hold: nothing reaches the store before the
    hold has passed, then one batch with all three. Without a hold (the control) each log
    step is its own delivery, the per-step store cost the hold exists to avoid."""
    store = FakeStore()
    box = outbox(store, hold=0.8)
    t0 = time.monotonic()
    for step in range(3):
        box.metrics([("loss", step)])
        time.sleep(0.1)
    assert batches(store) == []  # 0.3 s in: still held
    wait_until(lambda: batches(store))
    waited = time.monotonic() - t0
    assert batches(store) == [[("loss", 0), ("loss", 1), ("loss", 2)]]
    assert 0.7 < waited < 3.0
    assert box.close(timeout=10) == 0

    control = FakeStore()
    box = outbox(control, hold=0.0)
    for step in range(3):
        box.metrics([("loss", step)])
        wait_until(lambda n=step: len(batches(control)) > n)
    assert box.close(timeout=10) == 0
    assert batches(control) == [[("loss", 0)], [("loss", 1)], [("loss", 2)]]


def test_a_call_behind_held_metrics_and_closing_send_them_at_once():
    store = FakeStore()
    box = outbox(store, hold=60.0)
    box.metrics([("loss", 1)])
    box.call("artifact", store.op("artifact"))  # in order, without waiting the hold
    assert wait_until(lambda: len(store.got) == 2) < 2.0
    assert store.got == [("metrics", [("loss", 1)]), ("artifact", None)]
    box.metrics([("loss", 2)])
    t0 = time.monotonic()
    assert box.close(timeout=10) == 0
    assert time.monotonic() - t0 < 2.0  # closing does not sit out the 60 s hold
    assert store.got[-1] == ("metrics", [("loss", 2)])


class MoEModel(torch.nn.Module):
    def tracking_metrics(self) -> dict[str, float]:
        return {"moe_load_max": 1.5, "moe_dropped_tokens": 3}


@pytest.mark.parametrize("module", [MoEModel(), torch.nn.Linear(2, 2)])
def test_log_steps_record_tokens_memory_and_what_the_model_reports(module):
    trainer = SimpleNamespace(
        state=SimpleNamespace(consumed_tokens=640),
        layout=SimpleNamespace(device=torch.device("cpu")),
        engine=SimpleNamespace(module=module),
    )
    out = step_metrics(trainer, {"loss": torch.tensor(2.5), "lr": 1e-3, "note": "text"})
    assert out["loss"] == 2.5 and out["lr"] == 1e-3 and "note" not in out
    assert out["tokens_seen"] == 640.0
    assert out["memory_rss_peak_mib"] > 10  # a Python process with torch loaded
    if isinstance(module, MoEModel):
        assert out["moe_load_max"] == 1.5 and out["moe_dropped_tokens"] == 3.0
    else:
        assert not any(k.startswith("moe") for k in out)
