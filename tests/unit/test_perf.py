"""Performance plumbing: FLOPs per token and MFU against values computed by hand, the device
peak table, the step split of PerfHook, the TP=1 kernels (F.linear, F.cross_entropy) against
megatron's, and the one-pass gradient norm against DeepSpeed's two passes."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.flops import flops_per_token
from pretrain.perf import PerfHook, cpu_flop_per_cycle, device_peak_flops, mfu

DENSE = ModelConfig(n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=512)


def test_flops_per_token_of_a_dense_gpt_by_hand():
    # Per block: q, k, v, o are 4 x 64 x 64 = 16,384 weights; MLP 64 x 256 twice = 32,768.
    # Two blocks 98,304, plus the (tied) output projection 512 x 64 = 32,768: 131,072 weights,
    # 6 FLOPs each = 786,432. Attention products: 12 x 2 layers x 32 x 64 = 49,152.
    assert flops_per_token(DENSE) == 786_432 + 49_152
    # Negative control: an untied head costs no extra FLOPs (same matmul), a third layer does.
    assert flops_per_token(ModelConfig(**{**vars(DENSE), "tie_embeddings": False})) == 835_584
    assert flops_per_token(ModelConfig(**{**vars(DENSE), "n_layers": 3})) != 835_584


def test_mfu_by_hand():
    # 835,584 FLOP/token x 10,000 tokens/s = 8.35584e9 FLOP/s over 2 devices of 1e12.
    assert mfu(835_584, 10_000, 1e12, 2) == pytest.approx(8.35584e9 / 2e12, rel=1e-12)
    assert mfu(835_584, 10_000, 1e12, 1) == pytest.approx(2 * mfu(835_584, 10_000, 1e12, 2))


def test_device_peaks():
    assert device_peak_flops("cuda", "bf16", "NVIDIA H200")[0] == 989e12
    assert device_peak_flops("cuda", "bf16", "NVIDIA A100-SXM4-80GB")[0] == 312e12
    peak, why = device_peak_flops("cuda", "bf16", "Mystery GPU")
    assert peak is None and "run.peak_flops" in why
    # FLOP per cycle from /proc/cpuinfo's flags (the first processor's line).
    avx512 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\ncpu MHz\t: 2600\n"
    assert cpu_flop_per_cycle(avx512) == 64
    assert cpu_flop_per_cycle(avx512.replace(" avx512f avx512bw", "")) == 32
    assert cpu_flop_per_cycle(avx512.replace(" fma avx512f avx512bw", "")) == 8
    cpu1, _ = device_peak_flops("cpu", "fp32", threads=1)
    cpu2, _ = device_peak_flops("cpu", "fp32", threads=2)
    if cpu1 is not None:
        assert cpu2 == pytest.approx(2 * cpu1)


class FakeEngine:
    def __init__(self):
        self.stepped = 0

    def step(self):
        time.sleep(0.02)
        self.stepped += 1

    def allreduce_gradients(self):
        time.sleep(0.01)


def test_perf_hook_splits_the_step_and_reports_mfu(tmp_path):
    """Data wait, optimizer and comm are what their calls took (lower bounds: sleeps); the rest
    is forward+backward; MFU follows from tokens/s and the configured peak."""
    engine = FakeEngine()
    loader = SimpleNamespace(next_step=lambda: time.sleep(0.03) or [])
    run = SimpleNamespace(peak_flops=1e9, profile_steps=[], precision="fp32", run_dir=tmp_path)
    layout = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0, is_main=True)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(run=run),
        layout=layout,
        engine=engine,
        train_data=loader,
        state=SimpleNamespace(step=0),
    )

    def train_step():
        trainer.train_data.next_step()
        trainer.engine.allreduce_gradients()
        trainer.engine.step()
        time.sleep(0.015)  # "forward and backward"
        trainer.state.step += 1

    trainer.train_step = train_step
    lines: list[str] = []
    hook = PerfHook(trainer, 1000.0, printer=lambda text, **kw: lines.append(text))
    for step in range(1, 4):
        trainer.train_step()
        metrics = {"tokens_per_s": 2e5} if step == 3 else {}
        hook.after_step(trainer, metrics)
    assert engine.stepped == 3
    assert metrics["time_data_s"] >= 0.03
    assert metrics["time_comm_s"] >= 0.01
    assert 0.02 <= metrics["time_optimizer_s"] < metrics["time_data_s"] + 0.02 + 0.5
    assert metrics["time_fwd_bwd_s"] >= 0.015 - 1e-3
    assert metrics["mfu"] == pytest.approx(1000.0 * 2e5 / 1e9)
    assert metrics["model_tflops"] == pytest.approx(2e8 / 1e12)
    assert any("MFU 20.0%" in line for line in lines)


def test_profiler_window_writes_a_trace(tmp_path):
    run = SimpleNamespace(peak_flops=1e9, profile_steps=[2, 3], precision="fp32", run_dir=tmp_path)
    layout = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0, is_main=True)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(run=run),
        layout=layout,
        engine=FakeEngine(),
        train_data=SimpleNamespace(next_step=lambda: []),
        state=SimpleNamespace(step=0),
    )

    def train_step():
        torch.ones(8, 8) @ torch.ones(8, 8)
        trainer.state.step += 1

    trainer.train_step = train_step
    hook = PerfHook(trainer, 1.0, printer=lambda *a, **k: None)
    for _ in range(4):
        trainer.train_step()
        hook.after_step(trainer, {})
        if trainer.state.step == 1:
            assert hook.profiler is not None  # started after step 1, before step 2
    hook.at_end(trainer)
    trace = tmp_path / "profile" / "trace_rank0.json"
    assert trace.exists() and "aten::mm" in trace.read_text()


def test_tp1_linear_is_megatrons_bitwise(world1):
    """At TP=1 `column`/`row` run F.linear on the layer's weights: forward and gradients equal
    megatron's own path bit for bit. Negative control: a transposed weight differs."""
    from pretrain.models.layers import TensorParallel, column, column_linear, normal_init

    tpc = TensorParallel.build(world1)
    torch.manual_seed(0)
    layer = column_linear(32, 48, True, normal_init(0.02), tpc)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(8, 3, 32, requires_grad=True)
    ours = column(layer, x, tpc)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    theirs, _ = layer(x)
    (g_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
    assert torch.equal(ours, theirs) and torch.equal(g_ours, g_theirs)
    wrong = F.linear(x, layer.weight.t().reshape(48, 32), layer.bias)
    assert not torch.equal(wrong, theirs)


def test_tp1_cross_entropy_matches_megatrons(world1):
    """lm_loss at TP=1 (F.cross_entropy) against megatron's vocab-parallel kernel, the old path:
    equal to float32 rounding. Negative control: shifted targets are far off."""
    from megatron.core import tensor_parallel as tp

    from pretrain.models.layers import TensorParallel, lm_loss

    tpc = TensorParallel.build(world1)
    torch.manual_seed(0)
    logits_BSV = torch.randn(4, 16, 96) * 3  # the TP=1 stream's order
    targets_BS = torch.randint(0, 96, (4, 16))
    mask_BS = (torch.rand(4, 16) > 0.3).float()
    for mask in (None, mask_BS):
        ours = lm_loss(logits_BSV.clone(), targets_BS, mask, tpc)
        per_BS = tp.vocab_parallel_cross_entropy(logits_BSV.clone(), targets_BS)
        m = torch.ones_like(per_BS) if mask is None else mask
        ref = (per_BS * m).sum() / m.sum()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        off = lm_loss(logits_BSV.clone(), (targets_BS + 1) % 96, mask, tpc)
        assert (off - ref).abs() > 1e-2


@pytest.fixture(scope="module")
def tiny_engine(world1):
    """make(*overrides) -> (engine, layout): configs/tiny.yaml's GPT in a DeepSpeed engine."""
    import os
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from pretrain.config import load_config
    from pretrain.distributed import Layout, _quiet_cpu_deepspeed

    _quiet_cpu_deepspeed()
    import deepspeed

    had = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"  # what torchrun sets; DeepSpeed's engine asks for it
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    layout = Layout(0, 1, 0, torch.device("cpu"), 0, 1, 0, 1, 0, 1, 1, world1,
                    ps.get_data_parallel_group())  # fmt: skip
    root = Path(__file__).resolve().parents[2]

    def make(*overrides: str, grad_accum: int = 1):
        import dataclasses

        from pretrain.engine import build_engine, build_model_for

        cfg = load_config(
            root / "configs" / "tiny.yaml",
            ["model.vocab_size=128", "model.n_layers=1", "optim.warmup_steps=0", *overrides],
        )
        torch.manual_seed(0)
        lay = dataclasses.replace(layout, grad_accum=grad_accum)
        return build_engine(cfg, lay, build_model_for(cfg, lay))[0], lay

    yield make
    if had is None:
        os.environ.pop("LOCAL_RANK", None)
    else:
        os.environ["LOCAL_RANK"] = had


@pytest.mark.slow
def test_gradient_norm_once_changes_no_numbers(tiny_engine, monkeypatch):
    """ZeRO-0 fp32 at DP=1 with clipping that bites: the trainer's step (one norm pass without
    collectives, clipping before engine.step, no gradient all-reduce over the one rank) reports
    the same norms and
    ends with bitwise the same weights as the old way (DeepSpeed's all-reduce, the norm by its
    routine with an infinite limit, then its own clipping in the step), with one norm
    computation per step instead of two. Negative control: without
    clipping the weights differ, so the comparison sees the clipping."""
    import deepspeed.runtime.engine as ds_engine
    import deepspeed.runtime.utils as ds_utils

    from pretrain.steps import DataParallelSteps

    calls = []
    real = ds_utils.clip_grad_norm_

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ds_utils, "clip_grad_norm_", counted)
    monkeypatch.setattr(ds_engine, "clip_grad_norm_", counted)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 33), generator=gen) for _ in range(3)]

    def weights(engine):
        return [p.detach().clone() for p in engine.module.parameters()]

    from pretrain import engine as our_engine

    local = []
    real_local = our_engine.clip_local

    def counted_local(*args, **kwargs):
        local.append(1)
        return real_local(*args, **kwargs)

    monkeypatch.setattr(our_engine, "clip_local", counted_local)
    new, layout = tiny_engine("parallel.zero_stage=0", "optim.grad_clip=0.05")
    runner = DataParallelSteps(new, layout)
    new_norms = []
    for b in batches:
        calls.clear()
        local.clear()
        new_norms.append(runner.train([{"tokens": b[:, :-1], "targets": b[:, 1:]}])[1])
        # One norm pass, ours without collectives (one rank holds the whole gradient).
        assert (len(calls), len(local)) == (0, 1)
    old, _ = tiny_engine("parallel.zero_stage=0", "optim.grad_clip=0.05")
    # The old way also all-reduced the gradients over the one data-parallel rank.
    assert not new.enable_backward_allreduce
    old.enable_backward_allreduce = True
    old_norms = []
    for b in batches:
        calls.clear()
        old.backward(old(b[:, :-1], b[:, 1:]))
        old_norms.append(float(real(old.module.parameters(), float("inf"), mpu=old.mpu)))
        old.step()
        assert len(calls) == 1  # DeepSpeed's own clipping (the inf pass called `real` direct)
    assert new_norms == old_norms and min(new_norms) > 0.05  # every step clipped
    assert all(torch.equal(a, b) for a, b in zip(weights(new), weights(old), strict=True))
    free, _ = tiny_engine("parallel.zero_stage=0", "optim.grad_clip=0.0")
    for b in batches:
        free.backward(free(b[:, :-1], b[:, 1:]))
        free.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights(free), weights(old), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_direct_steps_train_bitwise_like_deepspeeds_wrappers(tiny_engine, accumulation):
    """At fp32 ZeRO-0 on one rank the runner calls the module and `loss.backward()` itself
    (engine.runs_direct) instead of DeepSpeed's forward and backward: with dropout on and
    clipping that bites, 3 steps give bitwise the losses, norms and weights of the wrappers'
    way. Negative control: leaving out DeepSpeed's division of the loss by the accumulation
    steps (with 2) doubles the norm."""
    from pretrain.distributed import rng_state, set_rng_state
    from pretrain.engine import runs_direct
    from pretrain.steps import DataParallelSteps

    class Undivided(DataParallelSteps):
        def _forward_backward(self, batch):
            loss = self.engine.module(**batch)
            loss.backward()
            return loss

    sets = ["model.dropout=0.1", "optim.grad_clip=0.05", "parallel.micro_batch_size=2"]
    gen = torch.Generator().manual_seed(3)
    steps = [[torch.randint(0, 128, (2, 33), generator=gen) for _ in range(accumulation)]
             for _ in range(3)]  # fmt: skip

    def train(runner_cls, direct: bool):
        engine, layout = tiny_engine(*sets, grad_accum=accumulation)
        assert engine.gradient_accumulation_steps() == accumulation
        runner = runner_cls(engine, layout)
        assert runner.direct == runs_direct(engine) is True
        runner.direct = direct
        if direct:  # the point: DeepSpeed's backward is not called

            def forbidden(*args, **kwargs):
                raise AssertionError("engine.backward called on the direct path")

            engine.backward = forbidden
        torch.manual_seed(5)
        out = [runner.train([{"tokens": b[:, :-1], "targets": b[:, 1:]} for b in step])
               for step in steps]  # fmt: skip
        return out, [p.detach().clone() for p in engine.module.parameters()]

    state = rng_state()
    wrapped, w_wrapped = train(DataParallelSteps, direct=False)
    direct, w_direct = train(DataParallelSteps, direct=True)
    assert direct == wrapped and min(norm for _, norm in wrapped) > 0.05
    assert all(torch.equal(a, b) for a, b in zip(w_direct, w_wrapped, strict=True))
    if accumulation > 1:
        undivided, _ = train(Undivided, direct=True)
        assert [n for _, n in undivided] == pytest.approx([2 * n for _, n in wrapped], rel=1e-5)
    set_rng_state(state)


def test_direct_steps_only_where_deepspeeds_wrappers_keep_books():
    """engine.runs_direct: every condition turns it off on its own."""
    from types import SimpleNamespace

    from pretrain.engine import runs_direct

    def engine(**change):
        fields = dict(stage=0, fp16=False, bf16=False, autocast=False, allreduce=False,
                      deepcompile=False, compiled_autograd=False) | change  # fmt: skip
        return SimpleNamespace(
            zero_optimization_stage=lambda: fields["stage"],
            fp16_enabled=lambda: fields["fp16"],
            bfloat16_enabled=lambda: fields["bf16"],
            torch_autocast_enabled=lambda: fields["autocast"],
            enable_backward_allreduce=fields["allreduce"],
            is_deepcompile_enabled=lambda: fields["deepcompile"],
            _is_compiled_autograd_enabled=fields["compiled_autograd"],
        )

    assert runs_direct(engine())
    for change in [dict(stage=1), dict(stage=3), dict(fp16=True), dict(bf16=True),
                   dict(autocast=True), dict(allreduce=True), dict(deepcompile=True),
                   dict(compiled_autograd=True)]:  # fmt: skip
        assert not runs_direct(engine(**change)), change


@pytest.mark.parametrize(
    "override, named",
    [
        ("run.profile_steps=[3]", "run.profile_steps"),
        ("run.profile_steps=[5,2]", "run.profile_steps"),
        ("run.profile_steps=[0,2]", "run.profile_steps"),
        ("run.peak_flops=0", "run.peak_flops"),
    ],
)
def test_bad_perf_settings_are_refused_by_name(override, named):
    from pathlib import Path

    from pretrain.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(tiny, [override])
    assert load_config(tiny, ["run.profile_steps=[2,3]"]).run.profile_steps == [2, 3]


@pytest.mark.slow
def test_adamw_implementations_reach_torch_and_agree(tiny_engine):
    """optim.implementation reaches torch's AdamW inside DeepSpeed's engine (the group flags
    torch dispatches on), and the foreach and fused kernels train to the same weights as the
    default one within fp32 rounding over 3 steps. Negative control aimed at a kernel that
    drops part of the update: the fused kernel without weight decay leaves that tolerance.
    Without biases: the key projection's bias gets a gradient of pure rounding noise (softmax
    ignores a constant added to every key's score), which Adam scales to +-lr whatever its
    size, so any two kernels disagree there by up to 2 lr."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 128, (2, 33), generator=gen) for _ in range(3)]

    def trained(*overrides: str):
        engine, _ = tiny_engine(
            "parallel.zero_stage=0", "optim.lr=1e-2", "model.bias=false", *overrides
        )
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for b in batches:
            engine.backward(engine(b[:, :-1], b[:, 1:]))
            engine.step()
        flags = [(g.get("foreach"), g.get("fused")) for g in inner.param_groups]
        return [p.detach().clone() for p in engine.module.parameters()], flags

    ref, ref_flags = trained()
    assert set(ref_flags) == {(None, None)}
    for kind, expected in (("foreach", (True, None)), ("fused", (None, True))):
        got, flags = trained(f"optim.implementation={kind}")
        assert set(flags) == {expected}, (kind, flags)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    worst = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
    no_decay, _ = trained("optim.implementation=fused", "optim.weight_decay=0.0")
    print(
        f"fused vs default: max |diff| {worst:.2e}; without decay "
        f"{max(float((a - b).abs().max()) for a, b in zip(no_decay, ref, strict=True)):.2e}"
    )
    assert any(
        not torch.allclose(a, b, rtol=1.3e-6, atol=1e-5) for a, b in zip(no_decay, ref, strict=True)
    )


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tiny_engine):
    """run.compile=true: every block runs through torch.compile (dynamo traced graphs for it),
    and 2 training steps give the eager run's losses and gradients within fp32 rounding (the
    compiled kernels fuse, so bitwise equality is not promised; the second step's loss checks
    the first update). Gradients, not the weights after Adam: for a weight whose gradient is
    near zero Adam turns a rounding difference of the gradient into a visible one of the
    update, whatever computed it. The check that graphs were traced is the control aimed at
    an option that is silently ignored."""
    import torch._dynamo

    from pretrain.models.layers import Block

    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 128, (2, 33), generator=gen) for _ in range(2)]

    def trained(*overrides: str):
        # Without biases, as in the AdamW test above: the key bias's gradient is rounding
        # noise that Adam scales to +-lr, whatever computed it.
        engine, _ = tiny_engine("parallel.zero_stage=0", "model.bias=false", *overrides)
        losses, grads = [], []
        for b in batches:
            loss = engine(b[:, :-1], b[:, 1:])
            engine.backward(loss)
            grads += [p.grad.clone() for p in engine.module.parameters()]
            engine.step()
            losses.append(float(loss))
        blocks = [m for m in engine.module.modules() if isinstance(m, Block)]
        return losses, grads, blocks

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_losses, eager_grads, eager_blocks = trained()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert all(b._compiled_call_impl is None for b in eager_blocks)
    losses, grads, blocks = trained("run.compile=true")
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_compile_refuses_zero3_and_experts():
    from pretrain.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2]
    for override, key in (
        ("parallel.zero_stage=3", "parallel.zero_stage"),
        ("model.moe_experts=4", "model.moe_experts"),
    ):
        with pytest.raises(ConfigError, match="run.compile=true is not supported") as e:
            load_config(root / "configs" / "tiny.yaml", ["run.compile=true", override])
        assert key in str(e.value)
    load_config(root / "configs" / "tiny.yaml", ["run.compile=true", "parallel.zero_stage=2"])


def test_attention_in_the_bs_stream_copies_nothing(world1):
    """In the [b, s, d] stream attention takes q, k and v as views of the qkv projection's
    output and merges the heads of its output as a view: forward and backward run no copy
    (aten copy_/clone). Negative control: the same layer in megatron's [s, b, d] stream (a
    sequence-parallel context over one rank, whose collectives are identities) copies the
    gradient of the qkv projection's output from [b, s] back into [s, b] order."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.models.layers import Attention, AttentionMask, TensorParallel, parallel_config

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone):
                self.copies.append(str(func))
            return func(*args, **(kwargs or {}))

    def copies(tpc: TensorParallel, x: torch.Tensor) -> list[str]:
        torch.manual_seed(0)
        attn = Attention(DENSE, tpc, n_layers=2)
        x = x.detach().requires_grad_()
        with CountCopies() as mode:
            attn(x, AttentionMask(causal=True)).sum().backward()
        return mode.copies

    b, s = 3, 16
    plain = TensorParallel.build(world1)
    assert not plain.seq_first
    assert copies(plain, torch.randn(b, s, DENSE.d_model)) == []
    seq_first = dataclasses.replace(plain, sequence_parallel=True, mp=parallel_config(1))
    assert seq_first.seq_first
    assert copies(seq_first, torch.randn(s, b, DENSE.d_model)) == ["aten.clone.default"]


@pytest.mark.parametrize(
    "overrides, dp, stage",
    [
        (["parallel.zero_stage=1"], 1, 0),  # one rank: nothing to partition
        (["parallel.zero_stage=2"], 1, 0),
        (["parallel.zero_stage=1"], 2, 1),
        (["parallel.zero_stage=2"], 4, 2),
        (["parallel.zero_stage=3"], 1, 3),  # built partitioned: kept
        (["parallel.zero_stage=1", "run.precision=bf16"], 1, 1),  # stage 0 would sum in bf16
        (["parallel.zero_stage=1", "parallel.pp=2"], 1, 1),  # pipeline checkpoints at 0 stay put
        (["parallel.zero_stage=0"], 1, 0),
    ],
)
def test_one_rank_zero12_runs_as_stage_0(overrides, dp, stage):
    from pretrain.config import load_config
    from pretrain.engine import deepspeed_config, effective_zero_stage

    cfg = load_config(None, overrides)
    assert effective_zero_stage(cfg, dp) == stage
    layout = SimpleNamespace(dp_size=dp, grad_accum=1)
    assert deepspeed_config(cfg, layout)["zero_optimization"]["stage"] == stage


@pytest.mark.slow
def test_a_checkpoint_load_reads_the_model_states_file_once(tiny_engine, tmp_path, monkeypatch):
    """pretrain.checkpoint.load reads each file of a ZeRO-0 checkpoint from disk once, where
    DeepSpeed's load_checkpoint alone reads the model-states file (weights and Adam moments)
    twice; the weights and moments loaded are bitwise the saved ones. Control: DeepSpeed's
    load_checkpoint called directly reads it twice, so the count sees the second read."""
    from collections import Counter

    from pretrain import checkpoint

    engine, layout = tiny_engine("optim.warmup_steps=0")
    tokens = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
    engine.step()  # Adam's moments exist and are saved
    saved = {k: v.clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
    moments = [s["exp_avg"].clone() for s in engine.optimizer.state.values()]
    client = {"trainer": {"step": 1}, "data": {"consumed": 0}}
    path = checkpoint.save(engine, layout, tmp_path, 1, client, {}, keep_last=1)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
        for s in engine.optimizer.state.values():
            s["exp_avg"].zero_()

    reads: Counter[str] = Counter()
    real_load = torch.load

    def counting(f, *args, **kwargs):
        reads[Path(str(f)).name] += 1
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    checkpoint.load(engine, layout, path, [])
    assert reads["mp_rank_00_model_states.pt"] == 1 and set(reads.values()) == {1}, reads
    loaded = engine.module.state_dict()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    for got, want in zip(engine.optimizer.state.values(), moments, strict=True):
        assert torch.equal(got["exp_avg"], want)
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again

    reads.clear()
    engine.load_checkpoint(str(path.parent), tag=path.name)
    assert reads["mp_rank_00_model_states.pt"] == 2, reads
