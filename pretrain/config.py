"""Typed run configuration: YAML in, validated dataclasses out.

One dataclass per section (run, model, data, optim, parallel, checkpoint, tracking). Decoding is
strict: an unknown key is rejected with the closest valid name, a wrong type or an invalid value
raises ConfigError naming the field, the value and the fix. Everything here runs before any
process group exists, so a bad config fails fast on a login node. This module imports only the
standard library and yaml (the launchers import it on machines without torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""

    def __init__(self, field_name: str, value: Any, fix: str):
        self.field_name, self.value, self.fix = field_name, value, fix
        super().__init__(f"config {field_name}={value!r}: {fix}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (rendered by `describe()`)."""
    if isinstance(default, (list, dict)):
        factory: Any = lambda d=default: type(d)(d)  # a fresh copy per instance
        return field(default_factory=factory, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _need(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(name, value, fix)


@dataclass
class RunConfig:
    name: str = _f("run", "Run name; the run directory is `output_dir/name`.")
    output_dir: str = _f("runs", "Parent directory of run directories.")
    seed: int = _f(1234, "Seed for weight init, data order and dropout.")
    train_steps: int = _f(100, "Optimizer steps of the whole run.")
    log_interval: int = _f(10, "Print and record train metrics every N steps.")
    eval_interval: int = _f(50, "Validation every N steps (0: only at the end).")
    eval_batches: int = _f(4, "Global batches of the validation split per evaluation.")
    resume: str = _f(
        "auto",
        "'auto': continue from the latest complete checkpoint of the run directory; "
        "'never': start fresh (refuses a run directory that holds checkpoints); "
        "or a path to a checkpoint directory.",
    )
    branch_from: str | None = _f(
        None,
        "With resume=auto: the checkpoint (step directory) to start from while the run "
        "directory holds none yet, e.g. a cooldown branched from a warmup-stable-decay run; "
        "once this run has saved, it resumes from its own checkpoints.",
    )
    exit_after_steps: int | None = _f(
        None,
        "Save a checkpoint and exit after this many steps of this launch (as a preempted "
        "job would); the next launch resumes.",
    )
    exit_after_minutes: float | None = _f(
        None, "Save a checkpoint and exit once this launch has run this long (Slurm time limits)."
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "'auto' uses CUDA when present.")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32",
        "bf16 mixed precision through DeepSpeed: bf16 weights and activations, fp32 master "
        "weights, gradient accumulation and reduction (needs parallel.zero_stage >= 1).",
    )
    sample_prompt: str = _f("", "Prompt for a sample generated at the end of training.")
    sample_tokens: int = _f(0, "Tokens to sample at the end of training (0: none).")
    peak_flops: float | None = _f(
        None,
        "Peak FLOP/s of one device for MFU (null: from the table in pretrain/perf.py for the "
        "detected GPU and precision, or an estimate for CPU threads).",
    )
    compile: bool = _f(
        False,
        "torch.compile every transformer block (the first step compiles: tens of seconds on "
        "CPU; later steps run the compiled kernels). Not with ZeRO-3 or mixture of experts.",
    )
    host_memory: Literal["reuse", "system"] = _f(
        "reuse",
        "How the process's C allocator (glibc) treats freed memory: 'reuse' keeps it for the "
        "next step (allocations up to 32 MiB from the heap, never trimmed), where the default "
        "returns each large block to the OS and the next step faults fresh pages in (about "
        "3% of a small CPU run, docs/performance.md); 'system' leaves glibc's defaults.",
    )
    profile_steps: list[int] = _f(
        [],
        "[a, b]: record a torch.profiler trace of steps a..b into the run directory "
        "(profile/); empty: no profiling.",
    )

    def validate(self) -> None:
        _need(
            bool(self.name) and "/" not in self.name,
            "run.name",
            self.name,
            "use a non-empty name without '/'",
        )
        for name in ("train_steps", "log_interval"):
            _need(
                getattr(self, name) >= 1, f"run.{name}", getattr(self, name), "use an integer >= 1"
            )
        for name in ("eval_interval", "eval_batches", "sample_tokens"):
            _need(
                getattr(self, name) >= 0, f"run.{name}", getattr(self, name), "use an integer >= 0"
            )
        if self.exit_after_steps is not None:
            _need(
                self.exit_after_steps >= 1,
                "run.exit_after_steps",
                self.exit_after_steps,
                "use an integer >= 1, or null to run to the end",
            )
        if self.peak_flops is not None:
            _need(self.peak_flops > 0, "run.peak_flops", self.peak_flops, "use FLOP/s > 0, or null")
        if self.profile_steps:
            a_b = self.profile_steps
            _need(
                len(a_b) == 2 and 1 <= a_b[0] <= a_b[1],
                "run.profile_steps",
                a_b,
                "use [first, last] step numbers with 1 <= first <= last, or []",
            )
        if self.exit_after_minutes is not None:
            _need(
                self.exit_after_minutes > 0,
                "run.exit_after_minutes",
                self.exit_after_minutes,
                "use a positive number of minutes, or null",
            )
        _need(
            self.resume in ("auto", "never") or bool(self.resume.strip()),
            "run.resume",
            self.resume,
            "use 'auto', 'never' or a checkpoint directory",
        )
        if self.branch_from is not None:
            _need(
                self.resume == "auto" and bool(self.branch_from.strip()),
                "run.branch_from",
                self.branch_from,
                f"needs run.resume=auto (got {self.resume!r}) and a checkpoint step directory; "
                f"or set run.branch_from=null",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class ModelConfig:
    family: Literal["gpt", "bert", "t5"] = _f(
        "gpt",
        "Model family: 'gpt' decoder-only causal LM, 'bert' encoder with a masked-LM head, "
        "'t5' encoder-decoder for span corruption (docs/models.md).",
    )
    n_layers: int = _f(4, "Transformer blocks (T5: encoder blocks).")
    n_decoder_layers: int | None = _f(None, "T5 decoder blocks (null: n_layers).")
    d_model: int = _f(128, "Hidden size.")
    n_heads: int = _f(4, "Attention heads (query heads).")
    n_kv_heads: int | None = _f(
        None,
        "Key/value heads: null or n_heads is multi-head, 1 multi-query, anything between "
        "grouped-query attention. Must divide n_heads and divide by parallel.tp.",
    )
    ffn_hidden: int | None = _f(None, "MLP hidden size (null: 4 * d_model).")
    seq_len: int = _f(128, "Tokens per training sequence.")
    vocab_size: int | None = _f(
        None, "Embedding rows (null: the dataset tokenizer's size, padded to vocab_multiple)."
    )
    vocab_multiple: int = _f(64, "Pad the vocabulary to a multiple of this times TP (speed).")
    tokenizer_vocab: int | None = _f(
        None,
        "Tokens the tokenizer has (null: set from the dataset). Rows of the embedding above it "
        "are padding whose logits are masked, so a checkpoint loads under another padding.",
    )
    positions: Literal["learned", "sinusoidal", "rope", "relative"] = _f(
        "learned",
        "Learned absolute, fixed sinusoidal, rotary, or T5's bucketed relative position bias "
        "('relative', T5 only).",
    )
    rope_theta: float = _f(10000.0, "Rotary base frequency.")
    rel_buckets: int = _f(32, "Buckets of T5's relative position bias.")
    rel_max_distance: int = _f(
        128, "Offsets beyond this share the last bucket of T5's relative position bias."
    )
    norm: Literal["layernorm", "rmsnorm"] = _f("layernorm", "LayerNorm or RMSNorm (no bias).")
    norm_position: Literal["pre", "post"] = _f(
        "pre", "'pre': x + f(norm(x)) (GPT-2, T5, Llama); 'post': norm(x + f(x)) (BERT)."
    )
    activation: Literal["gelu", "relu", "swiglu", "geglu"] = _f(
        "gelu",
        "MLP activation; swiglu and geglu are gated (three matrices of ffn_hidden columns).",
    )
    dropout: float = _f(0.0, "Dropout on attention probabilities and residual branches.")
    bias: bool = _f(True, "Biases in linear layers and norms.")
    tie_embeddings: bool = _f(True, "Share the input embedding with the output projection.")
    init_std: float = _f(
        0.02,
        "Std of the normal weight init; residual projections are scaled by 1/sqrt(2 * n_layers).",
    )
    norm_eps: float = _f(1e-5, "LayerNorm / RMSNorm epsilon.")
    recompute: Literal["none", "full", "selective"] = _f(
        "none",
        "Activation recomputation in the backward pass: 'none' keeps every activation; 'full' "
        "stores only a block's input and recomputes the whole block; 'selective' recomputes "
        "only the attention core (q, k, v -> softmax and dropout -> o), whose [b, h, s, s] "
        "probabilities are the largest activation (Megatron's selective recompute).",
    )
    recompute_interval: int = _f(
        1,
        "With recompute full or selective: recompute the blocks whose index (0-based, counted "
        "per stack) % recompute_interval == 0, i.e. blocks 0, N, 2N, ... (1: every block).",
    )
    moe_experts: int = _f(
        0,
        "Experts per mixture-of-experts layer (0: a dense model). docs/moe.md; GPT and BERT "
        "blocks, T5 encoder blocks.",
    )
    moe_every: int = _f(
        2, "Every N-th block is MoE: blocks N-1, 2N-1, ... (2: every other block, as Switch)."
    )
    moe_top_k: int = _f(1, "Experts per token: 1 (Switch) or 2 (GShard).")
    moe_capacity_factor: float = _f(
        1.25,
        "Training capacity per expert: ceil(k * tokens / experts * factor) tokens, the rest "
        "dropped (passed on by the residual connection).",
    )
    moe_eval_capacity_factor: float = _f(2.0, "Capacity factor in evaluation and generation.")
    moe_min_capacity: int = _f(4, "Capacity never below this many tokens per expert.")
    moe_drop_tokens: bool = _f(
        True, "Drop tokens beyond capacity; false: capacity grows to the busiest expert."
    )
    moe_random_token_selection: bool = _f(
        False,
        "Keep a random subset of an over-full expert's tokens (DeepSpeed's RTS) instead of the "
        "first ones in order.",
    )
    moe_jitter: float = _f(
        0.0, "Multiplicative router-input jitter epsilon in training (Switch uses 0.01)."
    )
    moe_aux_loss_weight: float = _f(0.01, "Weight of the load-balancing loss in the objective.")
    moe_z_loss_weight: float = _f(0.001, "Weight of the router z-loss (ST-MoE) in the objective.")
    attention: Literal["full", "sliding_window", "longformer"] = _f(
        "full",
        "Attention pattern: 'full' (every allowed key), 'sliding_window' (GPT: each token sees "
        "the attention_window most recent tokens, itself included), 'longformer' (BERT: keys "
        "within attention_window - 1 positions on either side, plus global_positions that see "
        "and are seen by every token). Costs and kernels: docs/models.md.",
    )
    attention_window: int = _f(
        256, "Window of sliding_window / longformer attention, in tokens (see model.attention)."
    )
    window_layers: list[int] | None = _f(
        None,
        "With sliding_window: the 0-based block indices that use the window (null: all); e.g. "
        "[0, 2, 4] alternates windowed and full layers.",
    )
    global_positions: list[int] = _f(
        [0], "With longformer: the positions with global attention (BERT's first token: [0])."
    )

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_multiple"):
            _need(
                getattr(self, name) >= 1,
                f"model.{name}",
                getattr(self, name),
                "use an integer >= 1",
            )
        _need(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            self.n_heads,
            f"d_model={self.d_model} must divide by n_heads; valid n_heads: "
            f"{_divisors_near(self.d_model, self.n_heads)}",
        )
        if self.positions == "rope":
            _need(
                self.head_dim % 2 == 0,
                "model.n_heads",
                self.n_heads,
                f"rotary positions need an even head size, got d_model/n_heads={self.head_dim}",
            )
        if self.ffn_hidden is not None:
            _need(self.ffn_hidden >= 1, "model.ffn_hidden", self.ffn_hidden, "use >= 1 or null")
        if self.vocab_size is not None:
            _need(self.vocab_size >= 2, "model.vocab_size", self.vocab_size, "use >= 2 or null")
        _need(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "use a value in [0, 1)")
        _need(
            self.recompute_interval >= 1,
            "model.recompute_interval",
            self.recompute_interval,
            "use an integer >= 1 (1 recomputes every block)",
        )
        _need(
            self.recompute != "none" or self.recompute_interval == 1,
            "model.recompute_interval",
            self.recompute_interval,
            "has no effect with model.recompute=none; set model.recompute=full or selective, "
            "or leave recompute_interval at 1",
        )
        _need(self.init_std > 0, "model.init_std", self.init_std, "use a positive std")
        _need(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "use a positive epsilon")
        _need(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "use a positive base")
        self._validate_heads_and_positions()
        self._validate_moe()
        self._validate_attention()

    def _validate_moe(self) -> None:
        _need(self.moe_experts >= 0, "model.moe_experts", self.moe_experts, "use 0 or >= 2")
        if self.moe_experts == 0:
            return
        _need(
            self.moe_experts >= 2,
            "model.moe_experts",
            self.moe_experts,
            "a mixture needs at least 2 experts; use 0 for a dense model",
        )
        _need(
            1 <= self.moe_every <= self.n_layers,
            "model.moe_every",
            self.moe_every,
            f"use 1..n_layers={self.n_layers} (1: every block is MoE)",
        )
        _need(self.moe_top_k in (1, 2), "model.moe_top_k", self.moe_top_k, "use 1 or 2")
        for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            _need(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "use > 0")
        _need(
            self.moe_min_capacity >= 0, "model.moe_min_capacity", self.moe_min_capacity, "use >= 0"
        )
        _need(0.0 <= self.moe_jitter < 1.0, "model.moe_jitter", self.moe_jitter, "use [0, 1)")
        for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
            _need(getattr(self, name) >= 0, f"model.{name}", getattr(self, name), "use >= 0")

    def _validate_attention(self) -> None:
        family = {"sliding_window": "gpt", "longformer": "bert"}.get(self.attention)
        _need(
            family is None or self.family == family,
            "model.attention",
            self.attention,
            f"{self.attention} attention is for model.family={family}; use "
            f"{'sliding_window' if self.family == 'gpt' else 'longformer'} for "
            f"{self.family}"
            if self.family != "t5"
            else "T5 supports only attention: full",
        )
        _need(
            self.attention_window >= 1,
            "model.attention_window",
            self.attention_window,
            "use an integer >= 1 (tokens)",
        )
        for i in self.window_layers or []:
            _need(
                0 <= i < self.n_layers,
                "model.window_layers",
                self.window_layers,
                f"block indices are 0..{self.n_layers - 1}; null windows every block",
            )
        _need(
            self.window_layers is None or self.attention == "sliding_window",
            "model.window_layers",
            self.window_layers,
            "only applies with model.attention: sliding_window; remove it or set that",
        )
        for p in self.global_positions:
            _need(
                0 <= p < self.seq_len,
                "model.global_positions",
                self.global_positions,
                f"positions are 0..{self.seq_len - 1} (seq_len={self.seq_len})",
            )

    def _validate_heads_and_positions(self) -> None:
        if self.n_decoder_layers is not None:
            _need(
                self.n_decoder_layers >= 1,
                "model.n_decoder_layers",
                self.n_decoder_layers,
                "use an integer >= 1, or null for n_layers",
            )
        if self.n_kv_heads is not None:
            _need(
                self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                "model.n_kv_heads",
                self.n_kv_heads,
                f"must divide n_heads={self.n_heads}; valid: "
                f"{_divisors_near(self.n_heads, self.n_kv_heads)}, or null for n_heads",
            )
        _need(
            (self.positions == "relative") == (self.family == "t5"),
            "model.positions",
            self.positions,
            "T5 uses positions: relative, and only T5 does"
            if self.family == "t5"
            else "'relative' is T5's position bias; use learned, sinusoidal or rope",
        )
        if self.positions == "relative":
            _need(
                self.rel_buckets >= 4 and self.rel_buckets % 2 == 0,
                "model.rel_buckets",
                self.rel_buckets,
                "use an even number >= 4 (the encoder splits buckets by direction)",
            )
            _need(
                self.rel_max_distance > self.rel_buckets // 2,
                "model.rel_max_distance",
                self.rel_max_distance,
                f"must exceed rel_buckets/2={self.rel_buckets // 2} (the exactly bucketed "
                f"offsets); T5 uses 128",
            )


@dataclass
class DataConfig:
    path: str = _f("data/stdlib", "Dataset directory written by `pretrain-data build`.")
    shuffle_window: int = _f(
        8192,
        "Sequences are shuffled inside consecutive windows of this many (1: no shuffle). "
        "A window holds window * (seq_len + 1) tokens in memory per rank (2 bytes each for "
        "vocabularies up to 65536); a window as large as an epoch shuffles globally.",
    )
    shuffle_run: int = _f(
        1,
        "The shuffle moves runs of this many adjacent sequences, each kept in order (1: single "
        "sequences). Runs let a data-parallel rank read neighbouring sequences together, which "
        "pays for short ones: at 128 tokens, 4 cuts a rank's bytes read at DP=4 from 0.40 to "
        "0.27 of DP=1's (at 64 tokens, 8: 0.53 to 0.29), at the price of batches holding runs "
        "of neighbouring text. Aim for runs of about 1 KB of ids; best a divisor of "
        "parallel.micro_batch_size.",
    )
    blend: list[str] = _f(
        [],
        "Datasets mixed by weight, as 'WEIGHT PATH' entries, e.g. ['0.7 data/web', "
        "'0.3 data/code'] (weights are relative); when non-empty it replaces data.path. The "
        "datasets must share their tokenizer.",
    )
    document_mask: bool = _f(
        False,
        "Causal objective: also pass doc_ids (each token's document within its sequence) so "
        "that attention stays inside documents.",
    )
    mask_prob: float = _f(
        0.15,
        "Masked LM: share of non-special positions chosen for prediction; of those 80% become "
        "the mask token, 10% a random token, 10% stay.",
    )
    noise_density: float = _f(0.15, "Span corruption: share of raw tokens in corrupted spans.")
    mean_span: float = _f(3.0, "Span corruption: mean length of a corrupted span, in tokens.")
    num_workers: int = _f(0, "Loader worker processes per rank (0: in the training process).")
    prefetch: int = _f(2, "Micro-batches each loader worker prepares ahead.")

    def validate(self) -> None:
        _need(
            self.shuffle_window >= 1,
            "data.shuffle_window",
            self.shuffle_window,
            "use an integer >= 1 (1 disables shuffling)",
        )
        _need(
            self.shuffle_run >= 1 and self.shuffle_window % self.shuffle_run == 0,
            "data.shuffle_run",
            self.shuffle_run,
            f"use an integer >= 1 that divides data.shuffle_window={self.shuffle_window} "
            f"(runs do not cross windows)",
        )
        from data_pipeline.blend_spec import parse_blend_entry

        for i, entry in enumerate(self.blend):
            try:
                parse_blend_entry(entry)
            except ValueError as e:
                raise ConfigError(f"data.blend[{i}]", entry, str(e)) from None
        for name in ("mask_prob", "noise_density"):
            value = getattr(self, name)
            _need(0 < value < 1, f"data.{name}", value, "use a value in (0, 1)")
        _need(self.mean_span >= 1, "data.mean_span", self.mean_span, "use a length >= 1")
        _need(self.num_workers >= 0, "data.num_workers", self.num_workers, "use >= 0")
        _need(self.prefetch >= 1, "data.prefetch", self.prefetch, "use >= 1")


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr: float = _f(3e-5, "Final learning rate of the cosine schedule.")
    schedule: Literal["cosine", "inverse_sqrt", "constant", "wsd"] = _f(
        "cosine",
        "After linear warmup: cosine decay to min_lr, the Transformer's inverse "
        "square root, constant, or warmup-stable-decay ('wsd': the peak until the last "
        "cooldown_fraction of run.train_steps, then a cooldown to min_lr; Hägele et al. 2024).",
    )
    cooldown_fraction: float = _f(
        0.2,
        "schedule=wsd: share of run.train_steps spent in the cooldown (its last steps).",
    )
    cooldown_shape: Literal["linear", "1-sqrt"] = _f(
        "1-sqrt",
        "schedule=wsd: the cooldown's shape, from the peak to min_lr: linear, or 1-sqrt "
        "(multiplier 1 - sqrt(progress), which Hägele et al. found better).",
    )
    warmup_steps: int = _f(
        100, "Linear warmup steps: step k of W uses lr * k / W, from lr / W to lr."
    )
    decay_steps: int | None = _f(None, "Steps of the cosine decay (null: run.train_steps).")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases, norms, positions).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    implementation: Literal["default", "foreach", "fused"] = _f(
        "default",
        "torch AdamW's kernel: 'default' lets torch choose (one tensor at a time on CPU, "
        "foreach on GPU), 'foreach' batches the tensors of a group, 'fused' runs the whole "
        "update in one kernel per group (CPU and GPU). Same math, rounding may differ "
        "(docs/performance.md).",
    )

    def validate(self) -> None:
        _need(self.lr > 0, "optim.lr", self.lr, "use a positive learning rate")
        _need(
            0 <= self.min_lr <= self.lr,
            "optim.min_lr",
            self.min_lr,
            f"use a value in [0, optim.lr={self.lr}]",
        )
        _need(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "use >= 0")
        if self.decay_steps is not None:
            _need(self.decay_steps >= 1, "optim.decay_steps", self.decay_steps, "use >= 1 or null")
        _need(
            0 < self.cooldown_fraction <= 1,
            "optim.cooldown_fraction",
            self.cooldown_fraction,
            "use a share of the run in (0, 1], e.g. 0.2",
        )
        _need(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _need(0 <= v < 1, f"optim.{name}", v, "use a value in [0, 1)")
        _need(self.eps > 0, "optim.eps", self.eps, "use a positive epsilon")
        _need(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "use >= 0 (0 disables)")


@dataclass
class ParallelConfig:
    tp: int = _f(1, "Tensor-parallel size.")
    pp: int = _f(1, "Pipeline-parallel size.")
    dp: int | None = _f(None, "Data-parallel size (null: world size / (tp * pp)).")
    zero_stage: int = _f(
        0,
        "DeepSpeed ZeRO stage 0-3 (1 and 2 run as 0 in fp32 with one data-parallel rank and "
        "no pipeline, where they would partition nothing).",
    )
    micro_batch_size: int = _f(8, "Sequences per rank per forward pass.")
    global_batch_size: int | None = _f(
        None,
        "Sequences per optimizer step over all data-parallel ranks "
        "(null: micro_batch_size * dp, no accumulation).",
    )
    ep: int = _f(
        1,
        "Expert-parallel size (mixture of experts): each MoE layer's experts are sharded over "
        "groups of ep data-parallel ranks; must divide dp and model.moe_experts.",
    )
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "'auto': NCCL on CUDA, else gloo.")
    sequence_parallel: bool = _f(
        False,
        "Shard norms and dropout over the sequence inside each tensor-parallel group "
        "(megatron's sequence parallelism); seq_len must divide by tp; no effect at tp=1.",
    )
    pipeline_partition: Literal["uniform", "parameters"] = _f(
        "uniform",
        "How pipeline stages split the model (pp > 1): 'uniform' gives every stage the same "
        "number of transformer blocks (they must divide by pp); 'parameters' balances parameter "
        "counts (the embedding counts) and is refused when it leaves a stage without a block.",
    )

    def validate(self) -> None:
        for name in ("tp", "pp", "micro_batch_size"):
            _need(getattr(self, name) >= 1, f"parallel.{name}", getattr(self, name), "use >= 1")
        # DeepSpeed's pipeline engine supports ZeRO-1 only: ZeRO-2 and 3 partition the
        # gradients and weights its 1F1B schedule keeps whole across micro-batches.
        _need(
            self.pp == 1 or self.zero_stage <= 1,
            "parallel.zero_stage",
            self.zero_stage,
            f"ZeRO-2 and ZeRO-3 do not work with pipeline parallelism (parallel.pp={self.pp}): "
            f"use parallel.zero_stage=1 (optimizer state sharded over data parallelism), or "
            f"parallel.pp=1 with ZeRO-2/3",
        )
        if self.dp is not None:
            _need(self.dp >= 1, "parallel.dp", self.dp, "use >= 1 or null")
        _need(
            self.zero_stage in (0, 1, 2, 3),
            "parallel.zero_stage",
            self.zero_stage,
            "use 0, 1, 2 or 3",
        )
        if self.global_batch_size is not None:
            _need(
                self.global_batch_size >= 1,
                "parallel.global_batch_size",
                self.global_batch_size,
                "use >= 1 or null",
            )

    def layout(self, world_size: int, model: ModelConfig | None = None) -> tuple[int, int]:
        """(dp, gradient accumulation steps) for a world size; ConfigError when it does not fit.
        With the model, a refused tp comes with the sizes valid for the whole layout."""
        model_parallel = self.tp * self.pp
        valid = ""
        if model is not None:
            tps = _layout_tps(model, world_size, self.pp)
            valid = f"use parallel.tp in {tps} (they divide the world and the heads), or "
        _need(
            world_size % model_parallel == 0,
            "parallel.tp" if self.pp == 1 else "parallel.tp*parallel.pp",
            model_parallel,
            f"the world size {world_size} must divide by tp*pp={model_parallel} "
            f"(tp={self.tp}, pp={self.pp}); {valid}"
            f"launch a multiple of {model_parallel} processes or change the layout",
        )
        dp = world_size // model_parallel
        _need(
            dp % self.ep == 0,
            "parallel.ep",
            self.ep,
            f"expert parallelism shards experts inside the data-parallel group; dp={dp} (world "
            f"size {world_size}) must divide by ep: use ep in {_divisors_near(dp, self.ep)}",
        )
        if self.dp is not None:
            _need(
                self.dp == dp,
                "parallel.dp",
                self.dp,
                f"world size {world_size} with tp={self.tp}, pp={self.pp} gives dp={dp}; "
                f"set parallel.dp={dp} or null, or launch {self.dp * model_parallel} processes",
            )
        per_step = self.micro_batch_size * dp
        gbs = self.global_batch_size if self.global_batch_size is not None else per_step
        below, above = gbs // per_step * per_step, (gbs // per_step + 1) * per_step
        _need(
            gbs % per_step == 0,
            "parallel.global_batch_size",
            gbs,
            f"must be a multiple of micro_batch_size*dp={per_step}; nearest valid: "
            + (f"{below} or {above}" if below else f"{above}"),
        )
        return dp, gbs // per_step


@dataclass
class CheckpointConfig:
    interval: int = _f(0, "Save every N steps (0: only at the end and on exit).")
    keep_last: int = _f(3, "Keep the newest K complete checkpoints (0: keep all).")
    keep_every: int = _f(
        0,
        "Also keep, beyond keep_last, every checkpoint whose step is a multiple of M (0: none).",
    )
    dir: str | None = _f(None, "Checkpoint directory (null: <run dir>/checkpoints).")
    exclude_from_loading: list[str] = _f(
        [],
        "Parts of a checkpoint not restored on resume: any of 'data', 'rng', 'optimizer', "
        "'scheduler' (e.g. to switch data sets mid-run).",
    )

    LOADABLE = ("data", "rng", "optimizer", "scheduler")

    def validate(self) -> None:
        _need(self.interval >= 0, "checkpoint.interval", self.interval, "use >= 0")
        _need(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "use >= 0")
        _need(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every, "use >= 0")
        for part in self.exclude_from_loading:
            _need(
                part in self.LOADABLE,
                "checkpoint.exclude_from_loading",
                part,
                f"use any of {list(self.LOADABLE)}{_suggest(part, self.LOADABLE)}",
            )


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "Record the run in MLflow (rank 0 only).")
    uri: str | None = _f(
        None,
        "MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else a SQLite file "
        "<output_dir>/mlflow.db).",
    )
    experiment: str = _f("pretrain", "MLflow experiment name.")
    parent_run_id: str | None = _f(
        None,
        "MLflow run this run is a child of (pretrain-sweep sets it to the sweep's run).",
    )
    tags: list[str] = _f(
        [], "Extra MLflow tags as 'KEY=VALUE' entries (pretrain-sweep: sweep name, point id)."
    )
    metrics_interval: float = _f(
        10.0,
        "Seconds log steps' metric records may wait to reach the store together, in one "
        "batch (each delivery takes CPU and the GIL from training: about 5 ms on a SQLite "
        "store); 0 sends each log step's records at once. The run's end, and any other call, "
        "sends them without waiting.",
    )
    flush_timeout: float = _f(
        30.0,
        "Seconds the end of a run waits for records not yet delivered to the store (an "
        "unreachable server); what is left then is dropped with a warning.",
    )

    def validate(self) -> None:
        _need(bool(self.experiment), "tracking.experiment", self.experiment, "use a non-empty name")
        _need(self.flush_timeout >= 0, "tracking.flush_timeout", self.flush_timeout, "use >= 0")
        _need(
            self.metrics_interval >= 0,
            "tracking.metrics_interval",
            self.metrics_interval,
            "use >= 0 (0: send every log step's metrics at once)",
        )
        for i, tag in enumerate(self.tags):
            _need(
                "=" in tag and bool(tag.partition("=")[0].strip()),
                f"tracking.tags[{i}]",
                tag,
                "use 'KEY=VALUE', e.g. 'sweep=ladder'",
            )


@dataclass
class ReliabilityConfig:
    nonfinite: Literal["skip", "stop"] = _f(
        "stop",
        "A non-finite loss or gradient norm on any rank: 'skip' discards the step's update on "
        "every rank (weights, optimizer state and schedule stay; the batch is consumed); "
        "'stop' saves the state from before the step and stops (docs/reliability.md).",
    )
    max_consecutive_skips: int = _f(
        3, "Stop (saving the last good state) after this many skipped steps in a row."
    )
    spike_action: Literal["off", "log", "skip", "rollback"] = _f(
        "log",
        "A loss or gradient norm above mean + spike_sigma * std of the last spike_window "
        "steps: only 'log' it, 'skip' the step's update, or 'rollback' to the last checkpoint "
        "with the data position kept past the offending batches.",
    )
    spike_sigma: float = _f(6.0, "Spike threshold in standard deviations above the mean.")
    spike_window: int = _f(128, "Steps of the spike statistics; detection starts once full.")
    collective_timeout_s: float = _f(
        600.0, "Seconds any collective of a training step may wait for the other ranks."
    )
    startup_timeout_s: float = _f(
        1800.0,
        "Seconds for process-group start-up, the first step, checkpoint saves and loads "
        "(both the collective timeout and the watchdog's limit then).",
    )
    step_timeout_s: float | None = _f(
        1800.0,
        "Watchdog: end the job, naming the rank and step, when no step completes in this many "
        "seconds (null: no watchdog).",
    )
    inject: list[str] = _f(
        [],
        "TEST ONLY: faults to inject, 'KIND@STEP' or 'KIND@STEP:RANK' (rank 0 if omitted), "
        "KIND one of nan, spike, sigterm, sigusr1, sigint, sigstop, sigkill, hang, error "
        "(before the step), late-sigterm (SIGTERM during the step's forward pass).",
    )

    INJECTABLE = (
        "nan", "spike", "sigterm", "sigusr1", "sigint", "sigstop", "sigkill", "hang", "error",
        "late-sigterm",
    )  # fmt: skip

    def validate(self) -> None:
        _need(
            self.max_consecutive_skips >= 1,
            "reliability.max_consecutive_skips",
            self.max_consecutive_skips,
            "use an integer >= 1",
        )
        _need(self.spike_sigma > 0, "reliability.spike_sigma", self.spike_sigma, "use > 0")
        _need(self.spike_window >= 2, "reliability.spike_window", self.spike_window, "use >= 2")
        for name in ("collective_timeout_s", "startup_timeout_s", "step_timeout_s"):
            value = getattr(self, name)
            _need(
                value is None or value > 0,
                f"reliability.{name}",
                value,
                "use a positive number of seconds, or null where allowed (step_timeout_s)",
            )
        for i, entry in enumerate(self.inject):
            kind, _, where = entry.partition("@")
            step, _, rank = where.partition(":")
            _need(
                kind in self.INJECTABLE and step.isdigit() and (rank == "" or rank.isdigit()),
                f"reliability.inject[{i}]",
                entry,
                f"use 'KIND@STEP' or 'KIND@STEP:RANK' with KIND in {list(self.INJECTABLE)}",
            )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)

    def validate(self, world_size: int | None = None) -> Config:
        """With the world size (the entry point knows it), the layout is checked before the
        model's divisibility by tp, and suggested tp sizes fit the world as well."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        self._world_size = world_size
        if world_size is not None:
            self.parallel.layout(world_size, self.model)
        decay = self.optim.decay_steps or self.run.train_steps
        _need(
            self.optim.warmup_steps <= decay,
            "optim.warmup_steps",
            self.optim.warmup_steps,
            f"must not exceed the decay length {decay} (optim.decay_steps or run.train_steps)",
        )
        if self.optim.schedule == "wsd":
            cooldown = max(1, round(self.optim.cooldown_fraction * self.run.train_steps))
            _need(
                self.optim.warmup_steps <= self.run.train_steps - cooldown,
                "optim.warmup_steps",
                self.optim.warmup_steps,
                f"schedule=wsd cools down over the last {cooldown} of run.train_steps="
                f"{self.run.train_steps}; warm up in at most {self.run.train_steps - cooldown} "
                f"steps, or lower optim.cooldown_fraction",
            )
        if self.model.vocab_size is not None:
            multiple = self.model.vocab_multiple * self.parallel.tp
            _need(
                self.model.vocab_size % self.parallel.tp == 0,
                "model.vocab_size",
                self.model.vocab_size,
                f"must divide by parallel.tp={self.parallel.tp}; nearest "
                f"valid: {math.ceil(self.model.vocab_size / multiple) * multiple}",
            )
        # DeepSpeed 0.19.8 without ZeRO runs bf16 through its fp16-style optimizer, which sums
        # micro-batch gradients and all-reduces them in bf16, and it rejects fp32 accumulation
        # there; ZeRO-1 has the same per-rank parameter and gradient memory and accumulates in
        # fp32 (BF16_Optimizer). pretrain.engine sets the fp32 dtypes for stages 1-3.
        _need(
            self.run.precision != "bf16" or self.parallel.zero_stage >= 1,
            "parallel.zero_stage",
            self.parallel.zero_stage,
            "run.precision=bf16 needs ZeRO stage 1, 2 or 3 for fp32 gradient accumulation and "
            "reduction (stage 0 would sum gradients in bf16); set parallel.zero_stage=1, or "
            "run.precision=fp32",
        )
        self._validate_tensor_parallel()
        self._validate_pipeline()
        self._validate_experts()
        self._validate_compile()
        return self

    def _validate_compile(self) -> None:
        """Untested combinations are refused rather than left to fail inside a trace:
        ZeRO-3's gather hooks and DeepSpeed's MoE all-to-all run inside the blocks."""
        if not self.run.compile:
            return
        for ok, key, value, why in (
            (self.parallel.zero_stage != 3, "parallel.zero_stage", self.parallel.zero_stage,
             "ZeRO-3 gathers each block's weights in hooks around it"),
            (not self.model.moe_experts, "model.moe_experts", self.model.moe_experts,
             "the experts' all-to-all runs inside the block"),
        ):  # fmt: skip
            _need(ok, key, value, f"run.compile=true is not supported here ({why}); set "
                  "run.compile=false or change this value")  # fmt: skip

    def _validate_experts(self) -> None:
        """What mixture-of-experts layers compose with (docs/moe.md): data, expert, tensor and
        sequence parallelism, ZeRO 0-2; not (yet) pipeline parallelism or ZeRO-3."""
        m, p = self.model, self.parallel
        _need(p.ep >= 1, "parallel.ep", p.ep, "use an integer >= 1")
        if m.moe_experts == 0:
            _need(p.ep == 1, "parallel.ep", p.ep, "expert parallelism needs model.moe_experts > 0")
            return
        _need(
            m.moe_experts % p.ep == 0,
            "parallel.ep",
            p.ep,
            f"model.moe_experts={m.moe_experts} must divide by ep; use ep in "
            f"{_divisors_near(m.moe_experts, p.ep)}",
        )
        for name, value, ok, why in (
            ("pp", p.pp, p.pp == 1, "MoE layers are not built into pipeline stages"),
            ("zero_stage", p.zero_stage, p.zero_stage <= 2, "DeepSpeed's MoE refuses ZeRO-3"),
        ):
            _need(
                ok,
                f"parallel.{name}",
                value,
                f"not supported with mixture of experts (model.moe_experts={m.moe_experts}): "
                f"{why}; use data, expert and tensor parallelism with ZeRO 0-2",
            )
        tokens = p.micro_batch_size * m.seq_len
        _need(
            m.moe_min_capacity <= tokens,
            "model.moe_min_capacity",
            m.moe_min_capacity,
            f"exceeds the {tokens} tokens of a micro-batch (micro_batch_size * seq_len)",
        )

    def _validate_pipeline(self) -> None:
        """Every pipeline stage needs at least one transformer block; 'uniform' partitioning
        gives each the same number."""
        m, p = self.model, self.parallel
        if p.pp == 1:
            return
        blocks = m.n_layers + (m.decoder_layers if m.family == "t5" else 0)
        what = "n_layers + decoder layers" if m.family == "t5" else "n_layers"
        _need(
            blocks >= p.pp,
            "parallel.pp",
            p.pp,
            f"{p.pp} pipeline stages need at least as many transformer blocks; the model has "
            f"{blocks} ({what}): use parallel.pp <= {blocks} or more layers",
        )
        if p.pipeline_partition == "uniform":
            _need(
                blocks % p.pp == 0,
                "parallel.pp",
                p.pp,
                f"parallel.pipeline_partition=uniform needs the {blocks} transformer blocks "
                f"({what}) to divide by pp: use pp in {_divisors_near(blocks, p.pp)}, or "
                f"pipeline_partition=parameters",
            )

    def _validate_tensor_parallel(self) -> None:
        """Every tensor-parallel rank holds whole heads, whole KV groups and an equal share of
        the MLP columns; sequence parallelism shards the sequence itself."""
        m, tp = self.model, self.parallel.tp
        # TP sizes that split heads, KV groups and MLP columns alike.
        tps = _divisors_near(math.gcd(m.n_heads, m.kv_heads, m.ffn_size), tp)
        world = getattr(self, "_world_size", None)
        if world is not None:
            tps = _layout_tps(m, world, self.parallel.pp)
        # (name, value, what else a replacement value must satisfy)
        for name, value, fits in (
            ("n_heads", m.n_heads, lambda h: m.d_model % h == 0),
            ("n_kv_heads", m.kv_heads, lambda h: m.n_heads % h == 0),
            ("ffn_hidden", m.ffn_size, lambda f: True),
        ):
            near = _multiples_near(value, tp, fits)
            _need(
                value % tp == 0,
                f"model.{name}",
                value,
                f"must divide by parallel.tp={tp}; "
                + (f"nearest valid {name}: {near}, or " if near else "")
                + f"parallel.tp in {tps}",
            )
        if self.parallel.sequence_parallel:  # a no-op at tp=1, as in megatron
            _need(
                m.seq_len % tp == 0,
                "model.seq_len",
                m.seq_len,
                f"sequence parallelism splits the sequence over parallel.tp={tp} ranks; "
                f"nearest valid seq_len: {_multiples_near(m.seq_len, tp)}",
            )

    @property
    def checkpoint_dir(self) -> Path:
        return (
            Path(self.checkpoint.dir) if self.checkpoint.dir else self.run.run_dir / "checkpoints"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flatten(self) -> dict[str, Any]:
        """{"model.n_layers": 4, ...}: the form MLflow params and the CLI overrides use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# --- decoding ----------------------------------------------------------------------------------


def _suggest(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _divisors_near(n: int, k: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divs, key=lambda d: abs(d - k))[:3])


def _multiples_near(n: int, k: int, fits: typing.Callable[[int], bool] = bool) -> list[int]:
    """Up to two multiples of k nearest to n that also satisfy `fits`."""
    candidates = [m for m in range(k, 2 * n + k + 1, k) if fits(m)]
    return sorted(sorted(candidates, key=lambda m: (abs(m - n), m))[:2])


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type hint; ints widen to floats, nothing else converts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is Literal:
        _need(value in args, name, value, f"use one of {list(args)}{_suggest(str(value), args)}")
        return value
    if origin is list:
        _need(isinstance(value, list), name, value, "use a list, e.g. [a, b]")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        _need(isinstance(value, bool), name, value, "use true or false")
        return value
    if hint is int:
        _need(isinstance(value, int) and not isinstance(value, bool), name, value, "use an integer")
        return value
    if hint is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _need(
            not isinstance(value, float) or math.isfinite(value), name, value, "use a finite number"
        )
        _need(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            name,
            value,
            "use a number",
        )
        return float(value)
    if hint is str:
        _need(isinstance(value, str), name, value, "use a string (quote it in YAML)")
        return value
    raise TypeError(f"unsupported config type {hint} for {name}")  # a bug here, not user input


def _decode(cls: type, data: Any, prefix: str) -> Any:
    _need(isinstance(data, dict), prefix or "config", data, "use a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        _need(
            key in names,
            full,
            value,
            f"unknown key; valid keys: {', '.join(names)}{_suggest(str(key), names)}",
        )
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _decode(hint, value if value is not None else {}, full)
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config mapping."""
    sections = [f.name for f in dataclasses.fields(Config)]
    if overrides:
        _need(isinstance(data, dict), "config", data, "use a mapping of keys to values")
    for item in overrides:
        path, sep, raw = item.partition("=")
        _need(
            bool(sep) and "." in path,
            "override",
            item,
            "write overrides as section.key=value, e.g. model.n_layers=4",
        )
        section, key = path.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(
                path, raw, f"the value is not valid YAML; quote it, e.g. {path}='{raw}'"
            ) from None
        _need(
            section in sections,
            path,
            value,
            f"unknown section; valid: {', '.join(sections)}{_suggest(section, sections)}",
        )
        if data.get(section) is None:  # absent, or an empty `section:` line in the file
            data[section] = {}
        _need(
            isinstance(data[section], dict), section, data[section], "a section must be a mapping"
        )
        data[section][key] = value
    return data


def _layout_tps(m: ModelConfig, world_size: int, pp: int) -> list[int]:
    """TP sizes that split heads, KV groups and MLP columns alike and fit world_size with pp."""
    g = math.gcd(m.n_heads, m.kv_heads, m.ffn_size)
    return [t for t in range(1, g + 1) if g % t == 0 and world_size % (t * pp) == 0]


def from_dict(data: dict[str, Any], world_size: int | None = None) -> Config:
    """Decode and validate a raw mapping."""
    return _decode(Config, data, "").validate(world_size)


def load_config(
    path: str | Path | None, overrides: typing.Sequence[str] = (), world_size: int | None = None
) -> Config:
    """Read a YAML file (or none: all defaults), apply dotted overrides, decode and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _need(p.is_file(), "config file", str(p), "pass the path of an existing YAML file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config file", str(p), f"fix the YAML syntax: {e}") from None

    return from_dict(apply_overrides(data, overrides), world_size)


def describe() -> str:
    """The config reference as Markdown, generated from the dataclasses (docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m pretrain.config`; do not edit by hand.",
        "",
    ]
    hints_cfg = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints_cfg[section.name]
        lines += [
            f"## `{section.name}`",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            hint = hints[f.name]
            type_name = hint.__name__ if isinstance(hint, type) else str(hint)
            # Escape '|' (as in `int | None`): it would split a Markdown table cell.
            type_name = type_name.replace("typing.", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{type_name}` | `{default!r}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> Config:
    """Fill in model.vocab_size from the dataset's tokenizer, padded to a multiple of
    vocab_multiple * tp (so every TP rank holds an equal, aligned slice)."""
    m = cfg.model
    _need(
        m.tokenizer_vocab in (None, tokenizer_vocab),
        "model.tokenizer_vocab",
        m.tokenizer_vocab,
        f"the dataset's tokenizer has {tokenizer_vocab} tokens; leave it null to derive it",
    )
    multiple = m.vocab_multiple * cfg.parallel.tp
    if m.vocab_size is None:
        size = math.ceil(tokenizer_vocab / multiple) * multiple
    else:
        _need(
            m.vocab_size >= tokenizer_vocab,
            "model.vocab_size",
            m.vocab_size,
            f"the dataset's tokenizer has {tokenizer_vocab} tokens; use at least that, or null "
            f"to derive it",
        )
        size = m.vocab_size
    model = dataclasses.replace(m, vocab_size=size, tokenizer_vocab=tokenizer_vocab)
    return dataclasses.replace(cfg, model=model)


if __name__ == "__main__":
    print(describe())
