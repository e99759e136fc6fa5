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
    p = argparse.ArgumentParser(
        prog="pretrain-train",
        description=__doc__,
        epilog="examples (one process; pretrain-launch starts several):\n"
        "  pretrain-train configs/tiny.yaml\n"
        "  pretrain-train configs/tiny.yaml run.train_steps=100 run.resume=auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 optim.lr=1e-3"
    )
    return p.parse_args(argv)


# The training objective each family's batches come from (data_pipeline.objectives).
OBJECTIVES = {"gpt": "causal", "bert": "mlm", "t5": "span"}


def prepare(argv: list[str] | None) -> tuple[Config, Any, Path | None]:
    """Everything that reads user input, with no process group yet. The config is checked
    before torch is even imported, so a typo costs no start-up time."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, int(os.environ.get("WORLD_SIZE", 1)))
    from data_pipeline.loader import check_data, make_batches, open_datasets
    from pretrain.checkpoint import (
        check_compatible,
        check_files,
        check_run_config,
        resolve_resume,
    )

    objective = OBJECTIVES[cfg.model.family]
    L, seed = cfg.model.seq_len, cfg.run.seed
    info = open_datasets(cfg.data.path, cfg.data.blend)[0][1]  # a blend shares one tokenizer
    cfg = resolve_vocab(cfg, info.vocab_size)
    datasets = check_data(cfg.data, L, seed, objective, vocab_size=cfg.model.vocab_size)
    splits = ["train"]
    if cfg.run.eval_batches and all("val" in i.shards for _, i in datasets):
        # run() evaluates on the validation split then: it must hold a sequence too.
        check_data(cfg.data, L, seed, objective, cfg.model.vocab_size, splits=("val",))
        splits.append("val")
    for _, dataset in datasets:
        for split in splits:
            dataset.check_sizes(split)  # a truncated or missing shard, before any rank reads
    dp, _ = cfg.parallel.layout(int(os.environ.get("WORLD_SIZE", 1)))
    resume_from = resolve_resume(cfg.run.resume, cfg.checkpoint_dir)
    if resume_from is None and cfg.run.branch_from is not None:
        resume_from = resolve_resume(cfg.run.branch_from, cfg.checkpoint_dir)
    if resume_from is None:  # a resume's checkpoint is compared instead (check_compatible)
        check_run_config(cfg)
    if resume_from is not None:
        # The identity (datasets, seed, windows, objective) the run's train loader will have.
        expected = make_batches(cfg.data, "train", L, seed, 1, objective=objective, num_workers=0)
        resharding = check_compatible(resume_from, cfg, expected.state_dict(), dp)
        check_files(resume_from)
        if resharding:
            from pretrain.reshard import ensure_universal

            # Once per checkpoint, before any process group: the first rank here converts,
            # the others wait for it under a file lock.
            ensure_universal(resume_from)
    if int(os.environ.get("RANK", 0)) == 0:
        # The MLflow store is built (or migrated) here, once, before any rank starts: a launch
        # killed meanwhile leaves no half-built store behind (pretrain.tracking_store).
        from pretrain.tracking_store import prepare_store

        note = prepare_store(cfg)
        if note:
            print(note, flush=True)
    return cfg, info, resume_from


USER_ERRORS = (ConfigError, DataError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """The pretrain-train entry point."""
    from pretrain.environment import RUN_DEFAULTS, environ_defaults, single_process_world

    # DeepSpeed's engine (LOCAL_RANK, while it trains) and MLflow (at every request) read these
    # only from the environment: the entry point sets them for the run, never library code.
    with environ_defaults({**RUN_DEFAULTS, **single_process_world()}):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from pretrain import lifecycle

    # First, before the slow imports: a stop asked for while the rank starts is kept for the
    # first step boundary, and third-party warnings stay off the console.
    life = Lifetime(lifecycle.StopSignals(), lifecycle.route_warnings(), lifecycle.StartupClock())
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, info, resume_from = prepare(argv)
    except USER_ERRORS as e:  # every rank checks the same input: rank 0 speaks for all
        return lifecycle.report_error(str(e), rank, 2, same_on_every_rank=True)
    life.clock.mark("imports and checks")
    if cfg.run.host_memory == "reuse":  # before the model and engine allocate anything large
        from pretrain.host_memory import reuse_freed_memory

        reuse_freed_memory()
    from pretrain import distributed
    from pretrain.reliability import PeerFailure
    from pretrain.startup_imports import deepspeed_without_mlflow, megatron_without_dynamo

    fresh = not cfg.run.run_dir.exists()
    # DeepSpeed and megatron-core are first imported in setup()
    with deepspeed_without_mlflow(), megatron_without_dynamo():
        layout = distributed.setup(cfg)
    life.clock.mark("process groups")
    try:
        trainer = run(cfg, info, resume_from, layout, life)
        if trainer.fault:  # saved, but stopped by a fault (pretrain.reliability): not a success
            return lifecycle.report_error(trainer.fault, layout.rank, 3, same_on_every_rank=True)
    except PeerFailure as e:
        # A peer is dead or hung: tearing the groups down would wait on it. Every rank that
        # gets here says so (which rank saw what is the clue); loader workers die with us.
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except USER_ERRORS as e:  # found by some ranks only, maybe (a corrupt shard)
        if fresh and layout.is_main:
            _remove_unstarted(cfg)
        return lifecycle.report_error(str(e), layout.rank, 2, same_on_every_rank=False)
    except Exception as e:
        if lifecycle.reported_code() == 2:  # a peer's bad input, explained: this is its echo
            if fresh and layout.is_main:
                _remove_unstarted(cfg)
            return 2
        return lifecycle.report_crash(e, layout.rank, cfg.run.run_dir / "train.log")
    finally:
        distributed.teardown()
    return 0


class Lifetime:
    """What main() sets up before the slow imports and run() takes over (pretrain.lifecycle)."""

    def __init__(self, stops: Any, warnings_log: Any, clock: Any):
        self.stops, self.warnings_log, self.clock = stops, warnings_log, clock


def _remove_unstarted(cfg: Config) -> None:
    """A run folder this launch created and that holds no checkpoint is only a leftover of
    a failed start: remove it, so that a corrected relaunch starts as a fresh run."""
    import shutil

    from pretrain.checkpoint import complete_checkpoints

    if not complete_checkpoints(cfg.checkpoint_dir):
        shutil.rmtree(cfg.run.run_dir, ignore_errors=True)


def run(cfg: Config, info: Any, resume_from: Path | None, layout, life: Lifetime | None = None):
    """Build everything for this rank and train; returns the trainer (tests inspect it)."""
    from data_pipeline.loader import make_batches
    from pretrain import checkpoint
    from pretrain import trainer as T
    from pretrain.distributed import seed_all
    from pretrain.engine import build_engine, build_model_for, effective_zero_stage
    from pretrain.memory import watch_first_step
    from pretrain.models.flops import active_param_count, flops_per_token, param_count
    from pretrain.models.rng import seed_model_rng
    from pretrain.perf import PerfHook, peak_line
    from pretrain.reliability import peers_of_host
    from pretrain.tracking import Tracker

    say = RunLog(cfg.run.run_dir / "train.log" if layout.is_main else None)
    if life is not None:
        life.warnings_log.attach(cfg.run.run_dir / "train.log" if layout.is_main else None)
    checkpoint.agree(resume_from, layout)  # every rank loads rank 0's choice, or none does
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    model = build_model_for(cfg, layout)  # partitioned while it is built under ZeRO-3
    if life is not None:
        life.clock.mark("model")
    # Dropout streams: distinct per data-parallel rank, shared inside a tensor-parallel group
    # (whose ranks must drop the same activations of the replicated residual stream).
    seed_all(cfg.run.seed + 1000 * layout.dp_rank + 100 * layout.pp_rank + 1)
    # The model-parallel stream (dropout on TP-sharded activations) differs per TP rank too.
    seed_model_rng(model, cfg.run.seed, layout.dp_rank, layout.pp_rank, layout.tp_rank)
    engine, scheduler = build_engine(cfg, layout, model)
    if life is not None:
        life.clock.mark("engine")

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
    trainer.peers = peers_of_host(layout)  # whom a rank may end when they are stopped
    if life is not None:
        life.clock.mark("data")
    if resume_from is not None:
        trainer.load(resume_from)
        if life is not None:
            life.clock.mark("checkpoint load")
    branched_from = None
    if resume_from is not None and resume_from.parent.resolve() != cfg.checkpoint_dir.resolve():
        # Another run's checkpoint (a branch): a new MLflow run, tagged with the one it left.
        branched_from = (trainer.state.mlflow_run_id, resume_from)
        trainer.state.mlflow_run_id = None
    start_step = trainer.state.step
    if layout.is_main:  # after every rank has read the checkpoint it starts from
        moved = checkpoint.start_branch(cfg.checkpoint_dir, resume_from)
        if moved:
            say(moved)

    run_dir = cfg.run.run_dir
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if tracker.active:
        from pretrain.tracking import run_params, run_tags

        tracker.start(
            trainer.state.mlflow_run_id,
            run_dir / "config.yaml",
            run_params(cfg, layout, train_data.global_batch),
            run_tags(cfg, layout, train_data.state_dict()["fingerprint"]),
            branched_from,
        )
    trainer.state.mlflow_run_id = tracker.run_id  # a new run's id: set once the store made it

    n_params = param_count(cfg.model)
    fpt = flops_per_token(cfg.model, getattr(train_data.objective, "dec_len", None))
    active = (
        f", {active_param_count(cfg.model) / 1e6:.2f}M active per token"
        if cfg.model.moe_experts
        else ""
    )
    say(
        f"model: {cfg.model.family} {n_params / 1e6:.2f}M parameters "
        f"({param_count(cfg.model, embeddings=False) / 1e6:.2f}M non-embedding{active}), "
        f"{fpt / 1e6:.1f} MFLOP/token"
    )
    zero = str(cfg.parallel.zero_stage)
    if effective_zero_stage(cfg, layout.dp_size) != cfg.parallel.zero_stage:
        zero += " (run as 0: one data-parallel rank has nothing to partition)"
    say(
        f"layout: world {layout.world_size} = dp {layout.dp_size} x tp {layout.tp_size} x pp "
        f"{layout.pp_size}, ZeRO {zero}, {cfg.run.precision}, "
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
    if trainer.resharded:
        say(
            f"resharded {resume_from.name}: {', '.join(trainer.resharded)} (weights"
            + ("" if "optimizer" in cfg.checkpoint.exclude_from_loading else ", Adam moments")
            + ", schedule, data position"
            + (
                " and RNG streams carried over (same ranks)"
                if trainer.rng_restored
                else " carried over; dropout streams re-seeded for the new layout"
            )
            + f"; consolidated copy cached in {resume_from / 'universal'})"
        )

    evals, saves = T.EvalHook(say), T.CheckpointHook(say)
    if resume_from is not None and resume_from.parent.resolve() == cfg.checkpoint_dir.resolve():
        # This step is already saved here: a relaunched finished run must not rewrite (and,
        # interrupted, lose) its final checkpoint.
        saves.saved_step, saves.last_path = start_step, resume_from
    perf = PerfHook(trainer, fpt, say)  # step split, MFU and the profiler window
    say(peak_line(perf))
    trainer.hooks = [
        T.ProgressHook(say),
        perf,
        *moe_hooks(cfg, say),  # routing statistics into the metrics TrackingHook logs
        T.TrackingHook(),
        evals,
        saves,
        (exits := T.ExitHook(start_step)),
    ]
    if life is not None:
        # The trainer's handler has replaced the start-up one: pass on a stop asked for while
        # starting, so the run stops (and saves) after its first step.
        exits.signalled = exits.signalled or life.stops.signalled
        life.clock.mark("hooks and logging")
        say(life.clock.line())
    watch_first_step(trainer, say)  # memory per rank, printed and logged after the first step
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        trainer.fit()
    except BaseException:
        # What the run logged up to the error reaches the store (metric records may be held
        # for tracking.metrics_interval), and the MLflow run ends as FAILED; bounded, so that
        # a failing job is not kept alive by an unreachable store.
        tracker.finish("FAILED", timeout=min(cfg.tracking.flush_timeout, 5.0))
        raise
    elapsed = time.perf_counter() - t0
    # CPU time does not stretch when other jobs share the cores: a speed figure that survives
    # a loaded machine (benchmarks/e2e_parity.py compares it with the plain script's).
    cpu = time.process_time() - cpu0
    tokens = (trainer.state.step - start_step) * trainer.tokens_per_step
    say(f"training CPU time: {cpu:.1f} s ({tokens / max(cpu, 1e-9):,.0f} tokens per CPU second)")
    done = trainer.state.step >= cfg.run.train_steps
    report_mixture(trainer, say)
    if trainer.stop_reason and not done:
        say(
            f"stopped at step {trainer.state.step}: {trainer.stop_reason}; continue with "
            f"run.resume=auto"
        )
    if done:
        summarize(trainer, info, say, elapsed, start_step, evals.last, saves.last_path)
    if life is not None:
        startup = life.clock.last - life.clock.launch
        say(
            f"wall time {life.clock.since_launch():.1f} s from launch: start-up {startup:.1f} s, "
            f"training {elapsed:.1f} s (with evaluations and saves), summary and sample "
            f"{life.clock.since_launch() - startup - elapsed:.1f} s"
        )
    tracker.finish("FINISHED" if done else "KILLED", run_dir / "loss_curve.png")
    for loader in (train_data, val_data):
        if loader is not None:
            loader.close()
    say.close()
    return trainer


def moe_hooks(cfg: Config, say) -> list:
    """The routing-statistics hook of a mixture of experts (pretrain.models.moe), or none."""
    if not cfg.model.moe_experts:
        return []
    from pretrain.models.moe import MoEHook

    return [MoEHook(say, cfg.run.run_dir / "expert_load.png")]


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


def console_main() -> int:
    """`pretrain-train` and `python -m pretrain.train` (what torchrun starts on each rank):
    main(), then no stop signal can change its exit code (lifecycle.ignore_stop_signals).
    Kept apart from main(), which tests call in their own process."""
    from pretrain import lifecycle

    try:
        return main()
    finally:
        lifecycle.ignore_stop_signals()


if __name__ == "__main__":
    sys.exit(console_main())
