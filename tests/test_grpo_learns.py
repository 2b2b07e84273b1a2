"""GRPO must solve a small problem: a contextual bandit on the VLA's own action head.

The instruction names a colour; the reward is 1 when the first decoded action's x lands within 0.1 of that colour's
target (a 10% slice of [-1, 1]: chance at the start). Only that one token "ran" (token_mask), as in a rollout that
ends after one action. GRPO (wmpo.grpo_update with the default GRPOConfig apart from a tiny model's lr) must take
every context from chance to >= 90% success in a few dozen updates. It guards every change to the RL step: a flipped
sign, a broken advantage, mask or aggregation, or a minibatch split that loses trajectories fails it.
"""

import pytest
import torch

import kernels.grpo
import wmpo
from kernels.grpo import group_advantages
from scripts.rl_signal import grad_signal  # the GRPO loop's diagnostic

COLOURS = ["red", "blue", "green", "yellow"]
TARGETS = torch.tensor([-0.6, -0.2, 0.2, 0.6])  # x of the first action that pays, per colour
G = 8


@pytest.fixture(autouse=True)
def pytorch_loss(monkeypatch):
    # the loss on its CPU path (kernels.grpo's reference): the Triton kernel is checked against it in
    # test_grpo_kernels.py, and in the interpreter these 40 updates would take minutes
    monkeypatch.setattr(kernels.grpo, "use_triton", lambda t: False)


def tiny_policy():
    torch.manual_seed(0)
    return wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64))


def bandit_batch(policy, reps: int, temperature: float):
    """reps groups per colour, G samples each -> a flatten_rows batch (one row per trajectory) and the rewards."""
    ctx = torch.arange(len(COLOURS)).repeat(reps)  # (groups,)
    words = wmpo.tokenize([f"go to the {COLOURS[c]} pad" for c in ctx.repeat_interleave(G)], policy.text.words)
    obs = torch.full((len(words), 64, 64, 3), 128, dtype=torch.uint8)  # one plain frame: the words decide
    actions, tokens, _ = policy.act(obs, words, temperature)
    reward = ((actions[:, 0, 0] - TARGETS[ctx.repeat_interleave(G)]).abs() < 0.1).float()
    tmask = torch.zeros_like(tokens, dtype=torch.bool)
    tmask[:, 0] = True  # only the first action's x counts
    adv, st = group_advantages(reward, G, return_stats=True)
    batch = {"obs": obs, "words": words, "tokens": tokens, "adv": adv, "token_mask": tmask,
             "mask": st["keep"].repeat_interleave(G), "traj": torch.arange(len(adv))}
    return batch, reward


def greedy_success(policy):
    words = wmpo.tokenize([f"go to the {c} pad" for c in COLOURS], policy.text.words)
    actions, _, _ = policy.act(torch.full((len(COLOURS), 64, 64, 3), 128, dtype=torch.uint8), words, 0.0)
    return ((actions[:, 0, 0] - TARGETS).abs() < 0.1).float()


def test_grpo_solves_a_contextual_bandit_on_the_action_head():
    policy = tiny_policy()
    cfg = wmpo.GRPOConfig(lr=3e-3, temperature=1.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(1)
    _, r0 = bandit_batch(policy, 4, cfg.temperature)
    assert r0.mean() < 0.3, "the bandit must start near chance (10%)"
    curve = []
    for it in range(40):
        batch, reward = bandit_batch(policy, 2, cfg.temperature)
        curve.append(reward.mean().item())
        if batch["mask"].any():
            wmpo.grpo_update(policy, opt, batch, cfg)
    _, r = bandit_batch(policy, 8, cfg.temperature)  # 256 fresh samples at the training temperature
    per_ctx = r.reshape(-1, G).mean(1).reshape(8, len(COLOURS)).mean(0)
    assert (per_ctx >= 0.9).all(), f"sampled success per colour {per_ctx.tolist()} (curve {curve})"
    assert greedy_success(policy).all()


def test_grad_signal_is_one_for_identical_halves_and_lower_for_permuted_labels():
    # every group a copy of one mixed group: any two halves hold the same trajectories, so their gradients are
    # equal (cosine 1); permuting the labels inside each group, independently per group, breaks that
    policy = tiny_policy()
    torch.manual_seed(2)
    one, _ = bandit_batch(policy, 1, 1.0)
    one = {k: v[:G] for k, v in one.items()}  # the red group
    one["adv"] = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0]), G)
    one["mask"] = torch.ones(G, dtype=torch.bool)
    groups = 16
    batch = {k: v.repeat(groups, *[1] * (v.ndim - 1)) for k, v in one.items()}
    batch["traj"] = torch.arange(len(batch["adv"]))
    out = grad_signal(policy, batch, G, wmpo.GRPOConfig(temperature=1.0), seed=0)
    assert out["grpo/grad_signal_groups"] == groups
    assert abs(out["grpo/grad_cos"] - 1) < 1e-4 and out["grpo/grad_cos_perm"] < 0.9, out
