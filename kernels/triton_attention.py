"""Segment-masked attention in Triton: forward and backward with per-tile classification
(docs/benchmarks.md, "Segment-masked attention kernels").

The mask is a `MaskSpec` (causal plus two hidden-row intervals per key column), never an N x N tensor. A
pre-pass (`key_tile_bounds`, O(N)) reduces every 16 key columns to the min/max of their interval bounds;
the kernels combine those over their key tile and classify each (query tile, key tile) pair once:

* skipped: every element hidden (causal above the diagonal, or one interval covering all the tile's rows in
  every column): no K/V load, no math;
* full: no element hidden: no mask arithmetic;
* partial: the per-element test against the raw intervals.

Forward: online softmax in base 2, the row's log-sum-exp (base 2, of the scaled scores) saved for the
backward. Backward (no atomics, deterministic): delta = rowsum(O * dO); dK/dV with one program per key tile
and KV head, looping over the query heads of its GQA group and their query tiles; dQ in its own pass.
Query head h reads KV head h // (Hq / Hkv); K/V are never expanded. Queries are the last Nq of Nk positions.
A fully masked query row returns zeros and gets zero gradients (as `reference.open_empty_rows`).

Head dims up to 128 (padded inside the kernel to a power of two, with masks); bf16/fp16/fp32 on CUDA.
Under ``TRITON_INTERPRET=1`` (CPU tests) only fp32 is accepted: the interpreter's bf16 `tl.dot` is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from latentkit.errors import ConfigError
from latentkit.masks import MaskSpec

# True when this module's kernels were defined under the interpreter (TRITON_INTERPRET=1 before import).
INTERPRETING: bool = bool(triton.knobs.runtime.interpret)
if INTERPRETING and not isinstance(tl.zeros, InterpretedFunction):
    raise RuntimeError(
        "TRITON_INTERPRET=1 was set after triton was imported (its own helpers are then not "
        "interpreted): set it before the first import of triton or of transformers, which imports triton"
    )
STAT_BLOCK = 16  # key columns per bounds entry; every BLOCK_N is a multiple of it
MAX_HEAD_DIM = 128
_BIG = 1 << 30  # an interval bound beyond every row: marks empty intervals and padding in the bounds
_LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --- autotune configs --------------------------------------------------------------------------------------


def _configs(gpu: list[tuple[int, int, int, int]], interpreter: tuple[int, int]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> autotune configs; one small config when interpreting."""
    blocks = [(*interpreter, 1, 1)] if INTERPRETING else gpu
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


# Interpreter tiles are small, BLOCK_M != BLOCK_N, and the forward/dQ BLOCK_N spans two bounds entries.
FWD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)], interpreter=(16, 32)
)
DKDV_CONFIGS = _configs(
    [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)], interpreter=(32, 16)
)
DQ_CONFIGS = _configs(
    [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)], interpreter=(16, 32)
)
DELTA_BLOCK_M = 16 if INTERPRETING else 128
# Lengths are bucketed to powers of two for autotuning: varying batch lengths must not re-tune every step.
AUTOTUNE_KEY = ["LEN_BUCKET", "HEAD_DIM_PAD", "CAUSAL", "PRECISION"]

# --- the O(N) pre-pass, and a torch reference of the tile classification ----------------------------------

SKIPPED, FULL, PARTIAL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class TileMask:
    """A MaskSpec ready for the kernels: raw intervals (per-element test) and per-16-column bounds."""

    causal: bool
    intervals: torch.Tensor  # int32 [B, Nk, 4], contiguous
    bounds: torch.Tensor  # int32 [B, cdiv(Nk, STAT_BLOCK), 8], see key_tile_bounds

    @property
    def batch_size(self) -> int:
        return self.intervals.shape[0]

    @property
    def num_keys(self) -> int:
        return self.intervals.shape[1]


def key_tile_bounds(intervals: torch.Tensor, block: int = STAT_BLOCK) -> torch.Tensor:
    """int32 [B, cdiv(Nk, block), 8]: per key tile, for interval 1 then 2, (min s, max s, min e, max e).

    The pre-pass of spec "Representation" (FlashMask's per-tile min/max of the column bounds).

    An empty interval (s >= e) counts as s = +BIG, e = -BIG: it can neither hide a whole tile nor reach one.
    Columns past Nk (the last tile's padding) count as +BIG in the min fields and -BIG in the max fields.
    """
    batch, num_keys, _ = intervals.shape
    starts, ends = intervals[..., 0::2], intervals[..., 1::2]  # [B, Nk, 2]: interval 1, interval 2
    empty = starts >= ends
    num_tiles = triton.cdiv(num_keys, block)

    def reduce(values: torch.Tensor, empty_value: int, fill: int, largest: bool) -> torch.Tensor:
        padded = values.new_full((batch, num_tiles * block, 2), fill)
        padded[:, :num_keys] = torch.where(empty, empty_value, values)
        tiles = padded.view(batch, num_tiles, block, 2)
        return tiles.amax(dim=2) if largest else tiles.amin(dim=2)

    bounds = torch.stack(
        [
            reduce(starts, _BIG, _BIG, largest=False),
            reduce(starts, _BIG, -_BIG, largest=True),
            reduce(ends, -_BIG, _BIG, largest=False),
            reduce(ends, -_BIG, -_BIG, largest=True),
        ],
        dim=-1,
    )  # [B, T, 2, 4]
    return bounds.reshape(batch, num_tiles, 8).to(torch.int32).contiguous()


def prepare_tile_mask(spec: MaskSpec, device: torch.device | str) -> TileMask:
    """The O(Nk) pre-pass, once per forward; every layer and the backward reuse it."""
    intervals = spec.intervals.to(device=device, dtype=torch.int32).contiguous()
    return TileMask(spec.causal, intervals, key_tile_bounds(intervals))


def tile_kinds(mask: TileMask, num_queries: int, block_m: int, block_n: int) -> torch.Tensor:
    """int8 [B, cdiv(Nq, block_m), cdiv(Nk, block_n)] of SKIPPED/FULL/PARTIAL: the kernels' rule, in torch.

    For tests and for reporting the skipped fraction; the kernels classify on the fly from `mask.bounds`.
    """
    if block_n % STAT_BLOCK:
        raise ValueError(f"block_n must be a multiple of {STAT_BLOCK}, got {block_n}")
    num_keys, per_tile = mask.num_keys, block_n // STAT_BLOCK
    bounds = mask.bounds.view(mask.batch_size, -1, 2, 4)
    num_col_tiles = triton.cdiv(num_keys, block_n)
    padded = bounds.new_empty(mask.batch_size, num_col_tiles * per_tile, 2, 4)
    padded[..., 0::2], padded[..., 1::2] = _BIG, -_BIG
    padded[:, : bounds.shape[1]] = bounds
    grouped = padded.view(mask.batch_size, num_col_tiles, per_tile, 2, 4)
    lo_s, hi_s = grouped[..., 0].amin(2), grouped[..., 1].amax(2)  # [B, Tk, 2]
    lo_e, hi_e = grouped[..., 2].amin(2), grouped[..., 3].amax(2)

    device = mask.intervals.device
    row_start = torch.arange(0, num_queries, block_m, device=device)
    row_first = (num_keys - num_queries + row_start).view(1, -1, 1, 1)
    row_last = (num_keys - num_queries + (row_start + block_m).clamp(max=num_queries) - 1).view(1, -1, 1, 1)
    col_first = torch.arange(0, num_keys, block_n, device=device).view(1, 1, -1)
    col_last = col_first + block_n - 1

    def per_interval(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)  # [B, 1, Tk, 2]

    covers = (per_interval(hi_s) <= row_first) & (per_interval(lo_e) > row_last)
    misses = (per_interval(lo_s) > row_last) | (per_interval(hi_e) <= row_first)
    skipped = covers.any(-1)
    full = misses.all(-1) & (col_last < num_keys)
    if mask.causal:
        skipped = skipped | (col_first > row_last[..., 0])
        full = full & (col_last <= row_first[..., 0])
    kinds = torch.full(skipped.shape, PARTIAL, dtype=torch.int8, device=device)
    kinds[full] = FULL
    kinds[skipped] = SKIPPED
    return kinds


# --- Triton kernels ---------------------------------------------------------------------------------------
# Compact kernel signatures and calls, as in flash-attention's Triton files.
# fmt: off


@triton.jit
def _tile_kind(bounds_base, col_start, row_first, row_last, N_K,
               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr):
    """SKIPPED (0) / FULL (1) / PARTIAL (2) of key tile [col_start, +BLOCK_N) x rows [row_first, row_last]."""
    sub = tl.arange(0, BLOCK_N // STAT_BLOCK)
    ptrs = bounds_base + (col_start // STAT_BLOCK + sub) * 8
    in_range = col_start + sub * STAT_BLOCK < N_K
    lo_s1 = tl.min(tl.load(ptrs + 0, mask=in_range, other=1 << 30), 0)
    hi_s1 = tl.max(tl.load(ptrs + 1, mask=in_range, other=-(1 << 30)), 0)
    lo_e1 = tl.min(tl.load(ptrs + 2, mask=in_range, other=1 << 30), 0)
    hi_e1 = tl.max(tl.load(ptrs + 3, mask=in_range, other=-(1 << 30)), 0)
    lo_s2 = tl.min(tl.load(ptrs + 4, mask=in_range, other=1 << 30), 0)
    hi_s2 = tl.max(tl.load(ptrs + 5, mask=in_range, other=-(1 << 30)), 0)
    lo_e2 = tl.min(tl.load(ptrs + 6, mask=in_range, other=1 << 30), 0)
    hi_e2 = tl.max(tl.load(ptrs + 7, mask=in_range, other=-(1 << 30)), 0)
    # spec "Representation": skipped if one interval hides every row of the tile in every column
    skipped = ((hi_s1 <= row_first) & (lo_e1 > row_last)) | ((hi_s2 <= row_first) & (lo_e2 > row_last))
    # full if no column's intervals reach the tile's rows (and no column lies past N_K)
    full = ((lo_s1 > row_last) | (hi_e1 <= row_first)) & ((lo_s2 > row_last) | (hi_e2 <= row_first))
    full = full & (col_start + BLOCK_N <= N_K)
    if CAUSAL:
        skipped = skipped | (col_start > row_last)
        full = full & (col_start + BLOCK_N - 1 <= row_first)
    return tl.where(skipped, 0, tl.where(full, 1, 2))


@triton.jit
def _hidden(intervals_base, rows, cols, N_K, CAUSAL: tl.constexpr):
    """bool [rows, cols]: the per-element rule of a partial tile (columns past N_K are hidden)."""
    in_range = cols < N_K
    s1 = tl.load(intervals_base + cols * 4 + 0, mask=in_range, other=0)
    e1 = tl.load(intervals_base + cols * 4 + 1, mask=in_range, other=0)
    s2 = tl.load(intervals_base + cols * 4 + 2, mask=in_range, other=0)
    e2 = tl.load(intervals_base + cols * 4 + 3, mask=in_range, other=0)
    r = rows[:, None]
    hidden = ((r >= s1[None, :]) & (r < e1[None, :])) | ((r >= s2[None, :]) & (r < e2[None, :]))
    hidden = hidden | (cols[None, :] >= N_K)
    if CAUSAL:
        hidden = hidden | (cols[None, :] > r)
    return hidden


@triton.jit
def _load_rows(base, stride_n, rows, offs_d, N, HEAD_DIM):
    """[rows, HEAD_DIM_PAD] tile; rows >= N and the padded head dims read as zero."""
    mask = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, stride_n, rows, offs_d, N, HEAD_DIM, value):
    mask = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride_n + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, intervals_base, rows, col_start,
              partial, offs_n, offs_d, N_K, HEAD_DIM, qk_scale,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2); m_i is -inf while a row has seen no visible key."""
    cols = col_start + offs_n
    k = _load_rows(k_base, stride_kn, cols, offs_d, N_K, HEAD_DIM)
    v = _load_rows(v_base, stride_vn, cols, offs_d, N_K, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if partial:  # full tiles skip the mask
        s = tl.where(_hidden(intervals_base, rows, cols, N_K, CAUSAL), float("-inf"), s)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf = NaN on all-hidden rows
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, INTERVALS, BOUNDS,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H_Q, H_KV, N_Q, N_K, LEN_BUCKET, HEAD_DIM, qk_scale,
              CAUSAL: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // H_Q).to(tl.int64)
    h = (tl.program_id(1) % H_Q).to(tl.int64)
    kv_h = h // (H_Q // H_KV)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    intervals_base = INTERVALS + b * N_K * 4
    bounds_base = BOUNDS + b * ((N_K + STAT_BLOCK - 1) // STAT_BLOCK) * 8

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    first_row = N_K - N_Q  # absolute position of query 0
    rows = first_row + offs_m
    row_first = first_row + start_m
    row_last = first_row + tl.minimum(start_m + BLOCK_M, N_Q) - 1
    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_qn, offs_m, offs_d, N_Q, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    end = N_K
    if CAUSAL:
        end = tl.minimum(N_K, row_last + 1)
    for col_start in range(0, end, BLOCK_N):
        kind = _tile_kind(bounds_base, col_start, row_first, row_last, N_K, CAUSAL, BLOCK_N, STAT_BLOCK)
        if kind != 0:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, intervals_base,
                                      rows, col_start, kind == 2, offs_n, offs_d, N_K, HEAD_DIM, qk_scale,
                                      CAUSAL, PRECISION)

    # A fully masked row: output 0; LSE +inf keeps the backward's P = exp2(s - lse) at 0 on that row.
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    _store_rows(OUT + b * stride_ob + h * stride_oh, stride_on, offs_m, offs_d, N_Q, HEAD_DIM,
                acc / l_safe[:, None])
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + (b * H_Q + h) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_delta(OUT, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                    H_Q, N_Q, HEAD_DIM, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO) (fp32), the softmax backward's row term."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) // H_Q).to(tl.int64)
    h = (tl.program_id(1) % H_Q).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_rows(OUT + b * stride_ob + h * stride_oh, stride_on, offs_m, offs_d, N_Q, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, stride_don, offs_m, offs_d, N_Q, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H_Q + h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _probabilities(q, k, lse, intervals_base, rows, cols, partial, N_K, qk_scale,
                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """P [rows, cols] recomputed from the saved base-2 LSE (0 on hidden elements and fully masked rows)."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
    if partial:  # full tiles skip the mask
        p = tl.where(_hidden(intervals_base, rows, cols, N_K, CAUSAL), 0.0, p)
    return p


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base, delta_base, intervals_base,
               start_m, cols, partial, offs_m, offs_d, N_Q, N_K, HEAD_DIM, qk_scale,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    rows_local = start_m + offs_m
    q = _load_rows(q_base, stride_qn, rows_local, offs_d, N_Q, HEAD_DIM)
    do = _load_rows(do_base, stride_don, rows_local, offs_d, N_Q, HEAD_DIM)
    lse = tl.load(lse_base + rows_local, mask=rows_local < N_Q, other=float("inf"))
    delta = tl.load(delta_base + rows_local, mask=rows_local < N_Q, other=0.0)
    rows = N_K - N_Q + rows_local
    p = _probabilities(q, k, lse, intervals_base, rows, cols, partial, N_K, qk_scale, CAUSAL, PRECISION)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, INTERVALS, BOUNDS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H_Q, H_KV, N_Q, N_K, LEN_BUCKET, HEAD_DIM, scale, qk_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr):
    """One key tile of one KV head: dK, dV summed over its query heads and query tiles, no atomics."""
    col_start = tl.program_id(0) * BLOCK_N
    b = (tl.program_id(1) // H_KV).to(tl.int64)
    kv_h = (tl.program_id(1) % H_KV).to(tl.int64)
    group = H_Q // H_KV
    intervals_base = INTERVALS + b * N_K * 4
    bounds_base = BOUNDS + b * ((N_K + STAT_BLOCK - 1) // STAT_BLOCK) * 8

    offs_m = tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_rows(K + b * stride_kb + kv_h * stride_kh, stride_kn, cols, offs_d, N_K, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + kv_h * stride_vh, stride_vn, cols, offs_d, N_K, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    first_row = N_K - N_Q
    start = 0
    if CAUSAL:  # the first query tile holding a row >= col_start
        start = (tl.maximum(col_start - first_row, 0) // BLOCK_M) * BLOCK_M
    for g in range(group):
        h = kv_h * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H_Q + h) * N_Q
        delta_base = DELTA + (b * H_Q + h) * N_Q
        for start_m in range(start, N_Q, BLOCK_M):
            row_first = first_row + start_m
            row_last = first_row + tl.minimum(start_m + BLOCK_M, N_Q) - 1
            kind = _tile_kind(bounds_base, col_start, row_first, row_last, N_K, CAUSAL, BLOCK_N, STAT_BLOCK)
            if kind != 0:
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base,
                                    delta_base, intervals_base, start_m, cols, kind == 2, offs_m, offs_d, N_Q,
                                    N_K, HEAD_DIM, qk_scale, CAUSAL, PRECISION)

    _store_rows(DK + b * stride_dkb + kv_h * stride_dkh, stride_dkn, cols, offs_d, N_K, HEAD_DIM, dk * scale)
    _store_rows(DV + b * stride_dvb + kv_h * stride_dvh, stride_dvn, cols, offs_d, N_K, HEAD_DIM, dv)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, intervals_base, rows, col_start,
             partial, offs_n, offs_d, N_K, HEAD_DIM, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    cols = col_start + offs_n
    k = _load_rows(k_base, stride_kn, cols, offs_d, N_K, HEAD_DIM)
    v = _load_rows(v_base, stride_vn, cols, offs_d, N_K, HEAD_DIM)
    p = _probabilities(q, k, lse, intervals_base, rows, cols, partial, N_K, qk_scale, CAUSAL, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.autotune(configs=DQ_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, INTERVALS, BOUNDS,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 H_Q, H_KV, N_Q, N_K, LEN_BUCKET, HEAD_DIM, scale, qk_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // H_Q).to(tl.int64)
    h = (tl.program_id(1) % H_Q).to(tl.int64)
    kv_h = h // (H_Q // H_KV)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    intervals_base = INTERVALS + b * N_K * 4
    bounds_base = BOUNDS + b * ((N_K + STAT_BLOCK - 1) // STAT_BLOCK) * 8

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    first_row = N_K - N_Q
    rows = first_row + offs_m
    row_first = first_row + start_m
    row_last = first_row + tl.minimum(start_m + BLOCK_M, N_Q) - 1
    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_qn, offs_m, offs_d, N_Q, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, stride_don, offs_m, offs_d, N_Q, HEAD_DIM)
    lse = tl.load(LSE + (b * H_Q + h) * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
    delta = tl.load(DELTA + (b * H_Q + h) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    end = N_K
    if CAUSAL:
        end = tl.minimum(N_K, row_last + 1)
    for col_start in range(0, end, BLOCK_N):
        kind = _tile_kind(bounds_base, col_start, row_first, row_last, N_K, CAUSAL, BLOCK_N, STAT_BLOCK)
        if kind != 0:
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, intervals_base, rows,
                          col_start, kind == 2, offs_n, offs_d, N_K, HEAD_DIM, qk_scale, CAUSAL, PRECISION)

    _store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqn, offs_m, offs_d, N_Q, HEAD_DIM, dq * scale)


# fmt: on

# --- launchers -------------------------------------------------------------------------------------------


def check_device(device: torch.device) -> None:
    """The triton backend runs on CUDA, or on CPU under the interpreter (kernel tests)."""
    if INTERPRETING and device.type != "cpu":
        raise ConfigError(
            f"the triton backend was loaded under TRITON_INTERPRET=1, which runs on CPU tensors, "
            f"got device {device}"
        )
    if not INTERPRETING and device.type != "cuda":
        raise ConfigError(
            f"the triton backend needs a CUDA device, got {device}: use attn_backend 'sdpa' "
            "(kernel tests run it on CPU with TRITON_INTERPRET=1 set before import)"
        )


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask) -> None:
    """One-line errors for every shape, dtype and device the kernels do not take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    batch, heads, num_queries, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must be [{batch}, Hkv, Nk, {head_dim}] like q {list(q.shape)}, "
            f"got k {list(k.shape)}, v {list(v.shape)}"
        )
    if heads % k.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if mask.batch_size != batch or mask.num_keys != k.shape[2] or num_queries > k.shape[2]:
        raise ValueError(
            f"mask [B={mask.batch_size}, Nk={mask.num_keys}] does not fit q {list(q.shape)} and "
            f"k {list(k.shape)} (queries are the last Nq <= Nk positions)"
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {head_dim}: use 'sdpa'"
        )
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype of float16, bfloat16, float32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if INTERPRETING and q.dtype != torch.float32:
        raise ValueError(
            f"under TRITON_INTERPRET=1 the triton backend takes float32 only (the interpreter's "
            f"low-precision tl.dot is wrong), got {q.dtype}"
        )
    check_device(q.device)
    if not q.device == k.device == v.device == mask.intervals.device:
        raise ValueError(
            f"q, k, v and the mask must be on one device, got {q.device}, {k.device}, "
            f"{v.device}, {mask.intervals.device}"
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _shared_args(q: torch.Tensor, k: torch.Tensor, mask: TileMask) -> dict[str, object]:
    head_dim = q.shape[3]
    return {
        "H_Q": q.shape[1],
        "H_KV": k.shape[1],
        "N_Q": q.shape[2],
        "N_K": k.shape[2],
        "LEN_BUCKET": triton.next_power_of_2(k.shape[2]),
        "HEAD_DIM": head_dim,
        "CAUSAL": mask.causal,
        "HEAD_DIM_PAD": max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        "STAT_BLOCK": STAT_BLOCK,
    }


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: TileMask,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Writes out [B,Hq,Nq,D] (q's dtype) and lse fp32 [B,Hq,Nq] contiguous (base 2, +inf on empty rows)."""
    if out.numel() == 0:
        return
    batch, heads, num_queries, _ = q.shape

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads

    # fmt: off
    _attn_fwd[grid](
        q, k, v, out, lse, mask.intervals, mask.bounds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        qk_scale=scale * _LOG2E, **_shared_args(q, k, mask),
    )
    # fmt: on


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    mask: TileMask,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Writes dq, dk, dv (the inputs' shapes and dtype); deterministic: every element has one writer."""
    batch, heads, num_queries, head_dim = q.shape
    if q.numel() == 0:
        dk.zero_()
        dv.zero_()
        return
    shared = _shared_args(q, k, mask)
    delta = torch.empty_like(lse)
    # fmt: off
    _attn_bwd_delta[(triton.cdiv(num_queries, DELTA_BLOCK_M), batch * heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, num_queries, head_dim,
        HEAD_DIM_PAD=shared["HEAD_DIM_PAD"], BLOCK_M=DELTA_BLOCK_M,
    )
    # fmt: on
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(k.shape[2], meta["BLOCK_N"]), batch * k.shape[1]

    def dq_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads

    # fmt: off
    _attn_bwd_dkdv[dkdv_grid](
        q, k, v, grad_out, lse, delta, dk, dv, mask.intervals, mask.bounds,
        *common, *dk.stride()[:3], *dv.stride()[:3], scale=scale, qk_scale=scale * _LOG2E, **shared,
    )
    _attn_bwd_dq[dq_grid](
        q, k, v, grad_out, lse, delta, dq, mask.intervals, mask.bounds,
        *common, *dq.stride()[:3], scale=scale, qk_scale=scale * _LOG2E, **shared,
    )
    # fmt: on


# --- autograd ---------------------------------------------------------------------------------------------


class TritonMaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask, scale: float):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        attention_forward(q, k, v, mask, scale, out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_backward(q, k, v, out, lse, _last_dim_contiguous(grad_out), ctx.mask, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None


# --- functional API ---------------------------------------------------------------------------------------


def triton_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec | TileMask, scale: float | None = None
) -> torch.Tensor:
    """q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] -> [B,Hq,Nq,D] under `mask`; differentiable in q, k, v."""
    tiles = mask if isinstance(mask, TileMask) else prepare_tile_mask(mask, q.device)
    check_inputs(q, k, v, tiles)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    return TritonMaskedAttention.apply(q, k, v, tiles, scale)
