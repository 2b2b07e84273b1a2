"""kernels/grpo.py against its PyTorch references, verl's loop and hand-computed cases (Triton interpreter on CPU)."""

import math

import pytest
import torch

from kernels.grpo import AGG_MODES, group_advantages, group_advantages_ref, grpo_adv_loop, grpo_loss, grpo_loss_ref


@pytest.mark.parametrize("G", [1, 2, 5, 8])
@pytest.mark.parametrize("num_groups", [1, 7, 300])
def test_advantages_match_reference_and_verl(G, num_groups):
    torch.manual_seed(G * 1000 + num_groups)
    r = torch.randn(num_groups * G)
    r[: G * (num_groups // 3)] = (r[: G * (num_groups // 3)] > 0).float()  # binary success groups too
    adv, st = group_advantages(r, G, return_stats=True)
    ref, st_ref = group_advantages_ref(r, G, return_stats=True)
    torch.testing.assert_close(adv, ref, atol=1e-6, rtol=1e-6)
    for k in ["mean", "std"]:
        torch.testing.assert_close(st[k], st_ref[k], atol=1e-6, rtol=1e-6)
    assert torch.equal(st["keep"], st_ref["keep"])
    if num_groups <= 7:  # verl's original loop, where no group is uniform (verl gives those ~0, we give exactly 0)
        loop = grpo_adv_loop(r, G)
        nonuniform = st_ref["keep"].repeat_interleave(G) | (G == 1)
        torch.testing.assert_close(adv[nonuniform], loop[nonuniform], atol=1e-5, rtol=1e-5)


def test_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # group 0 mixed, group 1 all-success
    adv, st = group_advantages(r, 4, return_stats=True)
    std = math.sqrt(((0.75**2) + 3 * 0.25**2) / 3)  # unbiased
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6)
    torch.testing.assert_close(adv[:4], expect, atol=1e-6, rtol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # exactly zero, not 1e-6-amplified rounding
    assert st["keep"].tolist() == [True, False]
    # a group of size one: mean 0, std 1 (verl)
    adv1 = group_advantages(torch.tensor([0.3, -2.0]), 1)
    torch.testing.assert_close(adv1, torch.tensor([0.3, -2.0]) / (1 + 1e-6))


def test_all_equal_non_binary_groups_give_exact_zero():
    r = torch.full((64,), 0.1)  # 0.1 * 8 / 8 != 0.1 in fp32 arithmetic: the mean rounds
    adv, st = group_advantages(r, 8, return_stats=True)
    assert torch.equal(adv, torch.zeros(64)) and not st["keep"].any()


def test_nan_rewards_excluded():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.0, float("nan"), float("nan"), float("nan"), 2.0])
    adv = group_advantages(r, 4)
    valid = torch.tensor([1.0, 0.0, 0.0])
    std = valid.std()
    torch.testing.assert_close(adv[[0, 2, 3]], (valid - valid.mean()) / (std + 1e-6))
    assert adv[1] == 0 and adv[4] == 0 and adv[5] == 0 and adv[6] == 0
    torch.testing.assert_close(adv[7], torch.tensor(2.0) / (1 + 1e-6))  # one valid reward: singleton rule


@pytest.mark.parametrize("kw", [dict(unbiased=False), dict(norm_by_std=False), dict(scale="batch"), dict(eps=1e-4)])
def test_advantage_flags(kw):
    torch.manual_seed(0)
    r = torch.randn(40)
    torch.testing.assert_close(group_advantages(r, 8, **kw), group_advantages_ref(r, 8, **kw), atol=1e-6, rtol=1e-6)
    if kw == dict(norm_by_std=False):  # Dr. GRPO: plain centring
        g = r.reshape(5, 8)
        torch.testing.assert_close(group_advantages(r, 8, **kw), (g - g.mean(1, keepdim=True)).reshape(-1))


def test_large_batch():
    r = (torch.rand(8192) > 0.3).float()
    torch.testing.assert_close(group_advantages(r, 8), group_advantages_ref(r, 8), atol=1e-6, rtol=1e-6)


def _loss_inputs(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 3
    logp = (old + 0.4 * torch.randn(B, L, generator=g)).requires_grad_(True)  # ratios inside and outside the clip
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    mask[0] = 0  # an empty row
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip_c", [None, 3.0])
@pytest.mark.parametrize("B,L", [(5, 17), (3, 1100)])
def test_loss_and_grad_match_reference(agg, clip_c, B, L):
    logp, old, adv, mask = _loss_inputs(B, L)
    loss, m = grpo_loss(logp, old, adv, mask, clip_c=clip_c, agg=agg)
    (g,) = torch.autograd.grad(loss, logp)
    lp2 = logp.detach().clone().requires_grad_(True)
    loss_ref, m_ref = grpo_loss_ref(lp2, old, adv, mask, clip_c=clip_c, agg=agg)
    (g_ref,) = torch.autograd.grad(loss_ref, lp2)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert (g - g_ref).norm() <= 1e-6 * g_ref.norm() + 1e-9
    for k in m_ref:
        torch.testing.assert_close(m[k], m_ref[k], atol=1e-6, rtol=1e-6)
    assert m_ref["clipfrac"] > 0  # the case really exercises clipping


def test_loss_hand_computed():
    # one token per row: ratio 1.5 with A=+1 is clipped at 1.28; ratio 0.5 with A=-1 clipped at 0.8 (dual clip off)
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logp, old, adv, torch.ones(2, 1))
    expect = (max(-1.5, -1.28) + max(0.5, 0.8)) / 2
    assert abs(loss.item() - expect) < 1e-6
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.equal(g, torch.zeros(2, 1))  # both tokens clipped: no gradient
    assert abs(m["clipfrac"].item() - 1.0) < 1e-6


def test_masked_tokens_get_no_gradient():
    logp, old, adv, mask = _loss_inputs(4, 33, seed=1)
    loss, _ = grpo_loss(logp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.equal(g[mask == 0], torch.zeros_like(g[mask == 0]))


@pytest.mark.parametrize("B,L", [(7, 16), (12, 4)])
def test_traj_mean_weighs_every_trajectory_the_same(B, L):
    # rows are the chunks of 3 trajectories of different lengths; the loss must equal the mean over trajectories of
    # each one's token mean, written out from the per-token surrogate, and its gradient must match the reference's
    logp, old, adv, mask = _loss_inputs(B, L, seed=B)
    traj = torch.arange(B) % 3
    traj[-1] = 0  # unequal row counts per trajectory
    adv = adv[traj]  # one advantage per trajectory, broadcast to its rows (as flatten_rows does)
    loss, m = grpo_loss(logp, old, adv, mask, agg="traj-mean", traj=traj)
    (g,) = torch.autograd.grad(loss, logp)
    lp2 = logp.detach().clone().requires_grad_(True)
    ratio = torch.exp(lp2 - old)
    tok = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.28)) * mask
    means = [tok[traj == i].sum() / mask[traj == i].sum() for i in range(3) if mask[traj == i].sum() > 0]
    expect = torch.stack(means).mean()
    (g_ref,) = torch.autograd.grad(expect, lp2)
    torch.testing.assert_close(loss, expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=1e-5)
    # the same thing as token-mean with each advantage scaled by (mean trajectory length / its length): arm B of
    # the GRPO study; a length-independent weight means successes (short) and failures (long) weigh alike
    n = torch.stack([mask[traj == i].sum() for i in range(3)])
    scaled = adv * (n.mean() / n)[traj]
    tm, _ = grpo_loss_ref(logp.detach(), old, scaled, mask, agg="token-mean")
    torch.testing.assert_close(loss.detach(), tm, atol=1e-6, rtol=1e-6)
    # and with each row its own trajectory it is seq-mean-token-mean
    a, _ = grpo_loss(logp.detach(), old, adv, mask, agg="traj-mean")
    b, _ = grpo_loss_ref(logp.detach(), old, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_traj_ids_out_of_range_fail_clearly():
    logp, old, adv, mask = _loss_inputs(4, 8)
    with pytest.raises(AssertionError, match="traj ids"):
        grpo_loss(logp, old, adv, mask, agg="traj-mean", traj=torch.tensor([0, 1, 2, 9]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_shapes(dtype):
    # the compiled kernels (no interpreter) at a training-sized batch: 4,096 groups of 8, 512 x 128 tokens
    r = (torch.rand(4096 * 8, device="cuda") > 0.5).float()
    torch.testing.assert_close(group_advantages(r, 8), group_advantages_ref(r, 8), atol=1e-5, rtol=1e-5)
    logp = (-torch.rand(512, 128, device="cuda")).to(dtype).requires_grad_(True)
    old, adv = -torch.rand(512, 128, device="cuda").to(dtype), torch.randn(512, device="cuda")
    mask = (torch.rand(512, 128, device="cuda") > 0.1).float()
    loss, _ = grpo_loss(logp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logp)
    lr = logp.detach().float().requires_grad_(True)
    loss_r, _ = grpo_loss_ref(lr, old.float(), adv, mask)
    (g_r,) = torch.autograd.grad(loss_r, lr)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 inputs: ~3 significant digits
    assert abs(loss.float().item() - loss_r.item()) <= tol * max(abs(loss_r.item()), 1e-3)
    assert ((g.float() - g_r).norm() / g_r.norm()).item() <= tol  # norm-relative: gradients are ~1e-5 each
