"""Frame-causal video attention in Triton: training forward + backward, and a split-KV rollout kernel.

    o = frame_attention(q, k, v, frame_len=64)                       # q, k, v: [B, H, T*frame_len, D]
    o = frame_attention(q, k, v, frame_len=64, window=4, sinks=1)    # last 4 frames + 1 always-visible frame
    o = frame_attention_rollout(q_new, k_cache, v_cache, frame_len=64, q_frame_offset=4)

Mask: a query in frame t = i // frame_len sees the keys of frames 0..t (bidirectional inside a frame); with a
window W only frames t-W+1..t, plus the first S "sink" frames. Per query tile the visible keys are 1-2 contiguous
intervals computed from frame indices: no mask tensor is ever built. Tiles that every query of the tile sees
completely run without any element mask; only tiles that straddle a frame boundary (or the window's edge, or the
end of the sequence) are masked, and tiles above the frame diagonal are never loaded.

Forward: FlashAttention-2 style online softmax in base 2, fp32 accumulators, stores the per-row log-sum-exp
(O(L) extra memory). Backward: delta = rowsum(O * dO); one kernel per KV tile accumulates dK, dV over the query
tiles that see it; one kernel per query tile recomputes P and accumulates dQ: no atomics, deterministic.
Rollout: a chunk of new queries (the frames being generated) against a cache of context + itself; the key range is
split across programs (flash-decoding) and the partial results merged by their log-sum-exp, so that few query
tiles still fill the GPU.

Constraints: D in {16, 32, 64, 128}; fp16 / bf16 / fp32 inputs (bf16 dots are wrong in the CPU interpreter: test
fp32 / fp16 there). Any frame_len and any L (a partial last frame is fine).
Dispatch: CUDA -> Triton; CPU -> the PyTorch reference, unless TRITON_INTERPRET=1 (tests).
Benchmark: `python -m kernels.frame_attention` (needs CUDA; prints "GPU required" otherwise).
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _visible(q_pos, k_pos, L, FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, Q_OFF):
    """Element mask of a (BLOCK_M, BLOCK_N) tile: key frame <= query frame, inside the window or a sink."""
    qf = q_pos[:, None] // FRAME + Q_OFF
    kf = k_pos[None, :] // FRAME
    vis = (kf <= qf) & (k_pos[None, :] < L)
    if WINDOW > 0:
        vis = vis & ((kf > qf - WINDOW) | (kf < SINKS))
    return vis


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, lo, hi, q_pos, L, qk_scale, offs_n, offs_d,
               FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, Q_OFF,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + offs_n
        kmask = k_pos < L
        k = tl.load(K + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        # -- scores, in base 2 --
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            qk = tl.where(_visible(q_pos, k_pos, L, FRAME, WINDOW, SINKS, Q_OFF), qk, -float("inf"))
        # -- update m_i, l_i, acc (online softmax) --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no visible key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _kv_intervals(m0, L, FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, Q_OFF,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Tile-aligned key intervals of the query tile starting at m0: [sink_hi), masked, full, masked."""
    fq_lo = m0 // FRAME + Q_OFF
    fq_hi = (tl.minimum(m0 + BLOCK_M, L) - 1) // FRAME + Q_OFF
    kv_hi = tl.minimum((fq_hi + 1) * FRAME, L)  # keys past the last query frame are never loaded
    full_hi = tl.minimum((fq_lo + 1) * FRAME, L)  # keys every query of the tile sees
    if WINDOW > 0:
        kv_lo = tl.maximum(fq_lo - WINDOW + 1, 0) * FRAME
        full_lo = tl.maximum(fq_hi - WINDOW + 1, 0) * FRAME
    else:
        kv_lo = 0
        full_lo = 0
    kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, kv_lo)
    full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
    full_lo = tl.minimum(full_lo, full_hi)
    # sinks: frames < SINKS before the window, visited (masked) only where the window does not cover them
    sink_hi = kv_lo * 0
    if WINDOW > 0:
        sink_hi = tl.minimum(SINKS * FRAME, kv_lo)
    return sink_hi, kv_lo, full_lo, full_hi, kv_hi


@triton.jit
def _frame_attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_ob, stride_on,
    L, Lk, sm_scale, Q_OFF, KV_SPLIT,
    FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < L
    q = tl.load(Q + bh * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qmask[:, None], other=0.0)
    K += bh * stride_kb
    V += bh * stride_kb
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if SPLIT:
        # -- rollout: this program's slice of the key range, every tile masked by frame (few tiles, short loop) --
        lo = split * KV_SPLIT
        hi = tl.minimum(lo + KV_SPLIT, Lk)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, lo, hi, offs_m, Lk, qk_scale, offs_n, offs_d,
                                   FRAME, WINDOW, SINKS, Q_OFF, True, BLOCK_N)
    else:
        sink_hi, kv_lo, full_lo, full_hi, kv_hi = _kv_intervals(m0, L, FRAME, WINDOW, SINKS, 0, BLOCK_M, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, 0, sink_hi, offs_m, L, qk_scale, offs_n, offs_d,
                                   FRAME, WINDOW, SINKS, 0, True, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, kv_lo, full_lo, offs_m, L, qk_scale, offs_n,
                                   offs_d, FRAME, WINDOW, SINKS, 0, True, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, full_lo, full_hi, offs_m, L, qk_scale, offs_n,
                                   offs_d, FRAME, WINDOW, SINKS, 0, False, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, full_hi, kv_hi, offs_m, L, qk_scale, offs_n,
                                   offs_d, FRAME, WINDOW, SINKS, 0, True, BLOCK_N)
    # -- epilogue: normalise, store O and the log-sum-exp (base 2) --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, -float("inf"), m_i + tl.math.log2(l_safe))
    out_rows = split * L + offs_m  # split-KV partials are stacked along rows
    tl.store(LSE + bh * (L * tl.num_programs(2)) + out_rows, lse, mask=qmask)
    tl.store(O + bh * stride_ob + out_rows[:, None] * stride_on + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=qmask[:, None])


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_preprocess(O, DO, DELTA, L, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m < L
    o = tl.load(O + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
    do = tl.load(DO + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask)


@triton.jit
def _frame_attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, L, sm_scale,
    FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * L * HEAD_DIM
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n < L
    k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    # queries that see this key tile: frames >= its first frame; with a window, up to its last frame + W - 1
    fk_lo = n0 // FRAME
    fk_hi = (tl.minimum(n0 + BLOCK_N, L) - 1) // FRAME
    q_lo = (fk_lo * FRAME // BLOCK_M) * BLOCK_M
    q_hi = L + fk_lo * 0
    if WINDOW > 0:  # a sink key tile is seen by every later query
        q_hi = tl.where(fk_lo >= SINKS, tl.minimum((fk_hi + WINDOW) * FRAME, L), q_hi)
    for start in range(q_lo, q_hi, BLOCK_M):
        q_pos = start + offs_m
        qmask = q_pos < L
        q = tl.load(Q + base + q_pos[:, None] * HEAD_DIM + offs_d[None, :], mask=qmask[:, None], other=0.0)
        do = tl.load(DO + base + q_pos[:, None] * HEAD_DIM + offs_d[None, :], mask=qmask[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + q_pos, mask=qmask, other=0.0)
        delta = tl.load(DELTA + bh * L + q_pos, mask=qmask, other=0.0)
        # -- recompute P^T for this (key tile, query tile) pair --
        qkT = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
        vis = tl.trans(_visible(q_pos, offs_n, L, FRAME, WINDOW, SINKS, 0)) & qmask[None, :]
        pT = tl.where(vis, tl.math.exp2(qkT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        # -- dS = P * (dP - delta) --
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    dk *= sm_scale
    tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, lo, hi, offs_m, offs_n, offs_d, L, qk_scale,
              FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + offs_n
        kmask = k_pos < L
        k = tl.load(K + k_pos[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + k_pos[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
        # -- recompute P from the stored log-sum-exp; dS = P * (dP - delta) --
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(_visible(offs_m, k_pos, L, FRAME, WINDOW, SINKS, 0), tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _frame_attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, L, sm_scale,
    FRAME: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * L * HEAD_DIM
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < L
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=qmask[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=qmask[:, None], other=0.0)
    lse = tl.load(LSE + bh * L + offs_m, mask=qmask, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=qmask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    sink_hi, kv_lo, full_lo, full_hi, kv_hi = _kv_intervals(m0, L, FRAME, WINDOW, SINKS, 0, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K + base, V + base, 0, sink_hi, offs_m, offs_n, offs_d, L, qk_scale,
                   FRAME, WINDOW, SINKS, HEAD_DIM, BLOCK_N)  # the sink interval
    dq = _dq_tiles(dq, q, do, lse, delta, K + base, V + base, kv_lo, kv_hi, offs_m, offs_n, offs_d, L, qk_scale,
                   FRAME, WINDOW, SINKS, HEAD_DIM, BLOCK_N)  # the main interval
    dq *= sm_scale
    tl.store(DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask[:, None])


# ----------------------------------------------------------------------------------------------------------
# launchers and autograd

BLOCK_M, BLOCK_N = 64, 64  # interpreter-friendly; on H100 see the benchmark table in the README


def _check(q, k, v, frame_len):
    assert q.ndim == 4 and q.shape == k.shape == v.shape, "q, k, v must be [B, H, L, D] of one shape"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert q.shape[-1] in (16, 32, 64, 128), "head_dim must be 16, 32, 64 or 128"
    assert frame_len >= 1


def _fwd(q, k, v, frame_len, window, sinks, sm_scale):
    B, H, L, D = q.shape
    q, k, v = (x.contiguous().view(B * H, L, D) for x in (q, k, v))
    o = torch.empty_like(q)
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(L, BLOCK_M), B * H, 1)
    _frame_attn_fwd[grid](
        q, k, v, o, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1),
        L, L, sm_scale, 0, 0, FRAME=frame_len, WINDOW=window, SINKS=sinks, HEAD_DIM=D,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT=False,
    )  # fmt: skip
    return o, lse


class _FrameAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, frame_len, window, sinks, sm_scale):
        B, H, L, D = q.shape
        o, lse = _fwd(q, k, v, frame_len, window, sinks, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (frame_len, window, sinks, sm_scale)
        return o.view(B, H, L, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        frame_len, window, sinks, sm_scale = ctx.args
        B, H, L, D = q.shape
        q, k, v = (x.contiguous().view(B * H, L, D) for x in (q, k, v))
        do = do.contiguous().view(B * H, L, D)
        delta = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
        _bwd_preprocess[(triton.cdiv(L, BLOCK_M), B * H)](o, do, delta, L, HEAD_DIM=D, BLOCK_M=BLOCK_M)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = dict(FRAME=frame_len, WINDOW=window, SINKS=sinks, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        _frame_attn_bwd_dkdv[(triton.cdiv(L, BLOCK_N), B * H)](q, k, v, do, lse, delta, dk, dv, L, sm_scale, **meta)
        _frame_attn_bwd_dq[(triton.cdiv(L, BLOCK_M), B * H)](q, k, v, do, lse, delta, dq, L, sm_scale, **meta)
        shape = (B, H, L, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None


def frame_attention(q, k, v, frame_len: int, causal: bool = True, window: int = 0, sinks: int = 0, sm_scale=None):
    """Frame-causal attention. q, k, v: [B, H, L, D]; a query of frame t sees keys of frames 0..t (see docstring).

    causal=False is plain bidirectional attention (SDPA). window W > 0: only the last W frames (plus `sinks`).
    """
    _check(q, k, v, frame_len)
    sm_scale = sm_scale or 1.0 / math.sqrt(q.shape[-1])
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    if not use_triton(q):
        return frame_attention_ref(q, k, v, frame_len, causal, window, sinks, sm_scale)
    return _FrameAttention.apply(q, k, v, frame_len, window, sinks, sm_scale)


def frame_attention_rollout(q, k, v, frame_len: int, q_frame_offset: int, num_splits: int = 1, sm_scale=None):
    """New queries (frames q_frame_offset, ...) against a key/value cache [B, H, Lk, D] that ends with themselves.

    Split-KV (flash-decoding): the key range is cut into `num_splits` slices (0: enough to give ~132 programs),
    each program writes a partial output and log-sum-exp, merged here. Forward only (sampling needs no grads).
    Default 1, measured on an H200 (bf16, eager): one new frame of 256 tokens vs 16 cached (B1 H16 D64) 0.072 ms
    with 1 split, 0.209 ms with the automatic 3, SDPA with a dense mask 0.081; the world model's 8 new frames vs 12
    (B64 H4 D32) 0.069 / 0.168 (2 splits) / SDPA 0.129. The merge's small ops cost more than the parallelism gains
    at these sizes (under CUDA-graph replay 3 splits take 0.049 ms: worth it only when launches are hidden).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape == v.shape and k.shape[:2] == (B, H) and k.shape[3] == D
    sm_scale = sm_scale or 1.0 / math.sqrt(D)
    if not use_triton(q):
        return frame_attention_rollout_ref(q, k, v, frame_len, q_frame_offset, sm_scale)
    q_tiles = triton.cdiv(Lq, BLOCK_M)
    if num_splits <= 0:
        num_splits = max(1, min(triton.cdiv(Lk, BLOCK_N), triton.cdiv(132, q_tiles * B * H)))
    kv_split = triton.cdiv(triton.cdiv(Lk, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(Lk, kv_split)
    qf, kf, vf = (x.contiguous().view(B * H, -1, D) for x in (q, k, v))
    # one split is already normalised: written in q's dtype, no merge (whose ~7 small ops dominate small rollouts)
    o = torch.empty(B * H, num_splits * Lq, D, device=q.device, dtype=q.dtype if num_splits == 1 else torch.float32)
    lse = torch.empty(B * H, num_splits * Lq, device=q.device, dtype=torch.float32)
    _frame_attn_fwd[(q_tiles, B * H, num_splits)](
        qf, kf, vf, o, lse, qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), o.stride(0), o.stride(1),
        Lq, Lk, sm_scale, q_frame_offset, kv_split, FRAME=frame_len, WINDOW=0, SINKS=0, HEAD_DIM=D,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT=True,
    )  # fmt: skip
    if num_splits == 1:
        return o.view(B, H, Lq, D)
    # -- merge the splits by their log-sum-exp (base 2) --
    o = o.view(B * H, num_splits, Lq, D)
    lse = lse.view(B * H, num_splits, Lq)
    w = torch.exp2(lse - lse.amax(1, keepdim=True)).nan_to_num(0.0)  # an empty split (-inf) weighs 0
    out = (o * w[..., None]).sum(1) / w.sum(1)[..., None]
    return out.view(B, H, Lq, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# PyTorch references: the test oracle and the CPU fallback


def frame_mask(Lq: int, Lk: int, frame_len: int, q_frame_offset: int = 0, window: int = 0, sinks: int = 0, device=None):
    """Boolean [Lq, Lk] mask, True where a query may attend to a key."""
    qf = torch.arange(Lq, device=device) // frame_len + q_frame_offset
    kf = torch.arange(Lk, device=device) // frame_len
    vis = kf[None, :] <= qf[:, None]
    if window > 0:
        vis &= (kf[None, :] > qf[:, None] - window) | (kf[None, :] < sinks)
    return vis


def frame_attention_ref(q, k, v, frame_len: int, causal: bool = True, window: int = 0, sinks: int = 0, sm_scale=None):
    L = q.shape[2]
    mask = frame_mask(L, L, frame_len, 0, window, sinks, q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)


def frame_attention_rollout_ref(q, k, v, frame_len: int, q_frame_offset: int, sm_scale=None):
    mask = frame_mask(q.shape[2], k.shape[2], frame_len, q_frame_offset, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)


# ----------------------------------------------------------------------------------------------------------
# benchmark (H100 shapes from ../shared/notes/kernels.md §8)

SHAPES = {  # name: (B, H, D, T, N, window)
    "S1": (8, 16, 64, 16, 256, 0),
    "S2": (2, 16, 128, 16, 1024, 0),
    "S3": (1, 12, 128, 21, 1560, 0),
    "S4": (2, 16, 64, 64, 256, 8),
}


def visible_pairs(T, N, window=0):
    if window <= 0:
        return N * N * T * (T + 1) // 2
    return N * N * sum(min(t + 1, window) for t in range(T))


def bench():
    import csv
    import subprocess

    if not torch.cuda.is_available():
        print("GPU required: the Triton kernels run on CUDA (tests use TRITON_INTERPRET=1 on CPU)")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    dev = torch.cuda.get_device_name()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {dev} | torch {torch.__version__} | triton {triton.__version__} | git {sha}")
    # the benchmark calls backward on one graph many times (retain_graph): compiled backwards must not donate buffers
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    flex = torch.compile(flex_attention)
    rows, ours = [], {}
    print(f"{'shape':6s} {'mode':8s} {'provider':18s} {'ms p50':>8s} {'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} "
          f"{'x ours':>7s} {'MiB':>7s}", flush=True)

    def add(r):  # print each row as it is measured: a lease that ends mid-benchmark still leaves numbers
        rows.append(r)
        ours.setdefault((r[0], r[1]), r[3])  # "ours" is measured first for every shape and mode
        print(f"{r[0]:6s} {r[1]:8s} {r[2]:18s} {r[3]:8.3f} {r[4]:8.3f} {r[5]:8.3f} {r[6]:8.1f} "
              f"{r[3] / ours[(r[0], r[1])]:7.2f} {r[7]:7.0f}", flush=True)

    for name, (B, H, D, T, N, W) in SHAPES.items():
        L = T * N
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        ends = (torch.arange(L, device="cuda") // N + 1) * N
        starts = (torch.arange(L, device="cuda") // N - W + 1).clamp(min=0) * N if W else torch.zeros_like(ends)
        bm = create_block_mask(lambda b, h, qi, ki: ((ki < ends[qi]) & (ki >= starts[qi])) | (qi == ki), None, None, L, L)
        dense = frame_mask(L, L, N, 0, W, 0, "cuda") if L <= 16384 else None
        flops = 4 * B * H * D * visible_pairs(T, N, W)
        provs = {
            "ours": lambda: frame_attention(q, k, v, N, window=W),
            "flex": lambda: flex(q, k, v, block_mask=bm),
        }
        if not W:
            provs["sdpa-flash-causal"] = lambda: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, sdpa_kernel, causal=True)
        if dense is not None:
            provs["sdpa-dense-mask"] = lambda: _sdpa(q, k, v, SDPBackend.EFFICIENT_ATTENTION, sdpa_kernel, mask=dense)
        ref = frame_attention_ref(q.float(), k.float(), v.float(), N, window=W)
        err = ((frame_attention(q, k, v, N, window=W).float() - ref).norm() / ref.norm()).item()
        print(f"# {name}: bf16 ours vs fp32 reference, relative error {err:.2e}", flush=True)
        for mode in ["fwd", "bwd"]:
            for prov, fn in provs.items():
                if mode == "fwd":
                    f = fn
                else:
                    out = fn()
                    g = torch.randn_like(out)
                    f = lambda out=out, g=g: out.backward(g, retain_graph=True)  # noqa: E731
                torch.cuda.reset_peak_memory_stats()
                med, lo, hi = do_bench(f, quantiles=[0.5, 0.2, 0.8], grad_to_none=[q, k, v])
                fl = flops * (2.5 if mode == "bwd" else 1.0)
                add([name, mode, prov, med, lo, hi, fl / med / 1e9, torch.cuda.max_memory_allocated() / 2**20, err])
    # rollout: 8 new frames of N tokens against a cache of 4 + 8 frames (the world model's shape), and R1-like
    for name, (B, H, D, Tc, N) in {"R1": (1, 16, 64, 16, 256), "R-wm": (64, 4, 32, 12, 64)}.items():
        Lk, Lq = Tc * N, 8 * N if name == "R-wm" else N
        q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, H, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        off = Tc - Lq // N
        mask = frame_mask(Lq, Lk, N, off, device="cuda")
        flops = 4 * B * H * D * int(mask.sum())
        for prov, fn in {
            "ours": lambda: frame_attention_rollout(q, k, v, N, off),
            "sdpa-dense-mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        }.items():
            med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            add([name, "rollout", prov, med, lo, hi, flops / med / 1e9, 0, 0])
    with open("bench_frame_attention.csv", "w", newline="") as f:
        csv.writer(f).writerows([["shape", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "tflops", "peak_mib",
                                  "rel_err", "device"]] + [r + [dev] for r in rows])


def _sdpa(q, k, v, backend, sdpa_kernel, causal=False, mask=None):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, attn_mask=mask)


if __name__ == "__main__":
    bench()
