"""Switch-style mixture of experts on DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`).

Every `model.moe_every`-th transformer block gets a mixture-of-experts feed-forward instead of
its MLP (`attach_experts`, applied from outside the model families by `build_model`); under
tensor parallelism the experts are replicated over the TP group (pretrain.expert_parallel,
`MoEFeedForward` gathers a sequence-parallel input first). DeepSpeed
does the routing (top-1 Switch or top-2 GShard gating with capacity, token dropping and random
token selection), the all-to-all over the expert-parallel group and the balancing loss. What it
lacks is ours, around its gate (no patch of DeepSpeed):

- `Router`: the gate with the ST-MoE router z-loss, multiplicative jitter with a configurable
  epsilon, a minimum capacity that never exceeds the tokens at hand (DeepSpeed asserts), and the
  routing statistics (tokens each expert kept, tokens dropped, router entropy). DeepSpeed's
  `exp_counts` are counted before capacity dropping; ours are counted after.
- Independent experts: DeepSpeed deep-copies one expert module, so every expert would start
  from the same weights. Each expert (and each router) is re-initialised from its own seed,
  a function of (model seed, layer, global expert index) only, so the weights are the same
  whatever the expert-parallel layout.
- The router losses in the training objective (`add_router_losses`, a forward hook on the model):
  aux_weight * balancing + z_weight * z-loss, summed over MoE layers and token-weighted like
  the main loss (pretrain.steps.add_loss_tokens).
- `moe_statistics`: per-layer metrics for the trainer to log, and `ExpertLoadHistory` for the
  end-of-run expert-load plot.

Shape suffixes as in layers.py: S sequence, B batch, D model width, T tokens (S*B flattened),
E experts, F expert MLP width.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.collectives import gather_sequence_replicated, split_sequence
from pretrain.models.layers import MLP, TensorParallel

# Slots of a layer's running statistics: routes each expert was chosen for (E of them, before
# capacity dropping), routes each kept (E), then these.
_DROPPED, _ENTROPY, _AUX, _Z, _CALLS, _ROUTES = range(6)


def expert_seed(seed: int, layer: int, expert: int) -> int:
    """The init seed of expert `expert` (global index; -1: the router) of MoE layer `layer`: a
    hash, so no two (layer, expert) pairs share a stream and no unit seed of layers.unit_init
    (seed * 100_003 + unit) is reproduced by accident."""
    digest = hashlib.sha256(f"moe:{seed}:{layer}:{expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


class ExpertMLP(nn.Module):
    """One expert: the dense MLP's computation (same activations, gating layout and init
    scales) on plain linear layers. Experts are never tensor-parallel: every TP rank holds the
    same experts and computes them on the same tokens (pretrain.expert_parallel)."""

    def __init__(self, cfg: ModelConfig, n_layers: int):
        super().__init__()
        self.gated = cfg.activation in ("swiglu", "geglu")
        self.act = MLP.ACTIVATIONS[cfg.activation]
        f = cfg.ffn_size
        self.up = nn.Linear(cfg.d_model, 2 * f if self.gated else f, bias=cfg.bias)
        self.down = nn.Linear(f, cfg.d_model, bias=cfg.bias)
        self.init_std = cfg.init_std
        self.down_std = cfg.init_std / math.sqrt(2 * n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up.weight, std=self.init_std)
        nn.init.normal_(self.down.weight, std=self.down_std)
        for lin in (self.up, self.down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            pairs = h.view(*h.shape[:-1], -1, 2)
            h = self.act(pairs[..., 0]) * pairs[..., 1]
        else:
            h = self.act(h)
        return self.down(h)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of
    logsumexp(logits)^2, which keeps router logits small and bf16 routing stable."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def balancing_loss(probs_TE: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
    """Switch's load-balancing loss (Fedus et al. 2021, eq. 4): N * sum_i f_i * P_i, f_i the
    fraction of tokens whose top expert is i, P_i the mean router probability of i. 1.0 at a
    perfectly uniform routing. DeepSpeed's gate computes the same quantity (its l_aux), which is
    what training uses; this is the reference the tests hold it to."""
    n = probs_TE.shape[-1]
    f_E = torch.bincount(expert_T, minlength=n).to(probs_TE.dtype) / expert_T.numel()
    return n * (f_E * probs_TE.mean(0)).sum()


class Router(TopKGate):
    """DeepSpeed's TopKGate with the router z-loss and statistics (see the module docstring).
    Parameter names are DeepSpeed's (`wg.weight`), so its checkpoint layout is unchanged."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(
            cfg.d_model,
            cfg.moe_experts,
            k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            eval_capacity_factor=cfg.moe_eval_capacity_factor,
            min_capacity=cfg.moe_min_capacity,
            noisy_gate_policy=None,
            drop_tokens=cfg.moe_drop_tokens,
            use_rts=cfg.moe_random_token_selection,
            top2_2nd_expert_sampling=True,
        )
        self.jitter = cfg.moe_jitter
        self.n_experts = cfg.moe_experts
        # The router losses of the last forward (with their graph) and the tokens they cover.
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.tokens = 0
        # Running sums over training forwards since the statistics were last read: float64
        # and not a buffer, so a bf16 cast of the model leaves the counts exact.
        self.stats: torch.Tensor | None = None

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        x_TD = input.float()
        if self.training and self.jitter > 0:
            # Switch's multiplicative jitter on the router input, from the default generator
            # (what DeepSpeed's 'Jitter' policy draws from too, with a fixed epsilon of 1e-2).
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = F.linear(x_TD, self.wg.weight.float())
        capacity = self.capacity_factor if self.training else self.eval_capacity_factor
        # DeepSpeed asserts tokens >= min_capacity; a short generation prompt has fewer.
        min_capacity = min(self.min_capacity, logits_TE.shape[0])
        if self.k == 1:
            out = top1gating(
                logits_TE,
                capacity,
                min_capacity,
                used_token,
                None,
                self.drop_tokens,
                # Random selection in training only: evaluation and generation stay
                # deterministic and leave the default generator alone.
                self.use_rts and self.training,
                self.ep_group,
                sparse_routes,
                use_tutel,
            )
        else:
            # top2gating adds its sampling noise to the logits in place: give it a copy.
            out = top2gating(
                logits_TE.clone(),
                capacity,
                min_capacity,
                self.drop_tokens,
                self.ep_group,
                self.top2_2nd_expert_sampling and self.training,
                sparse_routes,
            )
        self.aux_loss, self.z_loss, self.tokens = out[0], router_z_loss(logits_TE), x_TD.shape[0]
        if self.training and sparse_routes:
            self._record(logits_TE.detach(), out[3], out[-1])
        return out

    @torch.no_grad()
    def _record(
        self, logits_TE: torch.Tensor, experts_KT: torch.Tensor, chosen_E: torch.Tensor
    ) -> None:
        """Accumulate this forward's statistics; experts_KT holds each route's expert after
        capacity dropping, -1 where the route was dropped; chosen_E the routes each expert was
        chosen for before dropping (DeepSpeed's exp_counts)."""
        kept = experts_KT[experts_KT >= 0].long()
        p_TE = logits_TE.softmax(-1)
        entropy = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1).mean()
        n = self.n_experts
        if self.stats is None:
            self.stats = torch.zeros(2 * n + 6, dtype=torch.float64, device=logits_TE.device)
        self.stats[:n] += chosen_E.to(self.stats)
        self.stats[n : 2 * n] += torch.bincount(kept, minlength=n).to(self.stats)
        tail = self.stats[2 * n :]
        tail[_DROPPED] += float(experts_KT.numel() - kept.numel())
        tail[_ENTROPY] += entropy
        tail[_AUX] += self.aux_loss.detach().float()
        tail[_Z] += self.z_loss.detach()
        tail[_CALLS] += 1
        tail[_ROUTES] += float(experts_KT.numel())

    def read_statistics(self) -> dict[str, Any] | None:
        """Means since the last read (then reset): per-expert fraction of routes chosen (before
        dropping) and kept, fraction dropped, router entropy (nats), balancing and z-loss; None
        if no training forward ran."""
        if self.stats is None:
            return None
        s = self.stats.tolist()
        n = 2 * self.n_experts
        calls, routes = s[n + _CALLS], s[n + _ROUTES]
        self.stats = None
        return {
            "routed": [c / routes for c in s[: self.n_experts]],
            "load": [c / routes for c in s[self.n_experts : n]],
            "dropped": s[n + _DROPPED] / routes,
            "entropy": s[n + _ENTROPY] / calls,
            "aux_loss": s[n + _AUX] / calls,
            "z_loss": s[n + _Z] / calls,
        }


class MoEFeedForward(nn.Module):
    """The mixture-of-experts replacement of a block's MLP: the residual stream in (layers.py:
    [b, s, d], or [s / tp, b, d] under sequence parallelism) and out; the
    router losses stay on `router` for add_router_losses. Dropped tokens get a zero output here,
    so the block's residual connection passes them through unchanged."""

    def __init__(
        self, cfg: ModelConfig, n_layers: int, ep_size: int = 1, tpc: TensorParallel | None = None
    ):
        super().__init__()
        self.tpc = tpc
        self.moe = MoE(
            cfg.d_model,
            ExpertMLP(cfg, n_layers),
            num_experts=cfg.moe_experts,
            ep_size=ep_size,
            k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            eval_capacity_factor=cfg.moe_eval_capacity_factor,
            min_capacity=cfg.moe_min_capacity,
            drop_tokens=cfg.moe_drop_tokens,
            use_rts=cfg.moe_random_token_selection,
        )
        self.moe.deepspeed_moe.gate = Router(cfg)

    @property
    def router(self) -> Router:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each TP rank holds a shard of the sequence, but the
        # experts are replicated over TP (pretrain.expert_parallel): gather the whole
        # sequence, route and compute it alike on every rank, keep this rank's shard of the
        # output. Routing and capacity then see the tokens TP=1 sees.
        sp = self.tpc is not None and self.tpc.sequence_parallel
        if sp:
            out_SBD, _, _ = self.moe(gather_sequence_replicated(x_TD, self.tpc.group))
            return split_sequence(out_SBD, self.tpc.group)
        # The [b, s, d] stream is routed in [s, b] order too: which tokens a full expert drops
        # and which routing noise a token draws depend on the order, and must not depend on
        # the layout.
        out_SBD, _, _ = self.moe(x_TD.transpose(0, 1))
        return out_SBD.transpose(0, 1)


def is_moe_block(cfg: ModelConfig, index: int) -> bool:
    """Blocks moe_every-1, 2*moe_every-1, ... of a stack (every other block from the second at
    moe_every=2, as in Switch and GShard; every block at 1)."""
    return cfg.moe_experts > 0 and index % cfg.moe_every == cfg.moe_every - 1


def expert_stack(model: nn.Module) -> nn.ModuleList:
    """The blocks whose MLPs may become mixtures of experts: GPT's and BERT's stack, T5's
    encoder (its decoder stays dense, as the issue asks for encoders only)."""
    return model.encoder if model.cfg.family == "t5" else model.blocks


def attach_experts(model: nn.Module, ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """Replace the MLP of every MoE block (is_moe_block) by an MoEFeedForward holding this
    expert-parallel rank's experts (global indices ep_rank * local .. + local - 1), each
    initialised from its own seed (expert_seed); register the router losses."""
    cfg: ModelConfig = model.cfg
    local = cfg.moe_experts // ep_size
    layer = 0
    blocks = expert_stack(model)
    for index, block in enumerate(blocks):
        if not is_moe_block(cfg, index):
            continue
        ffn = MoEFeedForward(cfg, len(blocks), ep_size, model.tpc)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(expert_seed(model.init_seed, layer, -1))
            nn.init.normal_(ffn.router.wg.weight, std=cfg.init_std)
            for j, expert in enumerate(ffn.local_experts):
                torch.manual_seed(expert_seed(model.init_seed, layer, ep_rank * local + j))
                expert.reset_parameters()
        ffn.to(next(block.parameters()).device)
        block.mlp = ffn
        layer += 1
    model.register_forward_hook(add_router_losses, with_kwargs=True)
    return model


def routers(model: nn.Module) -> Iterator[Router]:
    for module in model.modules():
        if isinstance(module, Router):
            yield module


def add_router_losses(model: nn.Module, args: Any, kwargs: dict, output: Any) -> Any:
    """Forward hook: in training, to a scalar loss add moe_aux_loss_weight * balancing +
    moe_z_loss_weight * z-loss, summed over MoE layers. Token weighting: GPT routes the tokens
    it scores, so each layer's losses (means over the tokens it routed) are scaled by routed
    tokens / loss_tokens, the step's mean micro-batch share the trainer passes
    (pretrain.steps): every token of the step then weighs the same in the router losses as in
    the main loss, however the batch was split. BERT and T5 score a fraction of what their
    encoders route (masked positions; decoder targets), and that scale would multiply the
    configured weights by routed / scored tokens (about 6.7 at BERT's 15% masking); their
    encoders route micro_batch_size * seq_len positions in every micro-batch, so a scale of 1
    already weighs every routed position of the step alike."""
    if not model.training or not torch.is_tensor(output) or output.dim() != 0:
        return output
    cfg: ModelConfig = model.cfg
    loss_tokens = kwargs.get("loss_tokens") if cfg.family == "gpt" else None
    for router in routers(model):
        if router.aux_loss is None:
            continue
        scale = 1.0 if loss_tokens is None else router.tokens / loss_tokens.to(output.dtype)
        extra = cfg.moe_aux_loss_weight * router.aux_loss + cfg.moe_z_loss_weight * router.z_loss
        output = output + scale * extra.to(output.dtype)
    return output


def moe_statistics(model: nn.Module) -> dict[str, float]:
    """This rank's routing since the last call, as flat metrics per MoE layer `moe/<l>/...`:
    `routed_<e>` (fraction of routes whose chosen expert is e, before capacity dropping),
    `load_<e>` (fraction of routes expert e kept), `dropped`, `entropy`, `aux_loss`, `z_loss`,
    `max_load_ratio` (busiest expert's routed share over the mean share, 1/experts);
    `moe/aux_loss` and `moe/z_loss`
    are summed over layers. Empty for a dense model or before any training step."""
    out: dict[str, float] = {}
    aux = z = 0.0
    for layer, router in enumerate(routers(model)):
        s = router.read_statistics()
        if s is None:
            continue
        for e, frac in enumerate(s["load"]):
            out[f"moe/{layer}/load_{e}"] = frac
        for e, frac in enumerate(s["routed"]):
            out[f"moe/{layer}/routed_{e}"] = frac
        # Imbalance of the router's choices: what the balancing loss acts on (kept loads are
        # capped by the capacity).
        out[f"moe/{layer}/max_load_ratio"] = max(s["routed"]) * len(s["routed"])
        for key in ("dropped", "entropy", "aux_loss", "z_loss"):
            out[f"moe/{layer}/{key}"] = s[key]
        aux, z = aux + s["aux_loss"], z + s["z_loss"]
    if out:
        out["moe/aux_loss"], out["moe/z_loss"] = aux, z
    return out


def console_summary(stats: dict[str, float]) -> str:
    """One line for the progress log: the worst layer's imbalance and drops, summed losses."""
    ratios = [v for k, v in stats.items() if k.endswith("/max_load_ratio")]
    drops = [v for k, v in stats.items() if k.endswith("/dropped")]
    ent = [v for k, v in stats.items() if k.endswith("/entropy")]
    return (
        f"moe: max load {max(ratios):.2f}x mean | dropped {max(drops):.1%} | "
        f"entropy {sum(ent) / len(ent):.3f} | aux {stats['moe/aux_loss']:.4f} | "
        f"z {stats['moe/z_loss']:.4f}"
    )


class ExpertLoadHistory:
    """Expert loads per layer at each logged step, plotted at the end of a run."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.loads: list[dict[int, list[float]]] = []

    def add(self, step: int, stats: dict[str, float]) -> None:
        layers: dict[int, list[float]] = {}
        for key, value in stats.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[2].startswith("load_"):
                layers.setdefault(int(parts[1]), []).append(value)
        if layers:
            self.steps.append(step)
            self.loads.append(layers)

    def plot(self, path: Path) -> Path | None:
        """A stacked-area chart of each layer's expert loads over training (PNG)."""
        if not self.steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted(self.loads[0])
        fig, axes = plt.subplots(
            len(layers), 1, figsize=(8, 2.2 * len(layers)), sharex=True, squeeze=False
        )
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            series = list(zip(*(entry[layer] for entry in self.loads), strict=True))
            ax.stackplot(self.steps, series, labels=[f"expert {e}" for e in range(len(series))])
            ax.set_ylabel(f"layer {layer}")
            ax.set_ylim(0, 1)
        axes[0, 0].legend(loc="upper right", fontsize="x-small", ncol=4)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("fraction of routed tokens each expert kept")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class MoEHook:
    """A trainer hook (pretrain.trainer): on log steps, the routing statistics go into the
    step's metrics (which TrackingHook sends to MLflow) and a summary line to the console; at
    the end, the expert-load plot is written beside the run and logged as an artifact."""

    def __init__(self, printer=print, plot_path: Path | None = None):
        self.print = printer
        self.plot_path = plot_path
        self.history = ExpertLoadHistory()

    def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        step, run = trainer.state.step, trainer.cfg.run
        if step % run.log_interval and step != run.train_steps:
            return
        stats = moe_statistics(trainer.engine.module)
        if not stats:
            return
        metrics.update(stats)
        self.history.add(step, stats)
        if trainer.layout.is_main:
            self.print(console_summary(stats), flush=True)

    def at_end(self, trainer: Any) -> None:
        if trainer.layout.is_main and self.plot_path is not None:
            if self.history.plot(self.plot_path) is not None:
                trainer.tracker.log_artifact(self.plot_path)


def expert_weights(step_dir: Path, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Every expert's weights of a DeepSpeed checkpoint, named as in the expert-parallel-1
    model. DeepSpeed keeps experts out of the model-states file and writes one file per
    (MoE layer, global expert), `layer_<l>_expert_<e>_mp_rank_<tp>_model_states.pt`, whose keys
    already carry the global expert index, whatever ep the run used. Empty for a dense run."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(step_dir.glob(f"layer_*_expert_*_mp_rank_{tp_rank:02d}_model_states.pt")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
