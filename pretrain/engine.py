"""The DeepSpeed engine: its JSON config derived from ours, and `deepspeed.initialize`.

AdamW is DeepSpeed's wrapper around the torch implementation (`torch_adam`), so nothing is
compiled on any machine; ZeRO stages 0-3, gradient accumulation, clipping and bf16 all come from
the run config. The learning-rate schedule is ours (pretrain.optim), stepped and checkpointed by
DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import Config
from pretrain.distributed import DeepSpeedMPU, Layout
from pretrain.optim import build_scheduler, param_groups


def deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    o = cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": cfg.parallel.micro_batch_size * layout.dp_size * layout.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                # DeepSpeed hands these to torch.optim.AdamW (None: torch's own choice).
                "foreach": True if o.implementation == "foreach" else None,
                **({"fused": True} if o.implementation == "fused" else {}),
            },
        },
        "zero_optimization": {"stage": effective_zero_stage(cfg, layout.dp_size)},
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        # Gradients are summed over micro-batches and reduced over DP ranks in fp32 even under
        # bf16: DeepSpeed's default for both is the model dtype, and a bf16 running sum loses
        # the low bits of every later micro-batch (ZeRO-1 then runs BF16_Optimizer; ZeRO-2/3
        # keep fp32 gradient partitions). bf16 at ZeRO-0 cannot do this (config.py refuses it).
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        # Our trainer prints its own progress; DeepSpeed's periodic prints would interleave.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Pipeline stages send whole activations and gradients to the same TP rank of the next
        # stage. DeepSpeed's default (with TP > 1) sends each TP rank 1/tp of the first tensor
        # and all-gathers it over the TP group, which assumes that tensor is the same on every
        # TP rank: under sequence parallelism each rank holds its own sequence shard, so the
        # gathered activation would be wrong; and it hands a one-tensor tuple to the next stage
        # as a bare tensor, which GPT's blocks would unpack row by row.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }
    if cfg.parallel.zero_stage == 3:
        # Gather a layer's full weights only while it runs; small models need no prefetching.
        # memory_efficient_linear would make zero.Init swap torch.nn.functional.linear for
        # DeepSpeed's own autograd function (process-wide); the plain one computes the same
        # numbers as the other stages and ZeRO-3 gathers the tied head's weight on access.
        # The gradient reduction bucket is allocated whole at start-up (DeepSpeed's default is
        # 5e8 elements: 2 GB per rank in fp32); d_model^2 elements is the size Hugging Face's
        # integration picks, and enough to batch a layer's gradients into one reduce-scatter.
        ds["zero_optimization"].update(
            stage3_param_persistence_threshold=0,
            memory_efficient_linear=False,
            reduce_bucket_size=max(cfg.model.d_model**2, 2**20),
        )
    return ds


def effective_zero_stage(cfg: Config, dp_size: int) -> int:
    """The ZeRO stage the engine runs: the configured one, except that ZeRO-1 and -2 in fp32
    with one data-parallel rank (and no pipeline) run as stage 0.

    Those stages partition the optimizer state and gradients over the data-parallel ranks;
    over one rank they partition nothing and only cost: every step copies each gradient into
    DeepSpeed's reduction buckets and flat fp32 partition, takes the norm over that copy, and
    copies the updated partition back into the weights (in one process on the demo config at
    two threads: about 18% of the step in a profile, against 6% for Adam's update; the whole
    run 1.146x faster at stage 0, side by side: docs/benchmarks.md). The numbers are the same
    up to the rounding of the clipping (the same AdamW, elementwise, on the same gradients).
    Kept as configured: bf16 (stage 0 would accumulate and clip its gradients in bf16),
    pipelines (a pipeline checkpoint at stage 0 cannot be resharded: pretrain.reshard) and
    ZeRO-3 (its model is built partitioned). Checkpoints record the stage that ran, and a
    resume on more data-parallel ranks reshards them like any other stage change."""
    stage = cfg.parallel.zero_stage
    if stage in (1, 2) and dp_size == 1 and cfg.run.precision != "bf16" and cfg.parallel.pp == 1:
        return 0
    return stage


def build_model_for(cfg: Config, layout: Layout) -> nn.Module:
    """This rank's model, constructed the way its ZeRO stage needs: whole and on the device for
    stages 0-2, partitioned as it is built for ZeRO-3 (each module's parameters are sharded over
    the data-parallel group as soon as its __init__ returns, so no rank ever holds all weights).
    Seed the RNG first: the initial weights are the same numbers either way."""
    from pretrain.models import build_model

    def build() -> nn.Module:
        # DeepSpeed's expert-parallel groups are runs of ep consecutive data-parallel ranks.
        ep = cfg.parallel.ep
        return build_model(
            cfg.model,
            layout.tp_group,
            layout.tp_size,
            cfg.parallel.sequence_parallel,
            ep_size=ep,
            ep_rank=layout.dp_rank % ep,
        )

    if layout.pp_size > 1:  # this rank's pipeline stage only (ZeRO-3 is refused with PP)
        return compile_blocks(cfg, build_stage(cfg, layout).to(layout.device))
    if cfg.parallel.zero_stage != 3:
        return compile_blocks(cfg, build().to(layout.device))
    with partitioned_init(cfg, layout):
        model = build()
    # Buffers (rotary tables, sinusoidal positions) are not partitioned and were built on the
    # CPU; the engine does not move a model built under zero.Init.
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(layout.device)
    return model


def compile_blocks(cfg: Config, model: nn.Module) -> nn.Module:
    """With run.compile, every transformer block runs through torch.compile (compiled on its
    first call; the module, its parameters and their names stay as they are, so checkpoints
    and the optimizer do not see it). Whole blocks, not the model: the embedding, loss and
    pipeline plumbing stay eager, and each distinct block shape compiles once."""
    if cfg.run.compile:
        from pretrain.models.layers import Block

        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
    return model


def build_stage(cfg: Config, layout: Layout) -> nn.Module:
    """This rank's stage of the model as a DeepSpeed PipelineModule. The init seed is drawn from
    the global generator exactly as the one-process model draws it, so both start alike."""
    from pretrain.models.layers import draw_model_seed
    from pretrain.models.pipeline import build_pipeline

    return build_pipeline(
        cfg.model,
        layout,
        draw_model_seed(),
        cfg.parallel.sequence_parallel,
        cfg.parallel.pipeline_partition,
    )


def partitioned_init(cfg: Config, layout: Layout):
    """The deepspeed.zero.Init context ZeRO-3 models are built in (see build_model_for)."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    class PartitionedInit(deepspeed.zero.Init):
        """deepspeed.zero.Init that builds exactly like the unsharded path: every tensor is
        created in fp32 on the CPU (no constructor patching: under bf16 DeepSpeed would create
        `torch.empty`/`torch.arange` in bf16 and on the accelerator, so megatron's fp32 master
        weights and the rotary tables would be drawn and computed differently), and each
        module's own parameters are cast to the model dtype just before they are partitioned,
        which is what the engine does to an unsharded model."""

        def __init__(self, param_dtype: torch.dtype):
            self.param_dtype = param_dtype
            self.release_freed_memory = freed_memory_releaser()
            super().__init__(
                config_dict_or_path=deepspeed_config(cfg, layout),
                # The DP group: with TP > 1 the default (the world) would partition, and
                # broadcast from rank 0, across tensor-parallel shards that differ.
                data_parallel_group=layout.dp_group,
                mpu=DeepSpeedMPU(layout),
                dtype=torch.float32,
                tensor_overrides=[],
            )

        def _post_init_method(self, module: nn.Module) -> None:
            for _, p in module.named_parameters(recurse=False):
                if not is_zero_param(p) and p.dtype != self.param_dtype:
                    p.data = p.data.to(self.param_dtype)
            super()._post_init_method(module)
            self.release_freed_memory()

    return PartitionedInit(torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32)


def freed_memory_releaser():
    """A function that hands freed heap pages back to the system (glibc's malloc_trim; a no-op
    elsewhere). Resolved once: find_library runs `ldconfig -p` each time it is called.

    Each module built under zero.Init allocates its full weights (and megatron's master copy),
    then keeps a 1/dp partition allocated after them and frees the full ones. glibc raises its
    mmap threshold as large blocks are freed, so later modules come from the heap, and the freed
    full-size blocks stay resident between live partitions: measured on a 116M-parameter GPT at
    dp=2, the construction's peak RSS grew 808 MiB under ZeRO-3 against 706 MiB for the whole
    model, while the live heap grew 223 against 445 MiB. Trimming after each module keeps the
    resident set at what is live (benchmarks/memory.py, docs/benchmarks.md)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


def build_engine(cfg: Config, layout: Layout, model: nn.Module):
    """(engine, lr_scheduler) for a model whose weights are identical on every DP rank: a
    DeepSpeedEngine, or for a PipelineModule our PipelineEngine (pipeline_engine)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    kwargs = dict(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, layout),
        lr_scheduler=build_scheduler(cfg.optim, cfg.run.train_steps),
        dist_init_required=False,
    )
    if isinstance(model, PipelineModule):
        return pipeline_engine(layout, **kwargs)
    if cfg.model.moe_experts:  # experts replicated over TP (pretrain.expert_parallel)
        from pretrain.expert_parallel import create_expert_groups

        create_expert_groups(cfg.parallel.ep, layout)
    engine, _, _, scheduler = deepspeed.initialize(mpu=DeepSpeedMPU(layout), **kwargs)
    if cfg.model.moe_experts:
        from pretrain.expert_parallel import use_replicated_experts

        use_replicated_experts(engine, layout)
    if layout.dp_size == 1 and effective_zero_stage(cfg, 1) == 0:
        # An all-reduce over one rank, and a division by 1, of every gradient each step: the
        # identity, at the cost of a copy of all gradients into and out of a flat buffer.
        engine.enable_backward_allreduce = False
    clip_once(engine)
    return engine, scheduler


def pipeline_engine(layout: Layout, **kwargs: Any):
    """DeepSpeed's PipelineEngine with the gradient norm of the whole pipeline.

    Without ZeRO, in fp32, DeepSpeed clips each stage with a norm that counts the gradients of
    replicated parameters on the first rank of the pipeline's model-parallel group only
    (deepspeed.runtime.utils.clip_grad_norm_ with the pipe grid as `mpu`), so PP=2 trains
    differently from PP=1 (measured: clip factor 0.2333 instead of 0.2209). This subclass
    computes the norm over every stage and TP rank (pipeline_grad_norm), clips with it and
    records it, before DeepSpeed's optimizer step; ZeRO-1 and bf16 have their own, right,
    norm. It is constructed as `deepspeed.initialize` constructs a PipelineEngine."""
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero import partition_parameters

    class Pipeline(PipelineEngine):
        def _own_norm(self) -> bool:
            return not (self.zero_optimization() or self.bfloat16_enabled())

        def _exec_optimizer_step(self, lr_kwargs=None):
            for hook in self.before_optimizer_step:
                hook(self)
            norm = None
            if self._own_norm():
                norm = pipeline_grad_norm(self.module, layout, self.grid)
                self._global_grad_norm = norm
                limit = self.gradient_clipping()
                if limit > 0:  # the factor of DeepSpeed's clip_grad_norm_, so PP=1 agrees
                    coef = min(1.0, limit / (norm + 1e-6))
                    for p in self.module.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
            # The trainer's verdict before the update (pretrain.reliability.StepGuard); the
            # loss is known on the last stage only, the other stages pass 0.
            import torch

            decide = getattr(self, "decide_update", None)
            loss = self.total_loss if self.is_last_stage() else None
            loss = loss.detach().float() if loss is not None else torch.zeros(())
            if decide is not None and decide(loss, self.micro_batches, norm)[0]:
                from pretrain.reliability import discarded_update

                with discarded_update(self):
                    super()._exec_optimizer_step(lr_kwargs)
            else:
                super()._exec_optimizer_step(lr_kwargs)

        def clip_fp32_gradients(self):
            if not self._own_norm():  # never reached: DeepSpeed calls it only without ZeRO
                super().clip_fp32_gradients()

        # The schedule runs instructions through this class-level table of functions, not
        # through attribute lookup, so the override must be entered here.
        _INSTRUCTION_MAP = {
            **PipelineEngine._INSTRUCTION_MAP,
            schedule.OptimizerStep: _exec_optimizer_step,
        }

    mpu = kwargs["model"].mpu()
    config_class = DeepSpeedConfig(kwargs["config"], mpu)
    set_optimizer_flags(config_class, kwargs["model"])
    engine = Pipeline(
        args=None,
        optimizer=None,
        training_data=None,
        mpu=mpu,
        collate_fn=None,
        config_class=config_class,
        **kwargs,
    )
    partition_parameters.restore_init_context()
    # Callables run with the engine once a step's gradients are complete (reduced over DP and
    # the tied copies, not yet clipped): for tools and tests that read a step's gradients.
    engine.before_optimizer_step = []
    return engine, engine.lr_scheduler


def pipeline_grad_norm(module: Any, layout: Layout, grid: Any) -> float:
    """The L2 norm of every gradient of the model, each counted once: tensor-parallel shards on
    every TP rank, replicated parameters on TP rank 0, the tied embedding on the first stage
    that holds it; summed over the pipeline's model-parallel group (all stages and TP ranks of
    this data-parallel replica). Call after DeepSpeed reduced the gradients over DP and the
    tied copies."""
    import torch
    import torch.distributed as dist

    tied_elsewhere: set[int] = set()
    for comm in module.tied_comms.values():
        if dist.get_rank() != min(comm["ranks"]):
            tied_elsewhere.update(id(p) for p in comm["module"].parameters())
    total = torch.zeros((), dtype=torch.float64, device=layout.device)
    for p in module.parameters():
        if p.grad is None or id(p) in tied_elsewhere:
            continue
        if layout.tp_rank == 0 or getattr(p, "tensor_model_parallel", False):
            total += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(total, group=grid.get_model_parallel_group())
    return float(total.sqrt())


def runs_direct(engine: Any) -> bool:
    """Whether a micro-batch may run as `engine.module(...)` and `loss.backward()` instead of
    DeepSpeed's `engine(...)` and `engine.backward(loss)`, with the same gradients (bitwise):
    where those wrappers only keep books. That is plain fp32 at ZeRO-0 with the gradient
    all-reduce off (one data-parallel rank, build_engine), no torch autocast, no DeepCompile or
    compiled autograd. Their Python (flags, timers, a hook on the loss, the loss divided by the
    accumulation steps and its backward node) cost 0.5 ms per step on the char config at two
    threads (1.7% of the step, docs/performance.md). The module's own forward hooks, which
    DeepSpeed registers on it (timers, flops profiler), run either way; `engine.step()` stays."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return (
        not isinstance(engine, PipelineEngine)
        and engine.zero_optimization_stage() == 0
        and not (engine.fp16_enabled() or engine.bfloat16_enabled())
        and not engine.torch_autocast_enabled()
        and not engine.enable_backward_allreduce
        and not engine.is_deepcompile_enabled()
        and not getattr(engine, "_is_compiled_autograd_enabled", False)
    )


def records_grad_norm(engine: Any) -> bool:
    """Whether DeepSpeed records the gradient norm itself (ZeRO 1-3 and bf16 do; plain fp32
    stage 0 clips without keeping the norm)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def grad_norm_now(engine: Any) -> float:
    """The global gradient norm of the gradients as they are (call after the boundary's
    backward, before step), computed by DeepSpeed's own clipping routine: model-parallel aware,
    over the data-parallel-reduced grads. With clipping on, the gradients are clipped here with
    the configured limit, and the step's own clipping (clip_once) is skipped: one norm pass and
    its two all-reduces per step instead of two, and the same numbers, since it is the same
    routine on the same gradients that DeepSpeed's step would run. Experts sharded over
    expert-parallel ranks are the exception: DeepSpeed's norm is wrong there, and both this
    and the step's clipping use pretrain.expert_parallel.clip_expert_parallel."""
    from deepspeed.runtime.utils import clip_grad_norm_

    from pretrain.expert_parallel import clip_expert_parallel

    limit = engine.gradient_clipping()
    exact = clip_expert_parallel(engine, limit or float("inf")) if engine.has_moe_layers else None
    if exact is not None:  # experts over expert-parallel ranks: DeepSpeed's norm is not exact
        norm = exact
    elif norm_is_local(engine):
        norm = clip_local(engine.module.parameters(), limit or float("inf"))
    else:
        norm = clip_grad_norm_(engine.module.parameters(), limit or float("inf"), mpu=engine.mpu)
    if limit > 0:
        engine.clipped_at_micro_step = engine.micro_steps
    return float(norm)


def norm_is_local(engine: Any) -> bool:
    """Whether every rank already holds the whole, identical gradient, so the norm needs no
    collective: one model-parallel rank (TP = PP = 1), gradients reduced over data parallelism
    (ZeRO-0), no experts (whose gradients differ per rank). DeepSpeed's routine would still
    all-reduce twice per step: the sum over a model-parallel group of one, and an average of
    equal values over the data-parallel ranks."""
    return (
        engine.mpu.get_model_parallel_world_size() == 1
        and engine.zero_optimization_stage() == 0
        and not engine.has_moe_layers
    )


def clip_local(parameters: Any, limit: float) -> torch.Tensor:
    """DeepSpeed's clip_grad_norm_ (2-norm) without its collectives, for `norm_is_local`
    gradients: the same per-parameter norms, sum of squares, root, clip coefficient and
    in-place scaling, so the same numbers (bitwise at DP = 1 or 2, where DeepSpeed's average of
    equal values is exact; at larger DP its average may round the last bit, this does not)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    norms = torch._foreach_norm([g.float() for g in grads], 2.0)
    total = torch.stack(norms).pow(2.0).sum().float().pow(0.5)
    coef = torch.tensor([float(limit)], device=total.device) / (total + 1e-6)
    coef = torch.min(torch.tensor([1.0], device=total.device), coef)
    torch._foreach_mul_(grads, coef.squeeze(0))
    return total


def clip_once(engine: Any) -> None:
    """Make the engine's fp32 clipping (plain fp32 at ZeRO-0: the only case DeepSpeed clips in
    `clip_fp32_gradients`) skip a step whose gradients grad_norm_now clipped already. The mark
    is the engine's micro-step counter, so a step taken without grad_norm_now clips as usual."""
    deepspeed_clip = engine.clip_fp32_gradients
    engine.clipped_at_micro_step = None

    def clip_fp32_gradients() -> None:
        if engine.clipped_at_micro_step != engine.micro_steps:
            from pretrain.expert_parallel import clip_expert_parallel

            limit = engine.gradient_clipping()
            if not engine.has_moe_layers or clip_expert_parallel(engine, limit) is None:
                deepspeed_clip()
        engine.clipped_at_micro_step = None

    engine.clip_fp32_gradients = clip_fp32_gradients
