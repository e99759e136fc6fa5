"""Attention kernels and masks, chosen in one place (`attend`) by device and pattern.

A mask is kept as its structure (causal, key padding, document ids, global positions; a layer
adds its window), not as a [b, 1, s, s] tensor, so each kernel builds only what it needs:

- no structure: SDPA with `is_causal` or no mask at all, so the fused kernels (FlashAttention
  on GPU, the flash CPU kernel) run with O(s) memory;
- key padding alone: SDPA with a broadcast [b, 1, 1, k] bias;
- T5's relative position bias: SDPA with the dense bias it is made of (T5 only);
- documents, windows and global positions: on GPU FlexAttention with a block mask (compiled;
  blocks that are fully masked are skipped); elsewhere, or with attention dropout (which
  FlexAttention lacks), a window alone takes `banded_attention` (blocks of W queries against
  their own and the neighbouring blocks' keys, one SDPA call) and everything else
  `chunked_attention`: exact attention one block of queries at a time against only the keys
  that block can see, so memory grows as s * (window + chunk) for windows and as
  s * (longest document + chunk) for documents, never as s^2.

Visibility of key k to query q, all conditions combined with AND:
  causal: k <= q;  key padding: key k is real;  documents: doc[q] == doc[k];
  window W (a layer's): causal q - k < W (the W most recent tokens, itself included), else
  |q - k| < W; global positions (Longformer) are exempt from the window in both directions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig

# Queries per block of the chunked kernel when no window sets it: large enough to keep the
# matmuls efficient, small enough that one block's scores stay small next to the activations.
CHUNK = 256


@dataclass
class AttentionMask:
    """What attention needs beyond q, k and v, computed once per forward and shared by all
    layers of a stack. `bias` is a dense additive bias (T5's relative positions with padding and
    causality folded in); otherwise the fields describe the pattern and no [q, k] tensor
    exists."""

    causal: bool = False
    bias: torch.Tensor | None = None
    key_padding_BK: torch.Tensor | None = None
    doc_ids_BS: torch.Tensor | None = None
    global_positions: tuple[int, ...] = ()
    # FlexAttention block masks built for this forward, by window: the layers of a stack share
    # them instead of rebuilding one per layer.
    block_masks: dict = field(default_factory=dict, compare=False, repr=False)


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
    key_padding_BK: torch.Tensor | None = None,
    doc_ids_BS: torch.Tensor | None = None,
    position_bias_1HQK: torch.Tensor | None = None,
    global_positions: tuple[int, ...] | list[int] = (),
) -> AttentionMask:
    """The mask of a stack. A padding mask without padding is dropped (BERT's batches carry one
    always), so unpadded batches keep the fused kernels.

    Only T5's position bias is dense by nature; it gets padding and causality folded in, with
    masked scores at the dtype's lowest finite value rather than -inf: a row with every key
    masked (an all-padding sequence) then averages its values instead of turning into NaN.
    """
    if key_padding_BK is not None:
        key_padding_BK = key_padding_BK.bool()
        if bool(key_padding_BK.all()):
            key_padding_BK = None
    if position_bias_1HQK is None:
        return AttentionMask(
            causal=causal,
            key_padding_BK=key_padding_BK,
            doc_ids_BS=doc_ids_BS,
            global_positions=tuple(global_positions),
        )
    if doc_ids_BS is not None or global_positions:
        raise ValueError("a dense position bias does not combine with documents or globals")
    pattern = AttentionMask(causal=causal, key_padding_BK=key_padding_BK)
    keep = keep_mask(pattern, q_len, k_len, device=device)
    bias = position_bias_1HQK.to(dtype)
    if keep is not None:
        bias = bias.masked_fill(~keep.unsqueeze(1), torch.finfo(dtype).min)
    return AttentionMask(bias=bias)


def layer_window(cfg: ModelConfig, index: int) -> int | None:
    """The window of block number `index` (0-based) under the config's attention pattern."""
    if cfg.attention == "full":
        return None
    if cfg.window_layers is not None and index not in cfg.window_layers:
        return None
    return cfg.attention_window


def set_windows(blocks, cfg: ModelConfig, first: int = 0) -> None:
    """Give each block of a stack (block i being model block first + i) its layer's window."""
    for i, block in enumerate(blocks):
        block.attn.window = layer_window(cfg, first + i)


def stack_globals(cfg: ModelConfig) -> tuple[int, ...]:
    """The positions with global attention (Longformer) of a stack."""
    return tuple(cfg.global_positions) if cfg.attention == "longformer" else ()


# --- visibility ----------------------------------------------------------------------------------


def keep_mask(
    mask: AttentionMask,
    q_len: int,
    k_len: int,
    window: int | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Which keys each query sees, [b|1, q, k] booleans (None: all of them), for the queries
    and keys at positions `q_pos` and `k_pos` (default: 0..q_len-1 and 0..k_len-1)."""
    device = device if device is not None else _mask_device(mask)
    if q_pos is None:
        q_pos = torch.arange(q_len, device=device)
    if k_pos is None:
        k_pos = torch.arange(k_len, device=device)
    keep = None

    def both(a: torch.Tensor) -> torch.Tensor:
        return a if keep is None else keep & a

    rel_QK = q_pos[:, None] - k_pos[None, :]
    if window is not None:
        near = (rel_QK >= 0) & (rel_QK < window) if mask.causal else rel_QK.abs() < window
        if mask.global_positions:
            glob = torch.tensor(mask.global_positions, device=device)
            near = near | torch.isin(q_pos, glob)[:, None] | torch.isin(k_pos, glob)[None, :]
        keep = near[None]
    if mask.causal:
        keep = both((rel_QK >= 0)[None])
    if mask.key_padding_BK is not None:
        keep = both(mask.key_padding_BK[:, k_pos][:, None, :])
    if mask.doc_ids_BS is not None:
        docs = mask.doc_ids_BS
        keep = both(docs[:, q_pos][:, :, None] == docs[:, k_pos][:, None, :])
    return keep


def _mask_device(mask: AttentionMask) -> torch.device | None:
    for t in (mask.key_padding_BK, mask.doc_ids_BS, mask.bias):
        if t is not None:
            return t.device
    return None


def as_bias(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[b|1, q, k] booleans -> additive bias [b|1, 1, q, k] (lowest finite value where masked,
    so a row with nothing visible averages its values instead of turning into NaN)."""
    if keep is None:
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min).unsqueeze(1)


def is_structured(mask: AttentionMask, window: int | None) -> bool:
    """Whether the pattern needs a per-(q, k) mask: documents, a window or global positions."""
    return mask.doc_ids_BS is not None or window is not None or bool(mask.global_positions)


# --- the kernels ---------------------------------------------------------------------------------


def attend(
    q_BHQE: torch.Tensor,
    k_BGKE: torch.Tensor,
    v_BGKE: torch.Tensor,
    mask: AttentionMask,
    *,
    window: int | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with dropout on the probabilities, by the cheapest exact
    kernel for the pattern and device. Grouped keys and values (G < H) are shared by H / G
    query heads each."""
    gqa = q_BHQE.shape[1] != k_BGKE.shape[1]
    kw = dict(dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if mask.bias is not None:
        return F.scaled_dot_product_attention(q_BHQE, k_BGKE, v_BGKE, attn_mask=mask.bias, **kw)
    if not is_structured(mask, window):
        padding = mask.key_padding_BK
        if padding is None:
            return F.scaled_dot_product_attention(
                q_BHQE, k_BGKE, v_BGKE, is_causal=mask.causal, **kw
            )
        keep = keep_mask(mask, q_BHQE.shape[2], k_BGKE.shape[2], device=q_BHQE.device)
        if not mask.causal:  # padding alone broadcasts over the queries: [b, 1, 1, k]
            keep = keep[:, :1]
        bias = as_bias(keep, q_BHQE.dtype)
        return F.scaled_dot_product_attention(q_BHQE, k_BGKE, v_BGKE, attn_mask=bias, **kw)
    if q_BHQE.is_cuda and dropout == 0.0:
        return flex_attend(q_BHQE, k_BGKE, v_BGKE, mask, window=window, scale=scale)
    plain = mask.key_padding_BK is None and mask.doc_ids_BS is None and not mask.global_positions
    if plain and window is not None and q_BHQE.shape[2] == k_BGKE.shape[2]:
        return banded_attention(
            q_BHQE, k_BGKE, v_BGKE, window, causal=mask.causal, dropout=dropout, scale=scale
        )
    return chunked_attention(
        q_BHQE, k_BGKE, v_BGKE, mask, window=window, dropout=dropout, scale=scale
    )


def _key_range(
    mask: AttentionMask, a: int, b: int, s: int, window: int | None, doc_span
) -> tuple[int, int]:
    """The keys [lo, hi) that queries a..b-1 can see outside the global positions."""
    lo, hi = 0, (b if mask.causal else s)
    if window is not None:
        lo = max(lo, a - window + 1)
        if not mask.causal:
            hi = min(hi, b + window - 1)
    if doc_span is not None:
        starts, ends = doc_span
        lo = max(lo, int(starts[:, a].min()))
        hi = min(hi, int(ends[:, b - 1].max()))
    return lo, hi


def _doc_span(doc_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the first position of its document and one past the last, [b, s]
    each (documents are contiguous runs of equal ids)."""
    s = doc_ids_BS.shape[1]
    pos = torch.arange(s, device=doc_ids_BS.device).expand_as(doc_ids_BS)
    new = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    new[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    starts = torch.where(new, pos, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    ends = torch.where(last, pos + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return starts, ends


def chunked_attention(
    q_BHQE: torch.Tensor,
    k_BGKE: torch.Tensor,
    v_BGKE: torch.Tensor,
    mask: AttentionMask,
    *,
    window: int | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Exact attention for self-attention patterns, one block of queries at a time.

    Each block of `chunk` queries (default: the window, at most CHUNK) attends through SDPA to
    the contiguous keys it can see (its own and the previous window's for a causal window; back
    to its earliest document's start with documents) plus the global positions, under a mask of
    that block alone. Global queries see every key and are computed as rows of their own.
    Autograd keeps one block's probabilities per block: s * (keys per block) in all.
    """
    s = q_BHQE.shape[2]
    if k_BGKE.shape[2] != s:
        raise ValueError("the chunked kernel is for self-attention (as many keys as queries)")
    c = chunk or (min(window, CHUNK) if window is not None else CHUNK)
    gqa = q_BHQE.shape[1] != k_BGKE.shape[1]
    kw = dict(dropout_p=dropout, scale=scale, enable_gqa=gqa)
    device = q_BHQE.device
    span = _doc_span(mask.doc_ids_BS) if mask.doc_ids_BS is not None else None
    # Global positions beyond this (shorter) sequence do not exist in it.
    globs = sorted({p for p in mask.global_positions if p < s})
    glob = torch.tensor(globs, dtype=torch.long, device=device)
    # Without padding or documents a block's mask depends only on where its keys and globals
    # lie relative to it, so the blocks inside the sequence share one.
    shift_invariant = mask.key_padding_BK is None and mask.doc_ids_BS is None
    biases: dict[tuple, torch.Tensor | None] = {}
    blocks = []  # (k_pos, bias) per block of queries
    for a in range(0, s, c):
        b = min(a + c, s)
        lo, hi = _key_range(mask, a, b, s, window, span)
        outside = [p for p in globs if p < lo or p >= hi]
        k_pos = torch.arange(lo, hi, device=device)
        if outside:
            k_pos = torch.cat([torch.tensor(outside, dtype=torch.long, device=device), k_pos])
        key = (b - a, lo - a, hi - a, len(outside), *(p - a for p in globs if lo <= p < hi))
        if not shift_invariant or key not in biases:
            q_pos = torch.arange(a, b, device=device)
            keep = keep_mask(mask, s, s, window, q_pos, k_pos, device)
            biases[key] = as_bias(keep, q_BHQE.dtype)
        blocks.append((k_pos, biases[key]))
    # One gather of every block's keys and one split of the queries: slicing per block would
    # make the backward pass allocate and sum a full-length gradient per block.
    index = torch.cat([k_pos for k_pos, _ in blocks])
    sizes = [k_pos.numel() for k_pos, _ in blocks]
    ks = k_BGKE.index_select(2, index).split(sizes, dim=2)
    vs = v_BGKE.index_select(2, index).split(sizes, dim=2)
    outs = [
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kw)
        for q, k, v, (_, bias) in zip(q_BHQE.split(c, dim=2), ks, vs, blocks, strict=True)
    ]
    o_BHQE = torch.cat(outs, dim=2)
    if glob.numel():
        all_pos = torch.arange(s, device=device)
        bias = as_bias(keep_mask(mask, s, s, window, glob, all_pos, device), q_BHQE.dtype)
        rows = F.scaled_dot_product_attention(
            q_BHQE[:, :, glob], k_BGKE, v_BGKE, attn_mask=bias, **kw
        )
        o_BHQE = o_BHQE.index_copy(2, glob, rows)
    return o_BHQE


def banded_attention(
    q_BHQE: torch.Tensor,
    k_BGKE: torch.Tensor,
    v_BGKE: torch.Tensor,
    window: int,
    *,
    causal: bool,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact windowed self-attention in one SDPA call: the sequence is cut into blocks of
    `window` queries, each attending to its own block and the previous one (and the next,
    bidirectionally), which hold every key its window reaches. The blocks become the batch,
    so the scores take s x 2W (3W) entries instead of s x s; one [n, W, 2W] mask serves all."""
    b, h, s, e = q_BHQE.shape
    g, c = k_BGKE.shape[1], window
    n = -(-s // c)
    span = 2 * c if causal else 3 * c
    pad = n * c - s
    q_BNHCE = F.pad(q_BHQE, (0, 0, 0, pad)).view(b, h, n, c, e).transpose(1, 2)
    # Keys with one block of zeros before (and after): block i's keys start at (i - 1) * c.
    after = pad + (0 if causal else c)
    k_ext, v_ext = (F.pad(t, (0, 0, c, after)) for t in (k_BGKE, v_BGKE))
    # unfold: [b, g, n, e, span] windows over the sequence, one per block.
    k_BNGKE, v_BNGKE = (t.unfold(2, span, c).permute(0, 2, 1, 4, 3) for t in (k_ext, v_ext))
    device = q_BHQE.device
    q_pos = torch.arange(n * c, device=device).view(n, c)
    k_pos = (torch.arange(n, device=device) * c - c)[:, None] + torch.arange(span, device=device)
    rel = q_pos[:, :, None] - k_pos[:, None, :]
    near = (rel >= 0) & (rel < window) if causal else rel.abs() < window
    keep_NQK = near & (k_pos >= 0)[:, None, :] & (k_pos < s)[:, None, :]
    bias = torch.zeros(keep_NQK.shape, dtype=q_BHQE.dtype, device=device)
    bias = bias.masked_fill(~keep_NQK, torch.finfo(q_BHQE.dtype).min)
    o = F.scaled_dot_product_attention(
        q_BNHCE.reshape(b * n, h, c, e),
        k_BNGKE.reshape(b * n, g, span, e),
        v_BNGKE.reshape(b * n, g, span, e),
        attn_mask=bias[:, None].expand(b, n, 1, c, span).reshape(b * n, 1, c, span),
        dropout_p=dropout,
        scale=scale,
        enable_gqa=g != h,
    )
    return o.view(b, n, h, c, e).transpose(1, 2).reshape(b, h, n * c, e)[:, :, :s]


def flex_block_mask(mask: AttentionMask, b: int, s: int, window: int | None, device):
    """FlexAttention's block mask for the pattern (built once per forward and window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (window, b, s, str(device))
    if key in mask.block_masks:
        return mask.block_masks[key]
    causal, padding, docs = mask.causal, mask.key_padding_BK, mask.doc_ids_BS
    is_global = torch.zeros(s, dtype=torch.bool, device=device)
    for p in mask.global_positions:
        if p < s:
            is_global[p] = True

    def mask_mod(bi, h, q, k):
        keep = q >= 0  # all true, of the index's shape
        if window is not None:
            near = (q - k < window) & (q - k >= 0) if causal else (q - k).abs() < window
            keep = near | is_global[q] | is_global[k]
        if causal:
            keep = keep & (k <= q)
        if padding is not None:
            keep = keep & padding[bi, k]
        if docs is not None:
            keep = keep & (docs[bi, q] == docs[bi, k])
        return keep

    batch = b if (padding is not None or docs is not None) else None
    block = create_block_mask(mask_mod, batch, None, s, s, device=device)
    mask.block_masks[key] = block
    return block


@functools.cache
def _compiled_flex():
    # One compiled kernel per process (torch.compile caches its graphs per shape inside it).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attend(
    q_BHQE: torch.Tensor,
    k_BGKE: torch.Tensor,
    v_BGKE: torch.Tensor,
    mask: AttentionMask,
    *,
    window: int | None = None,
    scale: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention with the pattern's block mask: the GPU kernel (compiled; eager on CPU runs
    the forward only, which the tests use to check the mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, _, s, _ = q_BHQE.shape
    block = flex_block_mask(mask, b, s, window, q_BHQE.device)
    kernel = _compiled_flex() if compiled else flex_attention
    gqa = q_BHQE.shape[1] != k_BGKE.shape[1]
    return kernel(q_BHQE, k_BGKE, v_BGKE, block_mask=block, scale=scale, enable_gqa=gqa)


# --- KV cache for generation ---------------------------------------------------------------------


@dataclass
class KVCache:
    """One attention layer's keys and values for generation, [b, g, k, e] after the rotary
    positions, with the number of tokens seen so far (`offset`: the next token's position).
    Cross-attention fills it once from the encoder output. A windowed layer keeps only the keys
    its next query can still see, so its cache holds at most `window` tokens."""

    k_BGKE: torch.Tensor | None = None
    v_BGKE: torch.Tensor | None = None
    offset: int = 0

    def attend(
        self,
        q_BHQE: torch.Tensor,
        k_BGKE: torch.Tensor,
        v_BGKE: torch.Tensor,
        mask: AttentionMask,
        *,
        cross: bool,
        window: int | None,
        scale: float | None,
    ) -> torch.Tensor:
        """Attention of the new queries to the cached and the new keys. The first call (the
        prompt) attends under the stack's mask; each later call takes one token, which sees
        every cached key (the mask then carries only T5's position bias, if any)."""
        q_len = q_BHQE.shape[2]
        if cross:
            self.k_BGKE, self.v_BGKE = k_BGKE, v_BGKE
            return attend(q_BHQE, k_BGKE, v_BGKE, mask, scale=scale)
        if self.k_BGKE is None:
            o_BHQE = attend(q_BHQE, k_BGKE, v_BGKE, mask, window=window, scale=scale)
        else:
            if q_len != 1:
                raise ValueError(f"a filled KV cache takes one token per step, got {q_len}")
            k_BGKE = torch.cat([self.k_BGKE, k_BGKE], dim=2)
            v_BGKE = torch.cat([self.v_BGKE, v_BGKE], dim=2)
            o_BHQE = attend(q_BHQE, k_BGKE, v_BGKE, mask, scale=scale)
        # The next query sees itself and the window - 1 keys before it: older ones go.
        start = 0 if window is None else max(0, k_BGKE.shape[2] - (window - 1))
        self.k_BGKE, self.v_BGKE = k_BGKE[:, :, start:], v_BGKE[:, :, start:]
        self.offset += q_len
        return o_BHQE


@dataclass
class BlockCache:
    """A block's caches: its self-attention and (T5's decoder) its cross-attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)
