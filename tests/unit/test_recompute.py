"""The model-parallel generator (pretrain.models.rng) and activation recomputation on one
process (TP=1, where attention dropout already draws from the model-parallel generator).

Multi-rank behaviour (masks across TP ranks, sequence parallelism, resume at TP=2) is in
tests/distributed/test_model_parallel_rng.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.gpt import GPT
from pretrain.models.layers import AttentionMask, Block, TensorParallel, run_block, run_blocks
from pretrain.models.rng import (
    ModelParallelRNG,
    model_parallel_seed,
    model_rng,
    seed_model_rng,
)

# Dropout high enough that a mask difference moves every gradient well above the tolerance.
CFG = ModelConfig(n_layers=4, d_model=32, n_heads=4, seq_len=16, vocab_size=96, dropout=0.3)
GRAD_RTOL = 1e-6
POLICIES = [("full", 1), ("full", 2), ("selective", 1), ("selective", 2)]


def tokens(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=gen)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# --- the generator --------------------------------------------------------------------------


def test_fork_draws_its_own_stream_and_leaves_the_default_one_alone():
    rng = ModelParallelRNG(7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with rng.fork("cpu"):
        a = torch.rand(100)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream did not move
    with rng.fork("cpu"):
        b = torch.rand(100)
    assert not torch.equal(a, b)  # the forked stream advanced between the two blocks
    # Its draws are those of a generator seeded with 7, not of the default seed 0.
    want = torch.rand(200, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([a, b]), want)


def test_state_dict_round_trip_replays_the_draws():
    rng = ModelParallelRNG(3)
    with rng.fork("cpu"):
        torch.rand(10)
    state = rng.state_dict()
    with rng.fork("cpu"):
        first = torch.rand(10)
    other = ModelParallelRNG(99)
    other.load_state_dict(state)
    with other.fork("cpu"):
        again = torch.rand(10)
    assert torch.equal(first, again)
    # Control: without the loaded state the fresh generator draws something else.
    with ModelParallelRNG(99).fork("cpu"):
        assert not torch.equal(torch.rand(10), first)


@pytest.mark.gpu
def test_fork_on_cuda_swaps_the_device_generator():
    rng = ModelParallelRNG(11)
    torch.cuda.manual_seed(0)
    before = torch.cuda.get_rng_state()
    with rng.fork("cuda"):
        a = torch.rand(100, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    want = torch.rand(100, device="cuda", generator=torch.Generator("cuda").manual_seed(11))
    assert torch.equal(a, want)


def test_seeds_are_distinct_per_seed_and_rank():
    grid = list(itertools.product(range(3), range(4), range(4), range(4)))
    seeds = {model_parallel_seed(*key) for key in grid}
    assert len(seeds) == len(grid)
    assert all(0 <= s < 2**63 for s in seeds)
    # A plain sum such as seed + 100 * pp + tp, which this replaces, collides on this grid
    # once the strides are small; the hash must not depend on such strides.
    assert model_parallel_seed(0, 1, 0, 0) != model_parallel_seed(0, 0, 1, 0)


def test_every_layer_shares_the_model_generator(world1):
    torch.manual_seed(0)
    model = GPT(CFG, world1)
    rng = model_rng(model)
    assert rng is model.tpc.rng
    holders = [m for m in model.modules() if hasattr(m, "tpc")]
    assert len(holders) > CFG.n_layers  # the model, blocks, attention, MLP, dropouts
    assert all(m.tpc.rng is rng for m in holders)
    assert seed_model_rng(model, 1, 0, 0, 0) is rng
    assert rng.initial_seed == model_parallel_seed(1, 0, 0, 0)
    with pytest.raises(LookupError, match="tpc"):
        model_rng(nn.Linear(2, 2))


def test_attention_dropout_draws_from_the_model_parallel_generator(world1):
    """The attention probabilities' mask follows the model-parallel generator: reseeding it
    alone changes the loss, reseeding only the default generator does not."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, n_layers=1), world1)
    # Residual dropout off: the default generator then feeds no dropout at all.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0

    def loss(default_seed: int, mp_seed: int) -> float:
        torch.manual_seed(default_seed)
        model_rng(model).seed(mp_seed)
        return model(tokens(1), tokens(2)).item()

    assert loss(0, 5) == loss(1, 5)
    assert loss(0, 5) != loss(0, 6)


# --- recomputation --------------------------------------------------------------------------


def grads_of(model: nn.Module, default_seed: int = 10, mp_seed: int = 20):
    """Loss and gradients of one forward/backward with both generators at fixed states."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(default_seed)
    model_rng(model).seed(mp_seed)
    loss = model(tokens(1), tokens(2))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(world1):
    torch.manual_seed(0)
    model = GPT(CFG, world1)
    return model, grads_of(model)


@pytest.mark.parametrize("policy,interval", POLICIES)
def test_recompute_gives_the_gradients_of_no_recompute(world1, reference, policy, interval):
    plain, (loss, grads) = reference
    cfg = dataclasses.replace(CFG, recompute=policy, recompute_interval=interval)
    model = GPT(cfg, world1)
    model.load_state_dict(plain.state_dict())
    got_loss, got = grads_of(model)
    assert got_loss == loss
    bad = {n: rel(got[n], g) for n, g in grads.items() if not rel(got[n], g) <= GRAD_RTOL}
    assert not bad, bad


def test_other_dropout_masks_change_the_gradients(world1, reference):
    """Control for the test above: a different draw of the model-parallel generator alone moves
    the gradients far beyond its tolerance, so equal gradients mean equal masks."""
    plain, (_, grads) = reference
    _, other = grads_of(plain, mp_seed=21)
    assert max(rel(other[n], g) for n, g in grads.items()) > 1e3 * GRAD_RTOL


def block_and_input(world1, seed: int = 0):
    tpc = TensorParallel.build(world1)
    torch.manual_seed(seed)
    block = Block(dataclasses.replace(CFG, recompute="full"), tpc, n_layers=CFG.n_layers)
    x = torch.randn(CFG.seq_len, 2, CFG.d_model, generator=torch.Generator().manual_seed(1))
    return block, x.requires_grad_()


def block_grads(block: Block, x: torch.Tensor, apply) -> list[torch.Tensor]:
    block.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(10)
    block.tpc.rng.seed(20)
    apply(block, x).square().sum().backward()
    return [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]


def test_recompute_must_rewind_the_model_parallel_generator(world1):
    """run_block's full recompute matches no recompute; torch's checkpoint alone (which
    restores only the default generator) redraws other attention masks, and differs: the
    negative control showing the rewinding is what makes recompute exact."""
    block, x = block_and_input(world1)
    mask = AttentionMask(causal=True)
    want = block_grads(block, x, lambda b, h: b(h, mask))
    got = block_grads(block, x, lambda b, h: run_block(b, 0, h, mask))
    naive = block_grads(
        block,
        x,
        lambda b, h: torch.utils.checkpoint.checkpoint(b, h, mask, use_reentrant=False),
    )
    assert max(rel(g, w) for g, w in zip(got, want, strict=True)) <= GRAD_RTOL
    assert max(rel(g, w) for g, w in zip(naive, want, strict=True)) > 1e3 * GRAD_RTOL


def test_selective_recompute_must_rewind_the_model_parallel_generator(world1):
    """The same for the attention core alone, checkpointed as Attention.forward does."""
    block, _ = block_and_input(world1)
    attn = block.attn
    gen = torch.Generator().manual_seed(2)
    qkv = [torch.randn(2, 4, CFG.seq_len, 8, generator=gen).requires_grad_() for _ in range(3)]
    mask = AttentionMask(causal=True)

    def grads(core) -> list[torch.Tensor]:
        for t in qkv:
            t.grad = None
        attn.tpc.rng.seed(20)
        core(*qkv, mask).square().sum().backward()
        return [t.grad.clone() for t in qkv]

    def checkpointed(**kw):
        return lambda *a: torch.utils.checkpoint.checkpoint(
            attn.attend, *a, use_reentrant=False, **kw
        )

    want = grads(attn.attend)
    got = grads(checkpointed(context_fn=attn.tpc.rng.checkpoint_context))
    naive = grads(checkpointed())
    assert max(rel(g, w) for g, w in zip(got, want, strict=True)) <= GRAD_RTOL
    assert max(rel(g, w) for g, w in zip(naive, want, strict=True)) > 1e3 * GRAD_RTOL


def saved_bytes_per_block(world1, policy: str, interval: int) -> list[int]:
    """Bytes autograd keeps for the backward pass, per block of a stack of CFG.n_layers blocks
    (what recomputation exists to reduce)."""
    cfg = dataclasses.replace(CFG, recompute=policy, recompute_interval=interval)
    tpc = TensorParallel.build(world1)
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(cfg, tpc, n_layers=cfg.n_layers) for _ in range(cfg.n_layers))
    current = [0]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
    saved = [0] * cfg.n_layers

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[current[0]] += t.numel() * t.element_size()
        return t

    x = torch.randn(CFG.seq_len, 2, CFG.d_model, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_blocks(blocks, x, AttentionMask(causal=True))
    return saved


@pytest.mark.parametrize("policy,interval", POLICIES)
def test_recompute_interval_picks_blocks_0_n_2n(world1, policy, interval):
    """The documented rule: blocks whose index % recompute_interval == 0 keep less for the
    backward pass; the others keep at least what they keep without recompute."""
    none = saved_bytes_per_block(world1, "none", 1)
    got = saved_bytes_per_block(world1, policy, interval)
    for i in range(CFG.n_layers):
        if i % interval == 0:
            assert got[i] < none[i], (i, got, none)
        else:
            assert got[i] >= none[i], (i, got, none)


def test_full_keeps_less_than_selective_which_keeps_less_than_none(world1):
    none = saved_bytes_per_block(world1, "none", 1)[0]
    selective = saved_bytes_per_block(world1, "selective", 1)[0]
    full = saved_bytes_per_block(world1, "full", 1)[0]
    assert full < selective < none


def test_no_recompute_under_no_grad(world1):
    """Evaluation runs under no_grad: nothing to recompute, and the output is the plain one."""
    block, x = block_and_input(world1)
    block.eval()
    mask = AttentionMask(causal=True)
    with torch.no_grad():
        assert torch.equal(run_block(block, 0, x, mask), block(x, mask))
