"""Grouped GRPO advantages and the fused clipped policy loss, in Triton.

    adv, stats = group_advantages(rewards, group_size=8, return_stats=True)
    loss, metrics = grpo_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, agg="traj-mean", traj=ids)

group_advantages — one launch for the whole batch. rewards [num_groups * G], consecutive entries form a group:
    A_i = (r_i - mean_g) / (std_g + eps)      verl `grpo` default: unbiased std, eps = 1e-6 added to std
    a group of one uses mean 0, std 1 (as verl); a group whose rewards are all equal gets exactly 0;
    NaN rewards are left out of the statistics and get advantage 0 (TRL); two-pass variance in fp32.
    norm_by_std=False -> A_i = r_i - mean_g (Dr. GRPO); scale="batch" divides by the batch std (TRL) instead.
    stats: per-group mean, std and `keep` = the group's valid rewards are not all equal (dynamic sampling drops
    all-success / all-failure groups, as WMPO and DAPO do).

grpo_loss — verl `compute_policy_loss_vanilla` + `agg_loss`, fused per token, forward and backward:
    log_ratio = clamp(logp - old_logp, -20, 20);  ratio = exp(log_ratio)
    pg1 = -A * ratio;  pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high);  l = max(pg1, pg2)
    dual clip (clip_c > 1, A < 0): l = min(l, -A * clip_c)
    agg: traj-mean | token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm (÷ L, Dr. GRPO)
      traj-mean: rows (e.g. the chunks one trajectory acted in) are grouped by `traj` [B] ids; every trajectory
      weighs the same: the mean of its tokens' losses, then the mean over trajectories (WMPO's and SimpleVLA-RL's
      actor divide each trajectory's loss by its own token count). With traj = arange(B) it is seq-mean-token-mean.
      token-mean (DAPO) weighs a trajectory by its length: with episodes that stop at success, failures outweigh
      successes and every update pushes the sampled tokens down (the entropy climbs; docs/experiments.md).
    The advantage is gathered per row inside the kernel: no broadcast [B, L] tensor is ever made.
    metrics: clipfrac (pg2 > pg1), clipfrac_lower (dual clip active), approx_kl = mean(-log_ratio).

Layout: logp, old_logp, mask [B, L] contiguous (any float dtype; fp32 math); advantages [B] fp32.
Dispatch: CUDA tensors -> Triton; CPU tensors -> the PyTorch references, unless TRITON_INTERPRET=1 (tests).
Benchmark: `python -m kernels.grpo` (needs CUDA; prints "GPU required" otherwise).
"""

import os

import torch
import triton
import triton.language as tl

AGG_MODES = ["traj-mean", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _group_adv_fwd(
    R, ADV, MEAN, STD, KEEP,
    num_groups, G: tl.constexpr, eps, UNBIASED: tl.constexpr, NORM_BY_STD: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # (BLOCK_GROUPS,)
    members = tl.arange(0, BLOCK_G)
    offs = groups[:, None] * G + members[None, :]  # (BLOCK_GROUPS, BLOCK_G)
    inb = (groups[:, None] < num_groups) & (members[None, :] < G)
    r = tl.load(R + offs, mask=inb, other=0.0).to(tl.float32)
    valid = inb & (r == r)  # NaN != NaN: NaN rewards leave the statistics
    r = tl.where(valid, r, 0.0)
    # -- pass 1: mean over valid members --
    n = tl.sum(valid.to(tl.float32), axis=1)
    mean = tl.sum(r, axis=1) / tl.maximum(n, 1.0)
    # -- pass 2: variance from centred values (never sum(x^2) - sum(x)^2 / n) --
    dev = tl.where(valid, r - mean[:, None], 0.0)
    denom = n - 1.0 if UNBIASED else n
    std = tl.sqrt(tl.sum(dev * dev, axis=1) / tl.maximum(denom, 1.0))
    # all-equal test on the raw values: exact, unlike std == 0 after rounding of the mean
    rmax = tl.max(tl.where(valid, r, -float("inf")), axis=1)
    rmin = tl.min(tl.where(valid, r, float("inf")), axis=1)
    keep = (n > 1.0) & (rmax > rmin)
    # -- verl: a group of one uses mean 0 and std 1 --
    single = n <= 1.0
    mean = tl.where(single, 0.0, mean)
    std = tl.where(single, 1.0, std)
    if NORM_BY_STD:
        adv = (r - mean[:, None]) / (std[:, None] + eps)
    else:
        adv = r - mean[:, None]
    adv = tl.where(valid & (keep | single)[:, None], adv, 0.0)
    tl.store(ADV + offs, adv, mask=inb)
    gm = groups < num_groups
    tl.store(MEAN + groups, mean, mask=gm)
    tl.store(STD + groups, std, mask=gm)
    tl.store(KEEP + groups, keep.to(tl.int8), mask=gm)


@triton.jit
def _token_terms(lp, olp, a, clip_low, clip_high, clip_c, DUAL_CLIP: tl.constexpr):
    """Per-token clipped surrogate and the pieces its gradient and metrics need (shared by fwd and bwd)."""
    # -- ratio from the clamped log-ratio (verl: ±20) --
    raw = lp - olp
    log_ratio = tl.minimum(tl.maximum(raw, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    # -- clipped surrogate --
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = tl.maximum(pg1, pg2)
    # d loss / d logp: -A * ratio where the unclipped branch is active (torch gives ties to both branches equally,
    # and on a tie the clamp is inactive, so the sum is again -A * ratio); 0 where the ratio is clipped
    in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    dloss = tl.where(pg1 > pg2, -a * ratio, tl.where(pg1 == pg2, tl.where(in_range, -a * ratio, -0.5 * a * ratio), 0.0))
    dloss = tl.where((raw > -20.0) & (raw < 20.0), dloss, 0.0)  # the log-ratio clamp stops the gradient
    clipped = pg2 > pg1
    lower = ratio < 0.0  # all False (exp > 0): the dual clip below is off unless asked for
    if DUAL_CLIP:
        pg3 = -a * clip_c
        lower = ((pg1 * 0.0 + a) < 0.0) & (pg3 < loss)  # a is a scalar: broadcast it before the &
        dloss = tl.where(lower, 0.0, dloss)
        loss = tl.where(lower, pg3, loss)
    return loss, dloss, log_ratio, clipped, lower


@triton.jit
def _grpo_loss_fwd(
    LP, OLP, ADV, MASK, PART,  # PART: (B, 5) row sums: loss, tokens, clipped, lower-clipped, -log_ratio
    L, clip_low, clip_high, clip_c, DUAL_CLIP: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(ADV + row).to(tl.float32)  # the row's advantage, gathered once
    acc_loss = tl.zeros([BLOCK_L], tl.float32)
    acc_n = tl.zeros([BLOCK_L], tl.float32)
    acc_clip = tl.zeros([BLOCK_L], tl.float32)
    acc_low = tl.zeros([BLOCK_L], tl.float32)
    acc_kl = tl.zeros([BLOCK_L], tl.float32)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        inb = cols < L
        lp = tl.load(LP + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        olp = tl.load(OLP + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(MASK + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        loss, dloss, log_ratio, clipped, lower = _token_terms(lp, olp, a, clip_low, clip_high, clip_c, DUAL_CLIP)
        acc_loss += loss * m
        acc_n += m
        acc_clip += clipped.to(tl.float32) * m
        acc_low += lower.to(tl.float32) * m
        acc_kl += -log_ratio * m
    tl.store(PART + row * 5 + 0, tl.sum(acc_loss, 0))
    tl.store(PART + row * 5 + 1, tl.sum(acc_n, 0))
    tl.store(PART + row * 5 + 2, tl.sum(acc_clip, 0))
    tl.store(PART + row * 5 + 3, tl.sum(acc_low, 0))
    tl.store(PART + row * 5 + 4, tl.sum(acc_kl, 0))


@triton.jit
def _grpo_loss_bwd(
    LP, OLP, ADV, MASK, ROW_W, DLP,  # ROW_W: (B,) d total / d (row's masked token loss), times the output grad
    L, clip_low, clip_high, clip_c, DUAL_CLIP: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(ADV + row).to(tl.float32)
    w = tl.load(ROW_W + row).to(tl.float32)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        inb = cols < L
        lp = tl.load(LP + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        olp = tl.load(OLP + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(MASK + row * L + cols, mask=inb, other=0.0).to(tl.float32)
        loss, dloss, log_ratio, clipped, lower = _token_terms(lp, olp, a, clip_low, clip_high, clip_c, DUAL_CLIP)
        tl.store(DLP + row * L + cols, (w * m * dloss).to(DLP.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------------------
# launchers and autograd


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    unbiased: bool = True,
    norm_by_std: bool = True,
    scale: str = "group",
    return_stats: bool = False,
):
    """GRPO advantages of consecutive groups of `group_size` rewards (see the module docstring)."""
    assert rewards.ndim == 1 and rewards.numel() % group_size == 0, "rewards must be [num_groups * group_size]"
    assert scale in ("group", "batch", "none"), f"scale must be group, batch or none, got {scale!r}"
    if not use_triton(rewards):
        return group_advantages_ref(rewards, group_size, eps, unbiased, norm_by_std, scale, return_stats)
    r = rewards.contiguous()
    num_groups = r.numel() // group_size
    adv = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    mean = torch.empty(num_groups, dtype=torch.float32, device=r.device)
    std = torch.empty_like(mean)
    keep = torch.empty(num_groups, dtype=torch.int8, device=r.device)
    BLOCK_G = triton.next_power_of_2(group_size)
    BLOCK_GROUPS = max(1, min(triton.next_power_of_2(num_groups), 4096 // BLOCK_G))  # ~4k rewards per program
    grid = (triton.cdiv(num_groups, BLOCK_GROUPS),)
    _group_adv_fwd[grid](
        r, adv, mean, std, keep, num_groups, group_size, eps, unbiased, norm_by_std and scale == "group",
        BLOCK_GROUPS=BLOCK_GROUPS, BLOCK_G=BLOCK_G,
    )  # fmt: skip
    if scale == "batch" and norm_by_std:  # TRL: centre per group, scale by the batch's std (a second, tiny op)
        valid = ~torch.isnan(r)
        adv = adv / (r[valid].float().std(unbiased=unbiased) + eps)
    if return_stats:
        return adv, {"mean": mean, "std": std, "keep": keep.bool()}
    return adv


def _row_weights(part: torch.Tensor, agg: str, L: int, traj: torch.Tensor | None = None) -> torch.Tensor:
    """d(aggregated loss) / d(row's masked token-loss sum), from the forward's row sums. part: (B, 5)."""
    n = part[:, 1]
    B = part.shape[0]
    if agg == "traj-mean":  # 1 / (the row's trajectory's token count) / (trajectories with any token)
        n_traj = torch.zeros(B, dtype=n.dtype, device=n.device).index_add_(0, traj, n)  # ids < B: at most B of them
        return 1.0 / n_traj[traj].clamp(min=1.0) / (n_traj > 0).sum().clamp(min=1).to(n.dtype)
    if agg == "token-mean":
        return torch.full_like(n, 1.0) / n.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        has = (n > 0).float()
        return has / n.clamp(min=1.0) / has.sum().clamp(min=1.0)
    if agg == "seq-mean-token-sum":
        return torch.full_like(n, 1.0 / B)
    if agg == "seq-mean-token-sum-norm":
        return torch.full_like(n, 1.0 / L)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, clip_low, clip_high, clip_c, agg, traj):
        B, L = logp.shape
        logp, old_logp, mask = logp.contiguous(), old_logp.contiguous(), mask.contiguous()
        adv = advantages.contiguous().float()
        maskf = mask if mask.dtype.is_floating_point else mask.float()
        part = torch.empty(B, 5, dtype=torch.float32, device=logp.device)
        BLOCK_L = min(1024, triton.next_power_of_2(L))
        dual = clip_c is not None and clip_c > 1.0
        _grpo_loss_fwd[(B,)](logp, old_logp, adv, maskf, part, L, clip_low, clip_high, clip_c or 0.0, dual, BLOCK_L=BLOCK_L)
        w = _row_weights(part, agg, L, traj)
        loss = (part[:, 0] * w).sum()
        ctx.save_for_backward(logp, old_logp, adv, maskf, w)
        ctx.args = (L, clip_low, clip_high, clip_c or 0.0, dual, BLOCK_L)
        ntok = part[:, 1].sum().clamp(min=1.0)
        metrics = torch.stack([part[:, 2].sum() / ntok, part[:, 3].sum() / ntok, part[:, 4].sum() / ntok])
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, dloss, dmetrics):
        logp, old_logp, adv, maskf, w = ctx.saved_tensors
        L, clip_low, clip_high, clip_c, dual, BLOCK_L = ctx.args
        dlp = torch.empty_like(logp)
        row_w = (w * dloss).float().contiguous()
        _grpo_loss_bwd[(logp.shape[0],)](logp, old_logp, adv, maskf, row_w, dlp, L, clip_low, clip_high, clip_c, dual, BLOCK_L=BLOCK_L)
        return dlp, None, None, None, None, None, None, None, None


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float | None = None,
    agg: str = "token-mean",
    traj: torch.Tensor | None = None,
):
    """Clipped policy-gradient loss (verl vanilla). Returns (loss, {"clipfrac", "clipfrac_lower", "approx_kl"}).
    traj: [B] int64 trajectory id of each row in 0..B-1 (traj-mean only; None: each row is its own trajectory)."""
    assert logp.ndim == 2 and logp.shape == old_logp.shape == mask.shape, "logp, old_logp, mask must be [B, L]"
    assert advantages.shape == (logp.shape[0],), "advantages must be [B] (one per sequence)"
    assert agg in AGG_MODES, f"agg must be one of {AGG_MODES}, got {agg!r}"
    traj = _traj_ids(traj, logp) if agg == "traj-mean" else None
    if not use_triton(logp):
        return grpo_loss_ref(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c, agg, traj)
    loss, m = _GRPOLoss.apply(logp, old_logp.detach(), advantages.detach(), mask, clip_low, clip_high, clip_c, agg,
                              traj)
    return loss, {"clipfrac": m[0], "clipfrac_lower": m[1], "approx_kl": m[2]}


def _traj_ids(traj: torch.Tensor | None, logp: torch.Tensor) -> torch.Tensor:
    B = logp.shape[0]
    if traj is None:
        return torch.arange(B, device=logp.device)
    assert traj.shape == (B,) and not traj.dtype.is_floating_point, "traj must be [B] integer ids"
    assert B == 0 or (0 <= int(traj.min()) and int(traj.max()) < B), "traj ids must lie in 0..B-1"
    return traj.to(logp.device).long()


# ----------------------------------------------------------------------------------------------------------
# PyTorch references: the test oracle and the CPU fallback


def group_advantages_ref(rewards, group_size, eps=1e-6, unbiased=True, norm_by_std=True, scale="group", return_stats=False):
    r = rewards.float().reshape(-1, group_size)  # (groups, G)
    valid = ~torch.isnan(r)
    rv = torch.where(valid, r, torch.zeros_like(r))
    n = valid.sum(1).float()
    mean = rv.sum(1) / n.clamp(min=1)
    dev = torch.where(valid, r - mean[:, None], torch.zeros_like(r))
    std = (dev.pow(2).sum(1) / (n - 1 if unbiased else n).clamp(min=1)).sqrt()
    rmax = torch.where(valid, r, torch.full_like(r, -float("inf"))).amax(1)
    rmin = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(1)
    keep = (n > 1) & (rmax > rmin)
    single = n <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = rv - mean[:, None]
    if norm_by_std and scale == "group":
        adv = adv / (std[:, None] + eps)
    adv = torch.where(valid & (keep | single)[:, None], adv, torch.zeros_like(adv)).reshape(-1)
    if norm_by_std and scale == "batch":
        adv = adv / (r[valid].std(unbiased=unbiased) + eps)
    if return_stats:
        return adv, {"mean": mean, "std": std, "keep": keep}
    return adv


def grpo_loss_ref(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, clip_c=None, agg="token-mean",
                  traj=None):
    mask = mask.float()
    a = advantages.float()[:, None]  # (B, 1), broadcast over tokens
    log_ratio = torch.clamp(logp.float() - old_logp.float().detach(), -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -a * ratio
    pg_loss2 = -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)
    lower = torch.zeros_like(pg_loss, dtype=torch.bool)
    if clip_c is not None and clip_c > 1.0:
        pg_loss3 = -a * clip_c
        lower = (a < 0) & (pg_loss3 < pg_loss)
        pg_loss = torch.where(lower, pg_loss3, pg_loss)
    ntok = mask.sum().clamp(min=1)
    row_sum, row_n = (pg_loss * mask).sum(1), mask.sum(1)
    if agg == "traj-mean":  # group rows by trajectory: each trajectory's token mean, then their mean
        ids = torch.arange(len(row_sum), device=row_sum.device) if traj is None else traj.long()
        t_sum = torch.zeros_like(row_sum).index_add(0, ids, row_sum)
        t_n = torch.zeros_like(row_n).index_add(0, ids, row_n)
        has = t_n > 0
        loss = (t_sum[has] / t_n[has]).sum() / has.sum().clamp(min=1)
    elif agg == "token-mean":
        loss = row_sum.sum() / ntok
    elif agg == "seq-mean-token-mean":
        has = row_n > 0
        loss = (row_sum[has] / row_n[has]).sum() / has.sum().clamp(min=1)
    elif agg == "seq-mean-token-sum":
        loss = row_sum.mean()
    elif agg == "seq-mean-token-sum-norm":
        loss = row_sum.sum() / mask.shape[1]
    else:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    metrics = {
        "clipfrac": ((pg_loss2 > pg_loss1).float() * mask).sum() / ntok,
        "clipfrac_lower": (lower.float() * mask).sum() / ntok,
        "approx_kl": (-log_ratio * mask).sum() / ntok,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# benchmark


def grpo_adv_loop(rewards, group_size, eps=1e-6):
    """verl's original `compute_grpo_outcome_advantage`: a Python loop over samples and groups (the slow baseline)."""
    scores = rewards.clone()
    id2score = {}
    for i in range(len(scores)):
        id2score.setdefault(i // group_size, []).append(scores[i])
    id2mean, id2std = {}, {}
    for idx, s in id2score.items():
        if len(s) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(s)
            id2mean[idx], id2std[idx] = t.mean(), t.std()
    for i in range(len(scores)):
        scores[i] = (scores[i] - id2mean[i // group_size]) / (id2std[i // group_size] + eps)
    return scores


def bench():
    import csv
    import subprocess

    if not torch.cuda.is_available():
        print("GPU required: the Triton kernels run on CUDA (tests use TRITON_INTERPRET=1 on CPU)")
        return
    from triton.testing import do_bench

    dev = torch.cuda.get_device_name()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {dev} | torch {torch.__version__} | triton {triton.__version__} | git {sha}")
    rows = []
    G = 8
    compiled_adv = torch.compile(group_advantages_ref)
    for n in [512, 8192, 65536]:
        r = (torch.rand(n, device="cuda") > 0.5).float()
        torch.testing.assert_close(group_advantages(r, G), group_advantages_ref(r, G), atol=1e-6, rtol=1e-6)
        provs = {
            "triton": lambda: group_advantages(r, G),
            "eager": lambda: group_advantages_ref(r, G),
            "compile": lambda: compiled_adv(r, G),
        }
        if n <= 8192:
            provs["verl-loop"] = lambda: grpo_adv_loop(r, G)
        res = {k: do_bench(f, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100 if k != "verl-loop" else 2000) for k, f in provs.items()}
        for k, (med, lo, hi) in res.items():
            rows.append(["advantages", n, k, med, lo, hi, res["triton"][0] and med / res["triton"][0], ""])
    B, L = 8192, 4096
    lp = torch.randn(B, L, device="cuda", requires_grad=True)
    olp = (lp.detach() + 0.1 * torch.randn_like(lp)).contiguous()
    adv = torch.randn(B, device="cuda")
    mask = (torch.rand(B, L, device="cuda") > 0.1).float()
    compiled_loss = torch.compile(grpo_loss_ref)
    bytes_moved = 4 * B * L * 4  # fwd reads lp, olp, mask; bwd reads them again and writes dlp: ~7 passes, count 4 min
    for k, f in {"triton": grpo_loss, "eager": grpo_loss_ref, "compile": compiled_loss}.items():
        def step():
            loss, _ = f(lp, olp, adv, mask)
            loss.backward()
        torch.cuda.reset_peak_memory_stats()
        med, lo, hi = do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[lp])
        peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append(["loss fwd+bwd", f"{B}x{L}", k, med, lo, hi, None, f"{bytes_moved / med / 1e6:.0f} GB/s, peak {peak:.0f} MiB"])
    tri = {r[1]: r[3] for r in rows if r[2] == "triton"}
    print(f"{'op':14s} {'size':>10s} {'provider':>10s} {'ms p50':>9s} {'p20':>9s} {'p80':>9s} {'x triton':>9s}  notes")
    for op, size, prov, med, lo, hi, _, note in rows:
        print(f"{op:14s} {str(size):>10s} {prov:>10s} {med:9.4f} {lo:9.4f} {hi:9.4f} {med / tri[size]:9.1f}  {note}")
    with open("bench_grpo.csv", "w", newline="") as f:
        csv.writer(f).writerows([["op", "size", "provider", "ms_p50", "ms_p20", "ms_p80", "device"]] +
                                [[r[0], r[1], r[2], r[3], r[4], r[5], dev] for r in rows])


if __name__ == "__main__":
    bench()
