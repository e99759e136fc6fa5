"""The model variants of the tensor-parallel equivalence test, shared by the pytest side
(tests/distributed/test_tensor_parallel.py) and the torchrun side (tests/distributed/tp_worker.py).

Pure Python: the test module imports it without torch. A case is a family (which batch contract
its synthetic batches follow) plus config overrides on top of BASE; adding a variant is one line.
"""

from __future__ import annotations

from dataclasses import dataclass

# What every case shares: a model small enough that 10 steps take well under a second, on the
# CPU over gloo (also on a machine with a GPU, so the numbers do not depend on it), fp32,
# dropout 0 (dropout masks legitimately differ between layouts), ZeRO 0, no tracking. vocab 128
# divides by any TP size the test uses. grad_clip is low enough that clipping engages on every
# step, so the TP-aware global norm (DeepSpeed's clip_grad_norm_ with our mpu) is used (the
# test asserts that it engages). A wrong norm need not show in the losses (Adam cancels a
# consistent scale error), so the test compares the norms directly.
BASE = (
    "run.device=cpu",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=32",
    "model.vocab_size=128",
    "model.dropout=0.0",
    "parallel.micro_batch_size=4",
    "parallel.zero_stage=0",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=2",
    "optim.grad_clip=0.1",
    "run.train_steps=10",
    "tracking.enabled=false",
)

STEPS = 10
SEED = 0  # model seed of the runs under test
CONTROL_SEED = 1  # a different init: the negative control


@dataclass(frozen=True)
class Case:
    family: str  # "causal" | "causal_docs" | "mlm" | "span": the batch contract
    overrides: tuple[str, ...]


CASES: dict[str, Case] = {
    "gpt-learned-tied": Case(
        "causal", ("model.family=gpt", "model.positions=learned", "model.tie_embeddings=true")
    ),
    "gpt-learned-untied": Case(
        "causal", ("model.family=gpt", "model.positions=learned", "model.tie_embeddings=false")
    ),
    "gpt-rope-tied": Case(
        "causal", ("model.family=gpt", "model.positions=rope", "model.tie_embeddings=true")
    ),
    "gpt-rope-untied": Case(
        "causal", ("model.family=gpt", "model.positions=rope", "model.tie_embeddings=false")
    ),
    # Llama's choices: grouped-query attention (2 KV heads for 4 query heads: one KV group per
    # TP rank), SwiGLU, RMSNorm, rotary, no biases.
    "gpt-gqa-swiglu": Case(
        "causal",
        (
            "model.family=gpt",
            "model.positions=rope",
            "model.n_kv_heads=2",
            "model.activation=swiglu",
            "model.norm=rmsnorm",
            "model.bias=false",
            "model.tie_embeddings=false",
        ),
    ),
    "gpt-sinusoidal-geglu-postnorm": Case(
        "causal",
        (
            "model.family=gpt",
            "model.positions=sinusoidal",
            "model.activation=geglu",
            "model.norm_position=post",
        ),
    ),
    # Sliding-window attention on one of the two layers, inside documents (documents make the
    # attention take the chunked kernel with per-block masks).
    "gpt-window-docs": Case(
        "causal_docs",
        (
            "model.family=gpt",
            "model.positions=rope",
            "model.attention=sliding_window",
            "model.attention_window=6",
            "model.window_layers=[0]",
        ),
    ),
    # Longformer: a local window plus the first token's global attention, with padding.
    "bert-longformer": Case(
        "mlm",
        (
            "model.family=bert",
            "model.positions=learned",
            "model.norm_position=post",
            "model.attention=longformer",
            "model.attention_window=5",
            "model.global_positions=[0]",
        ),
    ),
    "bert": Case(
        "mlm",
        (
            "model.family=bert",
            "model.positions=learned",
            "model.norm_position=post",
            "model.activation=gelu",
        ),
    ),
    "t5": Case(
        "span",
        (
            "model.family=t5",
            "model.positions=relative",
            "model.n_decoder_layers=1",
            "model.norm=rmsnorm",
            "model.activation=relu",
            "model.bias=false",
        ),
    ),
}

# Variants of one TP>1 run. "plain": TP only. "sp": TP with sequence parallelism.
# "no_dgrad_reduce": the negative control for the gradient check: the backward all-reduce of
# every column-parallel layer's input gradient is switched off, which leaves the forward (and so
# the step-1 loss) exact but makes every gradient upstream of those layers wrong.
VARIANTS = ("plain", "sp", "no_dgrad_reduce")

# Config overrides that turn a variant on.
VARIANT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "plain": (),
    "sp": ("parallel.sequence_parallel=true",),
    "no_dgrad_reduce": (),
}


def run_name(case: str, tp: int, variant: str, seed: int) -> str:
    """The file stem a run's record is saved under."""
    return f"{case}.tp{tp}.{variant}.s{seed}"


def run_spec(case: str, variant: str, seed: int) -> str:
    """One run as the worker's command line names it."""
    return f"{case}/{variant}/{seed}"


def parse_spec(spec: str) -> tuple[str, str, int]:
    case, variant, seed = spec.split("/")
    return case, variant, int(seed)
