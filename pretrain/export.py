"""Checkpoint tools behind `pretrain-ckpt`: inspect a checkpoint, convert it to one consolidated
safetensors file, export it to Hugging Face `transformers` format.

Every reader goes through `pretrain.generate_cli.load_model`, the one implementation of
checkpoint reading (ZeRO 0-3, tensor-parallel shards merged, pipeline stages renamed), which
yields the TP=1 one-process model. The exporters map that model's state dict onto the
`transformers` class of its family:

| our model | transformers class | conditions (anything else is refused, naming the option) |
|---|---|---|
| GPT, learned positions | GPT2LMHeadModel | LayerNorm with bias, GELU, pre-LN, no GQA |
| GPT, rotary positions | LlamaForCausalLM | RMSNorm, SwiGLU/GeGLU, pre-LN (biases optional) |
| BERT | BertForMaskedLM | learned positions, LayerNorm with bias, GELU, post-LN, tied |
| T5 | T5ForConditionalGeneration | RMSNorm, no bias, pre-LN, n_kv_heads = n_heads |

The vocabulary is cut to the tokenizer's size (model.tokenizer_vocab) where the checkpoint
records it: our model masks the padding rows' logits (layers.mask_padding), a transformers model
would not, and could then sample ids the tokenizer cannot decode. The exported logits equal ours
over every real row. Checkpoints of older versions (no tokenizer_vocab) keep the padded size.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from pretrain.config import Config, ConfigError
from pretrain.errors import CheckpointError

Tensors = dict[str, Any]


class ExportError(ConfigError):
    """An option of the checkpoint's model that the target transformers class cannot express."""


def _refuse(name: str, value: Any, target: str, fix: str) -> None:
    raise ExportError(f"model.{name}", value, f"has no equivalent in transformers' {target}; {fix}")


def _need(ok: bool, name: str, value: Any, target: str, fix: str) -> None:
    if not ok:
        _refuse(name, value, target, fix)


# --- loading --------------------------------------------------------------------------------------


def load(path: str | Path):
    """(TP=1 model in eval mode, its config, the step directory) of a run dir or checkpoint."""
    from pretrain.generate_cli import find_checkpoint, load_model

    step_dir, _ = find_checkpoint(Path(path))
    # DeepSpeed's zero_to_fp32 prints progress to stdout; keep stdout for our own output.
    with contextlib.redirect_stdout(sys.stderr):
        model, cfg = load_model(step_dir)
    return model, cfg, step_dir


def tensors_of(model) -> Tensors:
    """The model's state dict without megatron's `_extra_state` entries (None, not tensors)."""
    import torch

    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


# --- convert --------------------------------------------------------------------------------------


def convert(path: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's TP=1 weights (float32) to one safetensors file, with the resolved
    config as JSON in the file's metadata (key "config")."""
    from safetensors.torch import save_file

    model, cfg, step_dir = load(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tensors_of(model).items()}
    meta = {"config": json.dumps(cfg.to_dict()), "step_dir": str(step_dir.resolve())}
    save_file(state, str(out), metadata=meta)
    return out


def load_consolidated(path: str | Path, model) -> Tensors:
    """A state dict for `model` (built for TP=1) from a `convert` file: the file's tensors plus
    the model's own non-tensor entries (megatron's `_extra_state`), ready for a strict load."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {
        k: tensors.get(k, v) if torch.is_tensor(v) else v for k, v in model.state_dict().items()
    }


# --- inspect --------------------------------------------------------------------------------------


def _client_state(step_dir: Path) -> dict[str, Any]:
    import torch

    from pretrain.generate_cli import MODEL_STATES

    candidates = sorted(step_dir.glob("*" + MODEL_STATES.format(0)))
    if not candidates:
        raise CheckpointError(f"{step_dir} holds no model-states file (is it a checkpoint?)")
    return torch.load(candidates[0], map_location="cpu", weights_only=False)


_STEP_LINE = re.compile(r"\bstep\s+(\d+)/\d+ \| loss ([0-9.eE+-]+|nan|inf)")


def last_loss(run_dir: Path, step: int) -> tuple[int, float] | None:
    """(step, training loss) of the last progress line at or before `step` in the run's
    train.log (the loss is printed every run.log_interval steps, not saved in checkpoints)."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    found = None
    for line in log.read_text(errors="replace").splitlines():
        m = _STEP_LINE.search(line)
        if m and int(m.group(1)) <= step:
            found = (int(m.group(1)), float(m.group(2)))
    return found


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: Config, other: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, other config's value) for every differing leaf."""
    a, b = _flatten(saved.to_dict()), _flatten(other.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def inspect(path: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """What a checkpoint holds, without building the model: step, layout, tokens seen, the
    last logged loss, and (with `config`) the config keys that differ from it."""
    from pretrain.config import from_dict, load_config
    from pretrain.generate_cli import checkpoint_meta, find_checkpoint, load_run_config

    step_dir, run_cfg = find_checkpoint(Path(path))
    meta = checkpoint_meta(step_dir)
    states = _client_state(step_dir)
    trainer = states.get("trainer") or {}
    saved = from_dict(states["config"]) if states.get("config") else None
    cfg = saved if saved is not None else load_run_config(step_dir, run_cfg)
    step = int(meta.get("step", trainer.get("step", -1)))
    info: dict[str, Any] = {
        "checkpoint": str(step_dir),
        "step": step,
        "layout": {
            "tp": int(meta.get("tp", 1)),
            "pp": int(meta.get("pp", 1)),
            "dp": int(meta.get("dp", 1)),
            "world_size": int(meta.get("world_size", 1)),
            "zero_stage": int(meta.get("zero_stage", cfg.parallel.zero_stage)),
            "precision": cfg.run.precision,
        },
        "tokens_seen": trainer.get("consumed_tokens"),
        "model": {
            "family": cfg.model.family,
            "n_layers": cfg.model.n_layers,
            "d_model": cfg.model.d_model,
            "vocab_size": cfg.model.vocab_size,
        },
        "data_fingerprint": (meta.get("data") or {}).get("fingerprint"),
    }
    run_dir = step_dir.parent.parent
    loss = last_loss(run_dir, step)
    info["last_loss"] = None if loss is None else {"step": loss[0], "loss": loss[1]}
    if config is not None:
        other = load_config(config)
        info["config_diff"] = [
            {"key": k, "checkpoint": a, "given": b} for k, a, b in config_diff(cfg, other)
        ]
    return info


def format_inspect(info: dict[str, Any]) -> str:
    lay = info["layout"]
    lines = [
        f"checkpoint   {info['checkpoint']}",
        f"step         {info['step']}",
        f"layout       tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} "
        f"(world {lay['world_size']}), ZeRO-{lay['zero_stage']}, {lay['precision']}",
        f"tokens seen  {info['tokens_seen']}",
    ]
    loss = info["last_loss"]
    lines.append(
        f"last loss    {loss['loss']:.4f} (step {loss['step']}, train.log)"
        if loss
        else "last loss    not recorded (no train.log progress line at or before this step)"
    )
    m = info["model"]
    lines.append(
        f"model        {m['family']}, {m['n_layers']} layers, d_model {m['d_model']}, "
        f"vocab {m['vocab_size']}"
    )
    if "config_diff" in info:
        diff = info["config_diff"]
        lines.append(f"config diff  {len(diff)} key(s) differ (checkpoint -> given)")
        lines += [f"  {d['key']}: {d['checkpoint']!r} -> {d['given']!r}" for d in diff]
    return "\n".join(lines)


# --- Hugging Face export: configs ---------------------------------------------------------------


def hf_target(cfg: Config) -> str:
    """The transformers class a model maps to, or an ExportError naming the option that has no
    equivalent there."""
    m = cfg.model
    if m.family == "bert":
        target = "BertForMaskedLM"
        _need(m.positions == "learned", "positions", m.positions, target, "use learned")
        _need(m.norm == "layernorm", "norm", m.norm, target, "use layernorm")
        _need(m.bias, "bias", m.bias, target, "BERT has biases everywhere; use bias=true")
        _need(m.norm_position == "post", "norm_position", m.norm_position, target, "use post")
        _need(m.activation == "gelu", "activation", m.activation, target, "use gelu")
        _need(m.kv_heads == m.n_heads, "n_kv_heads", m.n_kv_heads, target, "use null")
        return target
    if m.family == "t5":
        target = "T5ForConditionalGeneration"
        _need(m.norm == "rmsnorm", "norm", m.norm, target, "use rmsnorm")
        _need(not m.bias, "bias", m.bias, target, "T5 has no biases; use bias=false")
        _need(m.norm_position == "pre", "norm_position", m.norm_position, target, "use pre")
        _need(m.kv_heads == m.n_heads, "n_kv_heads", m.n_kv_heads, target, "use null")
        # transformers 5 forces T5's lm_head to share the embedding (T5Config sets
        # tie_word_embeddings=True whatever it is given), so an untied head cannot be loaded.
        _need(
            m.tie_embeddings,
            "tie_embeddings",
            m.tie_embeddings,
            target,
            "it always ties the output layer to the shared embedding; use true",
        )
        return target
    if m.positions == "learned":
        target = "GPT2LMHeadModel"
        _need(m.norm == "layernorm", "norm", m.norm, target, "use layernorm (or rope for Llama)")
        _need(m.bias, "bias", m.bias, target, "GPT-2 has biases; use bias=true")
        _need(m.activation == "gelu", "activation", m.activation, target, "use gelu")
        _need(m.norm_position == "pre", "norm_position", m.norm_position, target, "use pre")
        _need(m.kv_heads == m.n_heads, "n_kv_heads", m.n_kv_heads, target, "use null")
        return target
    if m.positions == "rope":
        target = "LlamaForCausalLM"
        _need(m.norm == "rmsnorm", "norm", m.norm, target, "use rmsnorm")
        _need(
            m.activation in ("swiglu", "geglu"),
            "activation",
            m.activation,
            target,
            "Llama's MLP is gated; use swiglu (or geglu)",
        )
        _need(m.norm_position == "pre", "norm_position", m.norm_position, target, "use pre")
        return target
    _refuse(
        "positions",
        m.positions,
        "GPT2LMHeadModel or LlamaForCausalLM",
        "they support learned (GPT-2) or rope (Llama) positions only",
    )
    raise AssertionError  # unreachable


def hf_config(cfg: Config, specials: Any | None = None):
    """The transformers config of the model (refusing what has no equivalent)."""
    import transformers

    m = cfg.model
    target = hf_target(cfg)
    ids: dict[str, Any] = {}
    if specials is not None:
        ids = {"eos_token_id": specials.eos_id, "pad_token_id": specials.pad_id}
    else:  # not GPT-2's defaults (50256), which lie outside a small vocabulary
        ids = {"eos_token_id": None, "pad_token_id": None}
    vocab = m.tokenizer_vocab or m.vocab_size
    common = dict(vocab_size=vocab, tie_word_embeddings=m.tie_embeddings, **ids)
    if target == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            n_embd=m.d_model,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_inner=m.ffn_size,
            n_positions=m.seq_len,
            # Ours is the exact (erf) GELU; GPT-2's default "gelu_new" is the tanh approximation.
            activation_function="gelu",
            layer_norm_epsilon=m.norm_eps,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            bos_token_id=ids.get("eos_token_id"),
            **common,
        )
    if target == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            hidden_size=m.d_model,
            intermediate_size=m.ffn_size,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            num_key_value_heads=m.kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.seq_len,
            rms_norm_eps=m.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
            hidden_act="silu" if m.activation == "swiglu" else "gelu",
            attention_bias=m.bias,
            mlp_bias=m.bias,
            attention_dropout=m.dropout,
            bos_token_id=ids.get("eos_token_id"),
            **common,
        )
    if target == "BertForMaskedLM":
        return transformers.BertConfig(
            hidden_size=m.d_model,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            intermediate_size=m.ffn_size,
            hidden_act="gelu",
            max_position_embeddings=m.seq_len,
            # We have no token types: one type whose embedding is zero adds nothing.
            type_vocab_size=1,
            layer_norm_eps=m.norm_eps,
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.dropout,
            **common,
        )
    # T5: "gated-gelu" would mean the tanh approximation (T5Config maps it to gelu_new); ours is
    # the exact GELU, which "gelu_python" names.
    ffn = {"relu": "relu", "gelu": "gelu_python", "geglu": "gated-gelu_python"}
    ffn["swiglu"] = "gated-silu"
    return transformers.T5Config(
        d_model=m.d_model,
        d_kv=m.head_dim,
        d_ff=m.ffn_size,
        num_layers=m.n_layers,
        num_decoder_layers=m.decoder_layers,
        num_heads=m.n_heads,
        relative_attention_num_buckets=m.rel_buckets,
        relative_attention_max_distance=m.rel_max_distance,
        layer_norm_epsilon=m.norm_eps,
        feed_forward_proj=ffn[m.activation],
        dropout_rate=m.dropout,
        # generate_cli starts T5's decoder from the pad token, as the span batches do.
        decoder_start_token_id=ids.get("pad_token_id"),
        **common,
    )


# --- Hugging Face export: weights ---------------------------------------------------------------


def split_qkv(w, cfg: Config):
    """Our fused QKV rows [group, (q_1 .. q_k, k, v), head_dim] (bias: the same without the
    input dimension) -> (q rows in head order, k rows, v rows)."""
    m = cfg.model
    g, per, e = m.kv_heads, m.n_heads // m.kv_heads, m.head_dim
    rows = w.reshape(g, per + 2, e, *w.shape[1:])
    q = rows[:, :per].reshape(g * per * e, *w.shape[1:])
    return (
        q.clone(),
        rows[:, per].reshape(g * e, *w.shape[1:]).clone(),
        rows[:, per + 1].reshape(g * e, *w.shape[1:]).clone(),
    )


def split_kv(w, cfg: Config):
    """Cross-attention's fused KV rows [group, (k, v), head_dim] -> (k rows, v rows)."""
    m = cfg.model
    rows = w.reshape(m.kv_heads, 2, m.head_dim, *w.shape[1:])
    flat = (m.kv_heads * m.head_dim, *w.shape[1:])
    return rows[:, 0].reshape(flat).clone(), rows[:, 1].reshape(flat).clone()


def split_gate_up(w):
    """Our gated MLP's interleaved rows [g0, u0, g1, u1, ...] -> (gate rows, up rows)."""
    return w[0::2].clone(), w[1::2].clone()


def _copy(out: Tensors, sd: Tensors, src: str, dst: str, transpose: bool = False) -> None:
    if src in sd:
        t = sd[src]
        out[dst] = t.t().contiguous() if transpose else t.clone()


def gpt2_state(sd: Tensors, cfg: Config) -> Tensors:
    """GPT2LMHeadModel's names. Its Conv1D layers store [in, out], the transpose of ours; its
    c_attn rows are [all q, all k, all v]."""
    import torch

    out: Tensors = {"transformer.wte.weight": sd["embed.weight"].clone()}
    _copy(out, sd, "pos_embed.weight", "transformer.wpe.weight")
    for i in range(cfg.model.n_layers):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            _copy(out, sd, a + ours + ".weight", h + theirs + ".weight")
            _copy(out, sd, a + ours + ".bias", h + theirs + ".bias")
        for suffix in ("weight", "bias"):
            q, k, v = split_qkv(sd[a + "attn.qkv." + suffix], cfg)
            fused = torch.cat([q, k, v], dim=0)
            out[h + "attn.c_attn." + suffix] = (
                fused.t().contiguous() if suffix == "weight" else fused
            )
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc")):
            _copy(out, sd, a + ours + ".weight", h + theirs + ".weight", transpose=True)
            _copy(out, sd, a + ours + ".bias", h + theirs + ".bias")
        _copy(out, sd, a + "mlp.down.weight", h + "mlp.c_proj.weight", transpose=True)
        _copy(out, sd, a + "mlp.down.bias", h + "mlp.c_proj.bias")
    _copy(out, sd, "ln_f.weight", "transformer.ln_f.weight")
    _copy(out, sd, "ln_f.bias", "transformer.ln_f.bias")
    out["lm_head.weight"] = (
        sd["head.weight"].clone() if "head.weight" in sd else out["transformer.wte.weight"]
    )
    return out


def llama_state(sd: Tensors, cfg: Config) -> Tensors:
    out: Tensors = {"model.embed_tokens.weight": sd["embed.weight"].clone()}
    for i in range(cfg.model.n_layers):
        a, h = f"blocks.{i}.", f"model.layers.{i}."
        _copy(out, sd, a + "ln_attn.weight", h + "input_layernorm.weight")
        _copy(out, sd, a + "ln_mlp.weight", h + "post_attention_layernorm.weight")
        for suffix in ("weight", "bias"):
            if a + "attn.qkv." + suffix in sd:
                q, k, v = split_qkv(sd[a + "attn.qkv." + suffix], cfg)
                out[h + "self_attn.q_proj." + suffix] = q
                out[h + "self_attn.k_proj." + suffix] = k
                out[h + "self_attn.v_proj." + suffix] = v
            if a + "mlp.up." + suffix in sd:
                gate, up = split_gate_up(sd[a + "mlp.up." + suffix])
                out[h + "mlp.gate_proj." + suffix] = gate
                out[h + "mlp.up_proj." + suffix] = up
            _copy(out, sd, a + "attn.proj." + suffix, h + "self_attn.o_proj." + suffix)
            _copy(out, sd, a + "mlp.down." + suffix, h + "mlp.down_proj." + suffix)
    _copy(out, sd, "ln_f.weight", "model.norm.weight")
    out["lm_head.weight"] = (
        sd["head.weight"].clone() if "head.weight" in sd else out["model.embed_tokens.weight"]
    )
    return out


def bert_state(sd: Tensors, cfg: Config) -> Tensors:
    import torch

    emb = "bert.embeddings."
    out: Tensors = {
        emb + "word_embeddings.weight": sd["embed.weight"].clone(),
        emb + "position_embeddings.weight": sd["pos_embed.weight"].clone(),
        emb + "token_type_embeddings.weight": torch.zeros(1, cfg.model.d_model),
    }
    _copy(out, sd, "ln_embed.weight", emb + "LayerNorm.weight")
    _copy(out, sd, "ln_embed.bias", emb + "LayerNorm.bias")
    for i in range(cfg.model.n_layers):
        a, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            q, k, v = split_qkv(sd[a + "attn.qkv." + suffix], cfg)
            out[h + "attention.self.query." + suffix] = q
            out[h + "attention.self.key." + suffix] = k
            out[h + "attention.self.value." + suffix] = v
            for ours, theirs in (
                ("attn.proj", "attention.output.dense"),
                ("ln_attn", "attention.output.LayerNorm"),
                ("mlp.up", "intermediate.dense"),
                ("mlp.down", "output.dense"),
                ("ln_mlp", "output.LayerNorm"),
            ):
                _copy(out, sd, f"{a}{ours}.{suffix}", f"{h}{theirs}.{suffix}")
    p = "cls.predictions."
    for suffix in ("weight", "bias"):
        _copy(out, sd, "head_dense." + suffix, p + "transform.dense." + suffix)
        _copy(out, sd, "head_norm." + suffix, p + "transform.LayerNorm." + suffix)
    out[p + "bias"] = sd["out_bias"].clone()
    out[p + "decoder.bias"] = out[p + "bias"]
    tied = out[emb + "word_embeddings.weight"]
    out[p + "decoder.weight"] = sd["head.weight"].clone() if "head.weight" in sd else tied
    return out


def t5_state(sd: Tensors, cfg: Config) -> Tensors:
    m = cfg.model
    gated = m.activation in ("swiglu", "geglu")
    out: Tensors = {"shared.weight": sd["embed.weight"].clone()}
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out["decoder.embed_tokens.weight"] = out["shared.weight"]

    def attention(src: str, dst: str, cross: bool) -> None:
        if cross:
            out[dst + "q.weight"] = sd[src + "q.weight"].clone()
            out[dst + "k.weight"], out[dst + "v.weight"] = split_kv(sd[src + "kv.weight"], cfg)
        else:
            q, k, v = split_qkv(sd[src + "qkv.weight"], cfg)
            out[dst + "q.weight"], out[dst + "k.weight"], out[dst + "v.weight"] = q, k, v
        out[dst + "o.weight"] = sd[src + "proj.weight"].clone()

    def mlp(src: str, dst: str) -> None:
        if gated:
            out[dst + "wi_0.weight"], out[dst + "wi_1.weight"] = split_gate_up(
                sd[src + "up.weight"]
            )
        else:
            out[dst + "wi.weight"] = sd[src + "up.weight"].clone()
        out[dst + "wo.weight"] = sd[src + "down.weight"].clone()

    for stack, n, ours in (
        ("encoder", m.n_layers, "encoder"),
        ("decoder", m.decoder_layers, "decoder"),
    ):
        for i in range(n):
            a, h = f"{ours}.{i}.", f"{stack}.block.{i}.layer."
            attention(a + "attn.", h + "0.SelfAttention.", cross=False)
            _copy(out, sd, a + "ln_attn.weight", h + "0.layer_norm.weight")
            last = 1
            if stack == "decoder":
                attention(a + "cross_attn.", h + "1.EncDecAttention.", cross=True)
                _copy(out, sd, a + "ln_cross.weight", h + "1.layer_norm.weight")
                last = 2
            mlp(a + "mlp.", f"{h}{last}.DenseReluDense.")
            _copy(out, sd, a + "ln_mlp.weight", f"{h}{last}.layer_norm.weight")
        # One bias table per stack; transformers keeps it on the stack's first layer.
        bias = "enc_bias.weight" if stack == "encoder" else "dec_bias.weight"
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = sd[
            bias
        ].clone()
    _copy(out, sd, "enc_norm.weight", "encoder.final_layer_norm.weight")
    _copy(out, sd, "dec_norm.weight", "decoder.final_layer_norm.weight")
    out["lm_head.weight"] = (
        sd["head.weight"].clone() if "head.weight" in sd else out["shared.weight"]
    )
    return out


MAPPERS = {
    "GPT2LMHeadModel": gpt2_state,
    "LlamaForCausalLM": llama_state,
    "BertForMaskedLM": bert_state,
    "T5ForConditionalGeneration": t5_state,
}


def hf_state_dict(model, cfg: Config) -> Tensors:
    """Our TP=1 model's weights under the target class's names, mapped exactly."""
    from pretrain.reshard import VOCAB_PARAM

    sd = tensors_of(model)
    rows = cfg.model.tokenizer_vocab
    if rows is not None:  # the padding rows: masked in our model, absent from the export
        sd = {k: v[:rows] if VOCAB_PARAM.search(k) else v for k, v in sd.items()}
    return MAPPERS[hf_target(cfg)](sd, cfg)


def hf_model(cfg: Config, state: Tensors, specials: Any | None = None):
    """The transformers model holding `state`, loaded strictly: every weight it has comes from
    ours and nothing of ours is left over."""
    import transformers

    hf_cfg = hf_config(cfg, specials)
    model = getattr(transformers, hf_target(cfg))(hf_cfg).eval()
    want = set(model.state_dict())
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise CheckpointError(
            f"export mapping out of step with transformers' {hf_target(cfg)}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model


def hf_tokenizer(tokenizer_file: str | Path):
    """The dataset's tokenizer.json as a PreTrainedTokenizerFast with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, Tokenizer

    tok = Tokenizer.load(tokenizer_file)
    sp = tok.specials
    kw: dict[str, Any] = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
    if sp.pad_id is not None:
        kw["pad_token"] = PAD_TOKEN
    if sp.mask_id is not None:
        kw["mask_token"] = MASK_TOKEN
    sentinels = [tok._hf.id_to_token(i) for i in sp.sentinel_ids]
    if sentinels:
        kw["additional_special_tokens"] = sentinels
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kw), sp


def export_hf(path: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write the checkpoint as a transformers model directory (config.json, model.safetensors,
    tokenizer files) that `from_pretrained(out_dir)` loads with no network access."""
    from data_pipeline.loader import DatasetInfo
    from pretrain.generate_cli import find_checkpoint, load_run_config

    # Refuse from the config alone, before the weights are read.
    hf_target(load_run_config(*find_checkpoint(Path(path))))
    model, cfg, _ = load(path)
    tok_file = Path(tokenizer) if tokenizer else Path(DatasetInfo(cfg.data.path).tokenizer_file)
    hf_tok, specials = hf_tokenizer(tok_file)
    out = Path(out_dir)
    hf = hf_model(cfg, hf_state_dict(model, cfg), specials)
    hf.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
