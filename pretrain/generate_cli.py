"""`pretrain-generate RUN_DIR_OR_CHECKPOINT --prompt TEXT`: sample from a trained model.

Reads the run's resolved config (the run directory's config.yaml, else the copy inside the
checkpoint), the weights of a DeepSpeed checkpoint (ZeRO 0-2: the `module` entry of each
tensor-parallel rank's model-states file, merged into one TP=1 model; ZeRO-3: DeepSpeed's
zero_to_fp32 reconstruction) and the dataset's tokenizer, then generates on one process:
GPT continues the prompt (greedy, or temperature / top-k sampling), T5 decodes greedily from the
prompt as encoder input. With the run's seed, temperature 0.8 and top-k 40 it reproduces the
sample a finished training run prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError
from pretrain.config import Config, ConfigError, from_dict, load_config
from pretrain.errors import CheckpointError, run_cli

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain-generate",
        description=__doc__,
        epilog="examples:\n"
        "  pretrain-generate runs/tiny --prompt 'def main(' --max-new-tokens 40\n"
        "  pretrain-generate runs/tiny/checkpoints/step_00000020 --prompt 'import' "
        "--temperature 0.8 --top-k 40 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory, its checkpoints/ directory, or one step_* dir")
    p.add_argument("--prompt", default="", help="text to continue (T5: the encoder input)")
    p.add_argument(
        "--max-new-tokens", type=int, default=50, help="tokens to generate, e.g. 100 (default 50)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's dataset tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="recompute the whole context per token instead of caching keys and values",
    )
    return p.parse_args(argv)


# --- finding the checkpoint and its config -------------------------------------------------------


def find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(step directory, the run's config.yaml or None) for a run dir, a checkpoints dir or a
    step dir."""
    from pretrain.checkpoint import PREFIX, head, is_complete

    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.name.startswith(PREFIX):
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no COMPLETE marker); pass an earlier one"
            )
        run_cfg = path.parent.parent / "config.yaml"
        return path, run_cfg if run_cfg.is_file() else None
    run_cfg = path / "config.yaml" if (path / "config.yaml").is_file() else None
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = head(ckpt_dir)  # the live lineage's newest, as run.resume=auto takes it
    if found is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint; pass a run directory that has "
            f"checkpoints/step_*/COMPLETE, or one such step directory"
        )
    if run_cfg is None and (ckpt_dir.parent / "config.yaml").is_file():
        run_cfg = ckpt_dir.parent / "config.yaml"
    return found, run_cfg


def checkpoint_meta(step_dir: Path) -> dict[str, Any]:
    return json.loads((step_dir / "COMPLETE").read_text())


def load_run_config(step_dir: Path, run_cfg: Path | None) -> Config:
    """The run's resolved config: config.yaml beside the checkpoints, else the copy saved in
    the checkpoint's client state."""
    if run_cfg is not None:
        return load_config(run_cfg)
    import torch

    # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt, stages 0-2 without the prefix.
    candidates = sorted(step_dir.glob("*" + MODEL_STATES.format(0)))
    if not candidates:
        raise CheckpointError(f"{step_dir} has no config.yaml beside it and no model states")
    states = candidates[0]
    saved = torch.load(states, map_location="cpu", weights_only=False).get("config")
    if saved is None:
        raise CheckpointError(f"{states} holds no config; pass the run directory instead")
    return from_dict(saved)


# --- weights -----------------------------------------------------------------------------------


def merge_tp_shards(shards: list[dict[str, Any]], full: dict[str, Any]) -> dict[str, Any]:
    """One TP=1 state dict from the state dicts of every TP rank, in rank order.

    Every tensor is either replicated (same shape as in the TP=1 model: rank 0's copy) or split
    along the one dimension where its shape differs (concatenated in rank order: megatron and
    our layers give rank r the r-th contiguous block of the full tensor, and every fused layout
    (QKV groups, interleaved gate/up) is laid out so that this holds).
    """
    merged: dict[str, Any] = {}
    for key, want in full.items():
        if key not in shards[0]:
            raise CheckpointError(
                f"the checkpoint has no '{key}': is it a checkpoint of this model?"
            )
        parts = [s[key] for s in shards]
        if not hasattr(want, "shape") or parts[0].shape == want.shape:
            merged[key] = parts[0]
            continue
        dims = [
            d for d, (a, b) in enumerate(zip(parts[0].shape, want.shape, strict=True)) if a != b
        ]
        if len(dims) != 1 or parts[0].shape[dims[0]] * len(parts) != want.shape[dims[0]]:
            raise CheckpointError(
                f"'{key}' has shape {tuple(parts[0].shape)} per rank and {tuple(want.shape)} in "
                f"the model: the checkpoint's config does not describe these weights"
            )
        import torch

        merged[key] = torch.cat(parts, dim=dims[0])
    return merged


def load_weights(step_dir: Path, cfg: Config, full: dict[str, Any]) -> dict[str, Any]:
    """The TP=1 state dict of a checkpoint (float32)."""
    import torch

    meta = checkpoint_meta(step_dir)
    tp, pp = int(meta.get("tp", 1)), int(meta.get("pp", 1))
    zero = int(meta.get("zero_stage", cfg.parallel.zero_stage))
    if zero == 3:
        if tp != 1:
            raise CheckpointError(
                f"{step_dir} is a ZeRO-3 checkpoint with tp={tp}; DeepSpeed's zero_to_fp32 "
                f"reconstructs tp=1 only"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        # zero_to_fp32 returns parameters only; keep the model's own non-parameter entries.
        return {k: state.get(k, v) for k, v in full.items()}
    shards = [
        pipeline_shard(step_dir, cfg, rank) if pp > 1 else model_shard(step_dir, rank, tp)
        for rank in range(tp)
    ]
    merged = merge_tp_shards(shards, full)
    return {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in merged.items()
    }


def model_shard(step_dir: Path, tp_rank: int, tp: int) -> dict[str, Any]:
    """One TP rank's whole model (ZeRO 0-2 without pipeline stages): its model-states file."""
    import torch

    f = step_dir / MODEL_STATES.format(tp_rank)
    if not f.is_file():
        raise CheckpointError(f"{step_dir} misses {f.name} (saved with tp={tp})")
    module = torch.load(f, map_location="cpu", weights_only=False)["module"]
    if any(step_dir.glob("layer_*_expert_*_model_states.pt")):  # a mixture of experts
        from pretrain.models.moe import expert_weights

        module.update(expert_weights(step_dir, tp_rank))
    return module


def pipeline_shard(step_dir: Path, cfg: Config, tp_rank: int) -> dict[str, Any]:
    """One TP rank's whole model from a pipeline checkpoint: DeepSpeed writes one file per
    pipeline layer (`layer_XX-model_TT-model_states.pt`, tied uses after the first not saved
    again); their names are mapped to the one-process model's (pipeline.layer_name_maps)."""
    import torch

    from pretrain.models.pipeline import layer_name_maps, pipeline_layer_specs

    maps = layer_name_maps(pipeline_layer_specs(cfg.model))
    state: dict[str, Any] = {}
    for index, to_model in enumerate(maps):
        f = step_dir / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
        if f.is_file():
            layer = torch.load(f, map_location="cpu", weights_only=False)
            state.update({to_model(k): v for k, v in layer.items()})
    return state


def single_process_group() -> Any:
    """A world of one (gloo, no network) and megatron's TP=1 groups, for the model's layers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    return ps.get_tensor_model_parallel_group()


def load_model(path: str | Path, device: str = "cpu"):
    """(model in eval mode at TP=1, the run's config) from a run directory or checkpoint."""
    import torch

    from pretrain.models import build_model

    step_dir, run_cfg = find_checkpoint(Path(path))
    cfg = load_run_config(step_dir, run_cfg)
    group = single_process_group()
    torch.manual_seed(0)
    model = build_model(cfg.model, group, 1)
    state = load_weights(step_dir, cfg, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def load_tokenizer(cfg: Config, override: str | None):
    from data_pipeline.tokenizer import Tokenizer

    if override:
        return Tokenizer.load(override)
    from data_pipeline.loader import DatasetInfo

    try:
        return Tokenizer.load(DatasetInfo(cfg.data.path).tokenizer_file)
    except DataError as e:
        raise DataError(f"{e}; or pass --tokenizer PATH/tokenizer.json") from None


def run(args: argparse.Namespace) -> str:
    from pretrain.generate import generate, generate_seq2seq

    # DeepSpeed's checkpoint tools print progress to stdout; stdout is for the text alone.
    with contextlib.redirect_stdout(sys.stderr):
        model, cfg = load_model(args.path, args.device)
    tok = load_tokenizer(cfg, args.tokenizer)
    family = cfg.model.family
    if family == "bert":
        raise ConfigError(
            "model.family", family, "BERT is a masked-LM encoder, not a generator; use GPT or T5"
        )
    ids = tok.encode(args.prompt)
    if family == "t5":
        if tok.pad_id is None:
            raise DataError("the tokenizer has no pad token, with which T5's decoder input starts")
        # The encoder input ends with EOS, as the span-corruption batches do.
        out = generate_seq2seq(
            model,
            [*ids, tok.eos_id],
            args.max_new_tokens,
            start_id=tok.pad_id,
            eos_id=tok.eos_id,
            vocab_limit=tok.vocab_size,
            device=args.device,
            kv_cache=not args.no_kv_cache,
        )
        return tok.decode([t for t in out if t != tok.eos_id])
    out = generate(
        model,
        ids or [tok.eos_id],
        args.max_new_tokens,
        seq_len=cfg.model.seq_len,
        vocab_limit=tok.vocab_size,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        device=args.device,
        kv_cache=not args.no_kv_cache,
    )
    return args.prompt + tok.decode(out)


def main(argv: list[str] | None = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
