"""The runs of the 3D-parallelism equivalence test, shared by the pytest side
(tests/distributed/test_3d_parallel.py) and the torchrun side (tests/distributed/layout_worker.py).

Pure Python: the test module imports it without torch. A run is a model case of tp_cases (or the
token-weighting BERT case), a layout (tp, pp, ZeRO stage, micro-batch size; the world size and the
global batch fix data parallelism and accumulation) and optionally a `control`: a named way the
worker breaks the run on purpose, so the test can show that its check catches exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

from tp_cases import BASE, CASES

# Sequences per optimizer step over all data-parallel ranks and micro-batches, in every run:
# each layout splits the same 8 sequences, so every run of a case is compared with the one
# process run that takes all 8 in one forward pass.
GLOBAL_BATCH = 8
STEPS = 10
TOKEN_STEPS = 2  # the token-weighting runs compare step-1 gradients only
SEED = 0


@dataclass(frozen=True)
class Run:
    case: str  # a key of CASES, or "bert-tokens"
    world: int  # processes of the launch that runs it
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro: int = GLOBAL_BATCH
    sp: bool = False  # sequence parallelism (tp > 1)
    recompute: str = "none"  # model.recompute inside the stages (the references use none)
    # T5's 2 + 1 blocks do not divide into 2 stages: it is balanced by parameters, which puts
    # a stage boundary between the encoder's last block and its final norm.
    partition: str = "uniform"
    control: str | None = None  # see CONTROLS

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def accum(self) -> int:
        return GLOBAL_BATCH // (self.micro * self.dp)

    @property
    def family(self) -> str:  # the batch contract (tp_worker.BATCHES, or "mlm-varied")
        return "mlm-varied" if self.case == "bert-tokens" else CASES[self.case].family

    @property
    def steps(self) -> int:
        return TOKEN_STEPS if self.case == "bert-tokens" else STEPS

    def overrides(self) -> list[str]:
        case = "bert" if self.case == "bert-tokens" else self.case
        return [
            *BASE,
            *CASES[case].overrides,
            f"parallel.tp={self.tp}",
            f"parallel.sequence_parallel={str(self.sp).lower()}",
            f"model.recompute={self.recompute}",
            f"parallel.pipeline_partition={self.partition}",
            f"parallel.pp={self.pp}",
            f"parallel.zero_stage={self.zero}",
            f"parallel.micro_batch_size={self.micro}",
            f"parallel.global_batch_size={GLOBAL_BATCH}",
            f"run.seed={SEED}",
            f"run.train_steps={self.steps}",
        ]


# The ways a run is broken on purpose (layout_worker.py applies them):
CONTROLS = {
    # Pipeline: the all-reduce of the tied embedding's gradient between the first and the last
    # stage is skipped, so each copy keeps only its own stage's part.
    "no_tied_reduce": "tied-embedding gradient all-reduce between stages dropped",
    # Data parallelism: the engine's backward all-reduce over the data-parallel group is
    # switched off (DeepSpeedEngine.enable_backward_allreduce), so each rank keeps its own
    # micro-batches' gradient.
    "no_dp_reduce": "data-parallel gradient all-reduce dropped",
    # Accumulation: the gradient of the first micro-batch of every step is zeroed before the
    # second one's backward adds to it.
    "drop_micro": "first micro-batch's gradient of each step dropped",
    # ZeRO-3: data-parallel rank 1 skips the optimizer update of its weight partition.
    "skip_partition_update": "rank 1's ZeRO-3 partition never updated",
    # Token weighting: each micro-batch's loss is its own mean (no loss_tokens), and the
    # engine averages those means: the old way.
    "mean_of_means": "per-micro-batch mean loss, averaged (no loss_tokens)",
}

RUNS: dict[str, Run] = {
    # one process, the whole global batch in one micro-batch: the references
    "gpt.ref": Run("gpt-learned-tied", 1),
    "bert.ref": Run("bert", 1),
    "t5.ref": Run("t5", 1),
    "tok.ref": Run("bert-tokens", 1),
    "tok.1x8": Run("bert-tokens", 1, micro=1),
    "tok.4x2": Run("bert-tokens", 1, micro=4),
    "tok.1x8.mean_of_means": Run("bert-tokens", 1, micro=1, control="mean_of_means"),
    "tok.4x2.mean_of_means": Run("bert-tokens", 1, micro=4, control="mean_of_means"),
    # two processes
    "bert.pp2": Run("bert", 2, pp=2, micro=4),
    "t5.pp2": Run("t5", 2, pp=2, micro=4, partition="parameters"),
    # Recompute inside pipeline stages: blocks rerun in the backward pass of the 1F1B schedule
    # give the gradients of keeping their activations.
    "gpt.pp2.full": Run("gpt-learned-tied", 2, pp=2, micro=4, recompute="full"),
    "t5.pp2.selective": Run("t5", 2, pp=2, micro=4, recompute="selective", partition="parameters"),
    "gpt.dp2.accum2": Run("gpt-learned-tied", 2, micro=2),
    "gpt.dp2.accum2.no_dp_reduce": Run("gpt-learned-tied", 2, micro=2, control="no_dp_reduce"),
    "gpt.dp2.accum2.drop_micro": Run("gpt-learned-tied", 2, micro=2, control="drop_micro"),
    "tok.dp2x2": Run("bert-tokens", 2, micro=2),
    "tok.dp2x2.mean_of_means": Run("bert-tokens", 2, micro=2, control="mean_of_means"),
    "gpt.dp2.zero2": Run("gpt-learned-tied", 2, zero=2, micro=4),
    "gpt.dp2.zero3": Run("gpt-learned-tied", 2, zero=3, micro=4),
    "gpt.dp2.zero3.skip_partition_update": Run(
        "gpt-learned-tied", 2, zero=3, micro=4, control="skip_partition_update"
    ),
    # four processes
    "gpt.tp2pp2": Run("gpt-learned-tied", 4, tp=2, pp=2, micro=4),
    "gpt.tp2pp2.sp": Run("gpt-learned-tied", 4, tp=2, pp=2, micro=4, sp=True),
    # BERT's stages pass (x, padding): with DeepSpeed's default partitioned activation sends it
    # runs, and under sequence parallelism trains wrong (measured: step-1 loss off by 8e-3,
    # gradients by 100%); engine.deepspeed_config turns those sends off.
    "bert.tp2pp2.sp": Run("bert", 4, tp=2, pp=2, micro=4, sp=True),
    "gpt.pp2dp2": Run("gpt-learned-tied", 4, pp=2, micro=2),
    "gpt.pp2dp2.no_tied_reduce": Run(
        "gpt-learned-tied", 4, pp=2, micro=2, control="no_tied_reduce"
    ),
    "gpt.tp2dp2.zero1": Run("gpt-learned-tied", 4, tp=2, zero=1, micro=4),
}


def runs_for(world: int) -> list[str]:
    """The runs of one launch, pipelines first: ZeRO-3's construction patches torch globally
    while a model is built, so its runs come last."""
    names = [n for n, r in RUNS.items() if r.world == world]
    return sorted(names, key=lambda n: (RUNS[n].zero == 3, RUNS[n].pp == 1))


def reference(name: str) -> str:
    """The one-process run a run is compared with."""
    case = RUNS[name].case
    return {"gpt-learned-tied": "gpt.ref", "bert": "bert.ref", "t5": "t5.ref"}.get(case, "tok.ref")
