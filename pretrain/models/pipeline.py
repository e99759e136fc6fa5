"""A model as a DeepSpeed `PipelineModule`: pipeline parallelism for GPT, BERT and T5.

A pipeline is a flat list of layers; each stage builds only its own and passes a tuple of
tensors to the next (DeepSpeed's 1F1B schedule sends the floating-point ones' gradients back).
The layers here are the same units the one-process models are made of (layers.Block, the
token embedding, the positions, the heads), initialised from the same per-unit seeds
(layers.unit_init), so a pipeline starts from exactly the weights of the unsharded model. The
token embedding is one `TiedLayerSpec` used at the input and, tied, at the output: DeepSpeed
builds it on the first and the last stage, broadcasts its weight at start and all-reduces its
gradient between the two every step.

What travels between stages, per family (masks as int64: only floats carry gradients):
  GPT   (x, [doc_ids])
  BERT  (x, padding)
  T5    encoder: (x, enc_bias, dec_tokens, enc_padding, dec_padding)
        decoder: (x, memory, dec_bias, enc_padding, dec_padding)
T5's relative position biases are shared by all blocks of a stack, which may span stages, so
they are computed once on the stage that owns the table and carried along as an activation:
their gradient flows back through the pipeline like the hidden states'.

Parameter names: `model_names(pipe)` maps every parameter of a stage to its name in the
one-process model (checkpoint conversion, generation, tests comparing layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.attention import layer_window, stack_globals
from pretrain.models.bert import mlm_transform, output_bias
from pretrain.models.layers import (
    Block,
    RelativePositionBias,
    ResidualDropout,
    RotaryEmbedding,
    TensorParallel,
    absolute_positions,
    attach_positions,
    attention_mask,
    build_norm,
    embed_tokens,
    lm_head,
    lm_logits,
    lm_loss,
    run_block,
    stream_length,
    token_embedding,
    unit_init,
)
from pretrain.models.t5 import t5_block, t5_head, t5_logits, t5_units

# --- units shared by the families -----------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """The tied token embedding (unit 0). Called as a layer it embeds the first tensor of the
    tuple; the output heads and T5's decoder input use it through forward functions."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, std: float | None):
        super().__init__()
        self.tpc = tpc
        with unit_init(seed, 0):
            self.embed = token_embedding(cfg, tpc, std)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, *rest = inputs
        return (embed_tokens(self.embed, tokens, self.tpc), *rest)


def tied_logits(module: TokenEmbedding, h: Any) -> torch.Tensor:
    return lm_logits(_first(h), module.tpc, None, module.embed.weight)


class Head(nn.Module):
    """An untied output projection."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, unit: int, std=None):
        super().__init__()
        self.tpc = tpc
        with unit_init(seed, unit):
            self.head = lm_head(cfg, tpc, std)

    def forward(self, h: Any) -> torch.Tensor:
        return lm_logits(_first(h), self.tpc, self.head)


class FinalNorm(nn.Module):
    """The pre-LN stack's last norm; the rest of the tuple is no longer needed."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, name: str = "ln_f"):
        super().__init__()
        self.name = name
        setattr(self, name, build_norm(cfg, tpc))

    def forward(self, inputs: Any) -> torch.Tensor:
        return getattr(self, self.name)(_first(inputs))


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


class StackBlock(nn.Module):
    """A transformer block of a stack, as a pipeline layer: `block` is the one-process model's
    `blocks.{index}` (or `encoder.` / `decoder.`), and `index` its recompute position."""

    def __init__(self, block: Block, index: int):
        super().__init__()
        self.block, self.index = block, index


# --- GPT ------------------------------------------------------------------------------------------


class GPTInput(nn.Module):
    """Unit 1: absolute positions and the embedding dropout."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int):
        super().__init__()
        self.cfg, self.tpc = cfg, tpc
        with unit_init(seed, 1):
            attach_positions(self, cfg, tpc)
        self.drop = ResidualDropout(cfg.dropout, tpc)

    def forward(self, inputs):
        x, *rest = inputs
        return (self.drop(absolute_positions(self, x)), *rest)


class GPTBlock(StackBlock):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, index: int):
        rotary = _rotary(cfg)
        with unit_init(seed, 2 + index):
            block = Block(cfg, tpc, n_layers=cfg.n_layers, rotary=rotary)
        super().__init__(block, index)
        self.tpc = tpc
        block.attn.window = layer_window(cfg, index)
        self.global_positions = stack_globals(cfg)

    def forward(self, inputs):
        x, *rest = inputs
        doc_ids = rest[0] if rest else None
        s = stream_length(x, self.tpc)
        mask = attention_mask(s, s, causal=True, dtype=x.dtype, device=x.device, doc_ids_BS=doc_ids)
        return (run_block(self.block, self.index, x, mask), *rest)


def _rotary(cfg: ModelConfig) -> RotaryEmbedding | None:
    # Fixed buffers (no weights, no randomness): each block's layer holds its own copy.
    if cfg.positions != "rope":
        return None
    return RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)


def gpt_layers(cfg: ModelConfig, tpc: TensorParallel, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = partial(TiedLayerSpec, "embed", TokenEmbedding, cfg, tpc, seed, None)
    layers: list = [embed(tied_weight_attr="embed.weight")]
    layers.append(LayerSpec(GPTInput, cfg, tpc, seed))
    layers += [LayerSpec(GPTBlock, cfg, tpc, seed, i) for i in range(cfg.n_layers)]
    if cfg.norm_position == "pre":
        layers.append(LayerSpec(FinalNorm, cfg, tpc))
    if cfg.tie_embeddings:
        layers.append(embed(forward_fn=tied_logits, tied_weight_attr="embed.weight"))
    else:
        layers.append(LayerSpec(Head, cfg, tpc, seed, 2 + cfg.n_layers))
    return layers


# --- BERT -----------------------------------------------------------------------------------------


class BERTInput(GPTInput):
    """Unit 1: absolute positions, the embedding norm and dropout."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int):
        super().__init__(cfg, tpc, seed)
        self.ln_embed = build_norm(cfg, tpc)

    def forward(self, inputs):
        x, *rest = inputs
        return (self.drop(self.ln_embed(absolute_positions(self, x))), *rest)


class BERTBlock(GPTBlock):
    def forward(self, inputs):
        x, padding = inputs
        s = stream_length(x, self.tpc)
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x.dtype,
            device=x.device,
            key_padding_BK=padding.bool(),
            global_positions=self.global_positions,
        )
        return (run_block(self.block, self.index, x, mask), padding)


class BERTHeadTransform(nn.Module):
    """The stack's final norm (pre-LN) and the MLM head's dense transform and norm."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int):
        super().__init__()
        self.ln_f = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        with unit_init(seed, 2 + cfg.n_layers):
            self.head_dense = mlm_transform(cfg, tpc)
        self.head_norm = build_norm(cfg, tpc)

    def forward(self, inputs) -> torch.Tensor:
        h = _first(inputs)
        if self.ln_f is not None:
            h = self.ln_f(h)
        return self.head_norm(torch.nn.functional.gelu(self.head_dense(h)))


class OutputBias(nn.Module):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel):
        super().__init__()
        self.out_bias = output_bias(cfg, tpc)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.out_bias


def bert_layers(cfg: ModelConfig, tpc: TensorParallel, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = partial(TiedLayerSpec, "embed", TokenEmbedding, cfg, tpc, seed, None)
    layers: list = [embed(tied_weight_attr="embed.weight"), LayerSpec(BERTInput, cfg, tpc, seed)]
    layers += [LayerSpec(BERTBlock, cfg, tpc, seed, i) for i in range(cfg.n_layers)]
    layers.append(LayerSpec(BERTHeadTransform, cfg, tpc, seed))
    if cfg.tie_embeddings:
        layers.append(embed(forward_fn=tied_logits, tied_weight_attr="embed.weight"))
    else:
        layers.append(LayerSpec(Head, cfg, tpc, seed, 3 + cfg.n_layers))
    layers.append(LayerSpec(OutputBias, cfg, tpc))
    return layers


# --- T5 -------------------------------------------------------------------------------------------


class _Release(torch.autograd.Function):
    """x unchanged; the other tensors get a zero gradient (see `release`)."""

    @staticmethod
    def forward(ctx, x, *dropped):
        ctx.dropped = [(d.shape, d.dtype, d.device) for d in dropped]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=t, device=d) for s, t, d in ctx.dropped))


def release(x: torch.Tensor, *dropped: torch.Tensor) -> torch.Tensor:
    """x, with the floating-point activations a layer stops carrying tied to it for backward.
    A stage must send a gradient back for every floating-point tensor it received (DeepSpeed's
    _exec_send_grads asserts it), so when a stage boundary falls just before the layer that
    drops one (T5's relative position bias and encoder memory), that tensor needs a gradient on
    this stage: zero, which is its true gradient here, since nothing after this layer uses it."""
    if not torch.is_grad_enabled() or not any(d.requires_grad for d in dropped):
        return x
    return _Release.apply(x, *dropped)


class T5StackInput(nn.Module):
    """A stack's relative position bias table (computed once here, carried to every block of
    the stack) and the embedding dropout."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, decoder: bool):
        super().__init__()
        self.tpc, self.decoder = tpc, decoder
        self.table = "dec_bias" if decoder else "enc_bias"  # the one-process model's name
        with unit_init(seed, t5_units(cfg)[self.table]):
            setattr(self, self.table, RelativePositionBias(cfg, tpc, bidirectional=not decoder))
        self.drop = ResidualDropout(cfg.dropout, tpc)

    def forward(self, inputs):
        x, *rest = inputs
        s = stream_length(x, self.tpc)
        bias = getattr(self, self.table)(s, s).contiguous()  # p2p sends need contiguous
        if self.decoder:  # (x, memory, enc_padding, dec_padding)
            memory, *masks = rest
            return (self.drop(x), memory, bias, *masks)
        return (self.drop(x), bias, *rest)


class T5EncoderBlock(StackBlock):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, index: int):
        with unit_init(seed, t5_units(cfg)["encoder"] + index):
            block = t5_block(cfg, tpc, cross=False)
        super().__init__(block, index)
        self.tpc = tpc

    def forward(self, inputs):
        x, bias, dec_tokens, enc_padding, dec_padding = inputs
        s = stream_length(x, self.tpc)
        mask = attention_mask(
            s,
            s,
            causal=False,
            dtype=x.dtype,
            device=x.device,
            key_padding_BK=enc_padding.bool(),
            position_bias_1HQK=bias,
        )
        x = run_block(self.block, self.index, x, mask)
        return (x, bias, dec_tokens, enc_padding, dec_padding)


class T5EncoderOutput(nn.Module):
    """The encoder's final norm and dropout: its output becomes the decoder's memory."""

    def __init__(self, cfg: ModelConfig, tpc: TensorParallel):
        super().__init__()
        self.enc_norm = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        self.drop = ResidualDropout(cfg.dropout, tpc)

    def forward(self, inputs):
        x, bias, dec_tokens, enc_padding, dec_padding = inputs
        x = release(x, bias)  # the encoder's bias ends here
        if self.enc_norm is not None:
            x = self.enc_norm(x)
        return (self.drop(x), dec_tokens, enc_padding, dec_padding)


def t5_decoder_embed(module: TokenEmbedding, inputs):
    memory, dec_tokens, *masks = inputs
    return (embed_tokens(module.embed, dec_tokens, module.tpc), memory, *masks)


class T5DecoderBlock(StackBlock):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int, index: int):
        with unit_init(seed, t5_units(cfg)["decoder"] + index):
            block = t5_block(cfg, tpc, cross=True)
        super().__init__(block, index)
        self.tpc = tpc

    def forward(self, inputs):
        x, memory, bias, enc_padding, dec_padding = inputs
        s, s_enc = stream_length(x, self.tpc), stream_length(memory, self.tpc)
        kw = dict(dtype=x.dtype, device=x.device)
        self_mask = attention_mask(
            s, s, causal=True, key_padding_BK=dec_padding.bool(), position_bias_1HQK=bias, **kw
        )
        cross_mask = attention_mask(s, s_enc, causal=False, key_padding_BK=enc_padding.bool(), **kw)
        x = run_block(self.block, self.index, x, self_mask, memory, cross_mask)
        return (x, memory, bias, enc_padding, dec_padding)


class T5DecoderOutput(nn.Module):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel):
        super().__init__()
        self.dec_norm = build_norm(cfg, tpc) if cfg.norm_position == "pre" else None
        self.drop = ResidualDropout(cfg.dropout, tpc)

    def forward(self, inputs) -> torch.Tensor:
        x = release(*inputs[:3])  # memory and the decoder's bias end here
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        return self.drop(x)


def t5_tied_logits(module: TokenEmbedding, h) -> torch.Tensor:
    return t5_logits(_first(h), module.tpc, None, module.embed.weight)


class T5Head(Head):
    def __init__(self, cfg: ModelConfig, tpc: TensorParallel, seed: int):
        nn.Module.__init__(self)
        self.tpc = tpc
        with unit_init(seed, t5_units(cfg)["head"]):
            self.head = t5_head(cfg, tpc)


def t5_layers(cfg: ModelConfig, tpc: TensorParallel, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed = partial(
        TiedLayerSpec, "embed", TokenEmbedding, cfg, tpc, seed, 1.0, tied_weight_attr="embed.weight"
    )
    n_enc, n_dec = cfg.n_layers, cfg.decoder_layers
    layers: list = [embed(), LayerSpec(T5StackInput, cfg, tpc, seed, False)]
    layers += [LayerSpec(T5EncoderBlock, cfg, tpc, seed, i) for i in range(n_enc)]
    layers += [LayerSpec(T5EncoderOutput, cfg, tpc), embed(forward_fn=t5_decoder_embed)]
    layers.append(LayerSpec(T5StackInput, cfg, tpc, seed, True))
    layers += [LayerSpec(T5DecoderBlock, cfg, tpc, seed, i) for i in range(n_dec)]
    layers.append(LayerSpec(T5DecoderOutput, cfg, tpc))
    if cfg.tie_embeddings:
        layers.append(embed(forward_fn=t5_tied_logits))
    else:
        layers.append(LayerSpec(T5Head, cfg, tpc, seed))
    return layers


# --- batches and the loss -------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How a family's loader batches become pipeline inputs (first stage) and labels (last)."""

    layers: Callable[[ModelConfig, TensorParallel, int], list]
    inputs: tuple[str, ...]  # batch keys in the order the first layer takes them
    optional: tuple[str, ...] = ()  # of those, the ones a batch may leave out

    def split(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        """(inputs, labels): labels are (targets, [loss_mask], loss_tokens)."""
        inputs = []
        for key in self.inputs:
            if key not in batch:
                if key in self.optional:
                    continue
                raise KeyError(f"a pipeline batch needs '{key}'; it has {sorted(batch)}")
            value = batch[key]
            inputs.append(value.long() if value.dtype == torch.bool else value)
        labels = [batch["targets"]]
        if "loss_mask" in batch:
            labels.append(batch["loss_mask"])
        labels.append(batch["loss_tokens"])
        return tuple(inputs), tuple(labels)


FAMILIES = {
    "gpt": Family(gpt_layers, ("tokens", "doc_ids"), optional=("doc_ids",)),
    "bert": Family(bert_layers, ("tokens", "padding_mask")),
    "t5": Family(t5_layers, ("enc_tokens", "dec_tokens", "enc_padding_mask", "dec_padding_mask")),
}


def pipeline_loss(tpc: TensorParallel, logits_TV: torch.Tensor, labels: tuple) -> torch.Tensor:
    """The last stage's loss: the same token-weighted cross-entropy as the one-process models."""
    targets, *rest = labels
    loss_mask = rest[0] if len(rest) == 2 else None
    return lm_loss(logits_TV, targets, loss_mask, tpc, rest[-1])


# --- building -------------------------------------------------------------------------------------

PARTITION_METHODS = {
    # Balance the parameters per stage (DeepSpeed counts each layer's; the tied embedding
    # counts on both ends), or the transformer blocks: every stage gets the same number.
    "parameters": "parameters",
    "uniform": "type:Block$",
}


def build_pipeline(
    cfg: ModelConfig,
    layout: Any,
    seed: int,
    sequence_parallel: bool = False,
    partition: str = "parameters",
):
    """This rank's stage of the model as a DeepSpeed PipelineModule, on a topology that puts the
    ranks where megatron-core's groups put them (tensor parallel fastest, then data parallel,
    pipeline stages outermost), so both libraries agree on every group."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pretrain.models.parallelize import parallelize

    if cfg.family not in FAMILIES:
        raise ValueError(f"no pipeline for model family {cfg.family!r}")
    tpc = TensorParallel.build(
        layout.tp_group, layout.tp_size, sequence_parallel, cfg.tokenizer_vocab
    )
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pp_size, num_mp=layout.tp_size, num_dp=layout.dp_size
    )
    pipe = PipelineModule(
        layers=FAMILIES[cfg.family].layers(cfg, tpc, seed),
        topology=topology,
        loss_fn=partial(pipeline_loss, tpc),
        partition_method=PARTITION_METHODS[partition],
    )
    blockless = [
        stage
        for stage in range(layout.pp_size)
        if not any(
            isinstance(getattr(spec, "typename", None), type)
            and issubclass(spec.typename, StackBlock)
            for spec in pipe._layer_specs[pipe.parts[stage] : pipe.parts[stage + 1]]
        )
    ]
    if blockless:
        # Measured: at ZeRO-1, 4 stages of a 4-block GPT partitioned by parameters put the
        # embedding alone on stage 0 and the tied head alone on stage 3, and DeepSpeed's ZeRO
        # optimizer then waits in a model-parallel all-reduce that those stages never join.
        raise ValueError(
            f"parallel.pipeline_partition={partition} leaves pipeline stages {blockless} without "
            f"a transformer block (boundaries {pipe.parts}); use pipeline_partition=uniform or "
            f"fewer stages"
        )
    pipe.tpc = tpc  # the stage's tensor-parallel context and generator (rng.model_rng)
    # The sequence-parallel gradient hooks, as build_model registers them on a whole model:
    # without them norms, row-parallel biases and the position table keep only this rank's
    # share of the sequence's gradient.
    parallelize(pipe, layout.tp_group, layout.tp_size, sequence_parallel)
    return pipe


def model_names(pipe: nn.Module) -> dict[str, str]:
    """{stage parameter name: one-process model parameter name} for this stage."""
    to_model = stage_name_map(pipe._layer_specs)
    return {name: to_model(name) for name, _ in pipe.named_parameters()}


def stage_name_map(specs: list) -> Callable[[str], str]:
    """A function from a stage's parameter names (`7.block.attn...`, `tied_modules.embed.
    embed.weight`) to the one-process model's."""
    maps = layer_name_maps(specs)

    def to_model(name: str) -> str:
        head, _, local = name.partition(".")
        if head == "tied_modules":  # tied_modules.embed.embed.weight -> embed.weight
            return local.partition(".")[2]
        return maps[int(head)](local)

    return to_model


def _prefixed(prefix: str, local: str) -> str:
    return prefix + local.removeprefix("block.")


def layer_name_maps(specs: list) -> list[Callable[[str], str]]:
    """For each pipeline layer, a function from its own parameter names (as in the layer files
    of a pipeline checkpoint) to the one-process model's: the blocks' `block.` becomes
    `blocks.{i}.` (`encoder.`/`decoder.` for T5); every other unit holds its parameters under
    the one-process model's names already. Block units take the block index last."""
    maps: list[Callable[[str], str]] = []
    for spec in specs:
        kind = getattr(spec, "typename", None)
        if isinstance(kind, type) and issubclass(kind, StackBlock):
            stack = {T5EncoderBlock: "encoder", T5DecoderBlock: "decoder"}.get(kind, "blocks")
            prefix = f"{stack}.{spec.module_args[-1]}."
            maps.append(partial(_prefixed, prefix))
        else:
            maps.append(lambda local: local)
    return maps


def pipeline_layer_specs(cfg: ModelConfig) -> list:
    """The layer list of a model's pipeline, unbuilt (reading a checkpoint needs no groups)."""
    return FAMILIES[cfg.family].layers(cfg, TensorParallel.build(None, 1, False), 0)
