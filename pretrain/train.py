"""Entry point: `pretrain-train CONFIG [section.key=value ...]`, one process per rank (torchrun).

Reads and checks everything that can be wrong before any process group exists (config, data,
checkpoint), then wires the parts in one chain: layout -> model -> engine -> data -> tracker ->
trainer -> fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError
from pretrain.config import Config, ConfigError, load_config, resolve_vocab
from pretrain.errors import CheckpointError


class RunLog:
    """Rank 0's printer: each line goes to stdout and is appended to the run directory's
    train.log, so a run's history stays beside its checkpoints. Other ranks print nothing."""

    def __init__(self, path: Path | None):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a")

    def __call__(self, *parts: Any, **kwargs: Any) -> None:
        if self.file is None:
            return
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain-train", description=__doc__)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4")
    return p.parse_args(argv)


# The training objective each family's batches come from (data_pipeline.objectives).
OBJECTIVES = {"gpt": "causal", "bert": "mlm", "t5": "span"}


def prepare(argv: list[str] | None) -> tuple[Config, Any, Path | None]:
    """Everything that reads user input, with no process group yet. The config is checked
    before torch is even imported, so a typo costs no start-up time."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from data_pipeline.loader import check_data, make_batches, open_datasets
    from pretrain.checkpoint import check_compatible, resolve_resume

    objective = OBJECTIVES[cfg.model.family]
    L, seed = cfg.model.seq_len, cfg.run.seed
    info = open_datasets(cfg.data.path, cfg.data.blend)[0][1]  # a blend shares one tokenizer
    cfg = resolve_vocab(cfg, info.vocab_size)
    check_data(cfg.data, L, seed, objective, vocab_size=cfg.model.vocab_size)
    dp, _ = cfg.parallel.layout(int(os.environ.get("WORLD_SIZE", 1)))
    resume_from = resolve_resume(cfg.run.resume, cfg.checkpoint_dir)
    if resume_from is not None:
        # The identity (datasets, seed, windows, objective) the run's train loader will have.
        expected = make_batches(cfg.data, "train", L, seed, 1, objective=objective, num_workers=0)
        check_compatible(resume_from, cfg, expected.state_dict(), dp)
    return cfg, info, resume_from


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, info, resume_from = prepare(argv)
    except (ConfigError, DataError, CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain import distributed

    layout = distributed.setup(cfg)
    try:
        run(cfg, info, resume_from, layout)
    except CheckpointError as e:  # raised alike on every rank (checkpoint.agree, verify)
        if layout.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


def run(cfg: Config, info: Any, resume_from: Path | None, layout):
    """Build everything for this rank and train; returns the trainer (tests inspect it)."""
    from data_pipeline.loader import make_batches
    from pretrain import checkpoint
    from pretrain import trainer as T
    from pretrain.distributed import seed_all
    from pretrain.engine import build_engine, build_model_for
    from pretrain.memory import watch_first_step
    from pretrain.models.flops import flops_per_token, param_count
    from pretrain.models.rng import seed_model_rng
    from pretrain.tracking import Tracker

    say = RunLog(cfg.run.run_dir / "train.log" if layout.is_main else None)
    checkpoint.agree(resume_from, layout)  # every rank loads rank 0's choice, or none does
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    model = build_model_for(cfg, layout)  # partitioned while it is built under ZeRO-3
    # Dropout streams: distinct per data-parallel rank, shared inside a tensor-parallel group
    # (whose ranks must drop the same activations of the replicated residual stream).
    seed_all(cfg.run.seed + 1000 * layout.dp_rank + 100 * layout.pp_rank + 1)
    # The model-parallel stream (dropout on TP-sharded activations) differs per TP rank too.
    seed_model_rng(model, cfg.run.seed, layout.dp_rank, layout.pp_rank, layout.tp_rank)
    engine, scheduler = build_engine(cfg, layout, model)

    L, mb, objective = (
        cfg.model.seq_len,
        cfg.parallel.micro_batch_size,
        OBJECTIVES[cfg.model.family],
    )
    vocab = cfg.model.vocab_size
    train_data = make_batches(
        cfg.data,
        "train",
        L,
        cfg.run.seed,
        mb,
        layout.dp_rank,
        layout.dp_size,
        layout.grad_accum,
        objective,
        vocab_size=vocab,
    )
    val_data = None
    if cfg.run.eval_batches and all("val" in i.shards for i in train_data.sequences.infos):
        # No workers: evaluation rewinds to the start each time and would discard their work.
        val_data = make_batches(
            cfg.data,
            "val",
            L,
            cfg.run.seed,
            mb,
            layout.dp_rank,
            layout.dp_size,
            1,
            objective,
            shuffle=False,
            vocab_size=vocab,
            num_workers=0,
        )

    tracker = Tracker(cfg, layout.is_main)
    trainer = T.Trainer(cfg, layout, engine, scheduler, train_data, val_data, tracker)
    if resume_from is not None:
        trainer.load(resume_from)
    start_step = trainer.state.step
    if layout.is_main:  # after every rank has read the checkpoint it starts from
        moved = checkpoint.start_branch(cfg.checkpoint_dir, resume_from)
        if moved:
            say(moved)

    run_dir = cfg.run.run_dir
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    tracker.start(trainer.state.mlflow_run_id, run_dir / "config.yaml")
    trainer.state.mlflow_run_id = tracker.run_id

    n_params = param_count(cfg.model)
    say(
        f"model: {cfg.model.family} {n_params / 1e6:.2f}M parameters "
        f"({param_count(cfg.model, embeddings=False) / 1e6:.2f}M non-embedding), "
        f"{flops_per_token(cfg.model, getattr(train_data.objective, 'dec_len', None)) / 1e6:.1f}"
        " MFLOP/token"
    )
    say(
        f"layout: world {layout.world_size} = dp {layout.dp_size} x tp {layout.tp_size} x pp "
        f"{layout.pp_size}, ZeRO {cfg.parallel.zero_stage}, {cfg.run.precision}, "
        f"{layout.device.type}; global batch {train_data.global_batch} x {L} tokens "
        f"(micro {mb}, accumulation {layout.grad_accum})"
    )
    for part in train_data.mixture():
        say(
            f"data: {part['path']} (weight {part['weight']:.3g}, {objective} objective, "
            f"fingerprint {train_data.state_dict()['fingerprint'][:12]})"
        )
    if resume_from is not None:
        say(f"resumed from {resume_from} at step {start_step}")

    evals, saves = T.EvalHook(say), T.CheckpointHook(say)
    if resume_from is not None and resume_from.parent.resolve() == cfg.checkpoint_dir.resolve():
        # This step is already saved here: a relaunched finished run must not rewrite (and,
        # interrupted, lose) its final checkpoint.
        saves.saved_step, saves.last_path = start_step, resume_from
    trainer.hooks = [
        T.NaNGuard(),
        T.ProgressHook(say),
        T.TrackingHook(),
        evals,
        saves,
        T.ExitHook(start_step),
    ]
    watch_first_step(trainer, say)  # memory per rank, printed and logged after the first step
    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0
    done = trainer.state.step >= cfg.run.train_steps
    report_mixture(trainer, say)
    if trainer.stop_reason and not done:
        say(
            f"stopped at step {trainer.state.step}: {trainer.stop_reason}; continue with "
            f"run.resume=auto"
        )
    if done:
        summarize(trainer, info, say, elapsed, start_step, evals.last, saves.last_path)
    tracker.finish("FINISHED" if done else "KILLED")
    for loader in (train_data, val_data):
        if loader is not None:
            loader.close()
    say.close()
    return trainer


def report_mixture(trainer, say) -> None:
    """For a blend, the mixture realised so far against the weights asked for, printed and
    recorded in MLflow (a blend's schedule keeps each share within a few sequences)."""
    parts = trainer.train_data.mixture()
    if len(parts) < 2:
        return
    for i, part in enumerate(parts):
        consumed = trainer.train_data.consumed
        say(
            f"data mixture: {part['path']}: {part['fraction']:.2%} of {consumed:,} sequences "
            f"(weight {part['weight']:.2%}), {part['epochs']:.2f} epochs"
        )
        trainer.tracker.log({f"data_fraction_{i}": part["fraction"]}, trainer.state.step)


def summarize(
    trainer,
    info: Any,
    say,
    elapsed: float,
    start_step: int,
    val: dict[str, float],
    ckpt: Path | None,
) -> None:
    """The end of a finished run: throughput, loss against a unigram model, where things are,
    and a sample from the model."""
    from data_pipeline.stats import unigram_loss
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.generate import generate

    cfg = trainer.cfg
    steps = trainer.state.step - start_step
    say(
        f"trained {steps} steps in {elapsed:.0f} s "
        f"({steps * trainer.tokens_per_step / max(elapsed, 1e-9):,.0f} tokens/s)"
    )
    causal = cfg.model.family == "gpt"
    if val and causal and not cfg.data.blend:
        val_loss = val["val_loss"]
        uni = unigram_loss(info)
        say(
            f"final validation loss {val_loss:.3f} nats/token vs unigram model {uni:.3f} "
            f"({val_loss / uni:.0%} of it)"
        )
    elif val:  # masked or span targets: a unigram model of the stream is no fair baseline
        say(f"final validation loss {val['val_loss']:.3f} nats/token")
    if ckpt is not None:
        say(f"checkpoint: {ckpt}")
    if trainer.tracker.active:
        say(
            f"MLflow: run {trainer.tracker.run_id} in {trainer.tracker.uri}\n"
            f"  open the UI with: {Path(sys.executable).parent / 'mlflow'} ui "
            f"--backend-store-uri {trainer.tracker.uri}"
        )
    if cfg.run.sample_tokens and causal and trainer.layout.pp_size > 1:
        # Each rank holds one stage; pretrain-generate merges the stages of the checkpoint.
        say(f"sample: pretrain-generate {ckpt or cfg.checkpoint_dir} --prompt TEXT")
    elif cfg.run.sample_tokens and causal:  # T5 samples with `pretrain-generate`
        tok = Tokenizer.load(info.tokenizer_file)
        prompt = tok.encode(cfg.run.sample_prompt) or [info.eos_id]
        out = generate(
            trainer.engine.module,
            prompt,
            cfg.run.sample_tokens,
            seq_len=cfg.model.seq_len,
            vocab_limit=info.vocab_size,
            temperature=0.8,
            top_k=40,
            seed=cfg.run.seed,
            device=trainer.layout.device,
        )
        say("sample:\n" + cfg.run.sample_prompt + tok.decode(out))


if __name__ == "__main__":
    sys.exit(main())
