"""Does a GRPO batch of this policy carry a learning signal? A few-minute check to run before any long GRPO run.

    python scripts/rl_signal.py --run-dir runs/s0 --temperature 0.5 --groups 32

Per task, rolls out --groups initial states x G samples in the real env (fresh `grpo_real` seeds from 8,000 on, never
`val` or `eval`) exactly as grpo-real does, then reports:
    success, group census   share of all-failure / all-success / mixed groups (only mixed groups teach)
    spread                  std of the first executed action within a group, in action units (same frame, so it is
                            the sampling temperature's spread alone), and the greedy-vs-sampled action gap
    lengths                 mean steps of successes and failures (token-mean weighs a trajectory by its length)
    grad_cos                cosine between the GRPO gradients of two random halves of the mixed groups (mean ± se
                            over --splits splits) beside grad_cos_perm, the same with success labels permuted inside
                            each group: a batch whose grad_cos does not stand above the control is a random walk
Appends one JSON line per task to <run-dir>/rl_signal.jsonl and prints a markdown table.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import wmpo  # noqa: E402
from kernels.grpo import group_advantages  # noqa: E402


@dataclass
class Args:
    run_dir: str = "runs/demo"
    """run folder holding the checkpoint"""
    checkpoint: str = "policy_sft"
    """policy checkpoint to measure"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """tasks, each measured on its own"""
    temperature: float = 0.5
    """rollout temperature"""
    execute: int = -1
    """actions run per chunk (-1: the checkpoint's)"""
    groups: int = 32
    """initial states per task (G samples each)"""
    splits: int = 8
    """random half-splits of the groups the cosines are averaged over"""
    envs_at_once: int = 64
    """real envs stepped together"""
    seed: int = 0
    """torch seed of sampling"""
    label: str = ""
    """name of this configuration in the output"""
    grpo: wmpo.GRPOConfig = field(default_factory=wmpo.GRPOConfig)


def failure_kind(task: str, instruction: str, first: np.ndarray, last: np.ndarray) -> str:
    """What a failed episode looks like, from the simulator's object positions (objects, 2) at its first and last
    frame, for the first goal pair not met: wrong target (the moved object ends nearer another pad, or another
    block moved more than the named one), near miss (within 2 success radii), untouched (the named block moved
    < 1 cm), halfway (ends nearer than half its starting distance to the pad) or off course."""
    names, _ = envs.object_layout(task)
    for o, p in envs.goal_pairs(task, instruction):
        i, j = names.index(o), names.index(p)
        d = np.linalg.norm(last[i] - last[j])
        if d < envs.SUCCESS_R:
            continue
        other_pads = [np.linalg.norm(last[i] - last[k]) for k, n in enumerate(names) if n.startswith("pad_") and k != j]
        moved = {n: np.linalg.norm(last[k] - first[k]) for k, n in enumerate(names) if n.startswith("block_")}
        nearer_pad = other_pads and min(other_pads) < min(d, 2 * envs.SUCCESS_R)
        if nearer_pad or (o in moved and moved[o] < max(moved.values()) - 0.01):
            return "wrong target"
        if d < 2 * envs.SUCCESS_R:
            return "near miss"
        if o in moved and moved[o] < 0.01:
            return "untouched"
        # the right way but not there in time (or stuck on the way) vs anywhere else
        return "halfway" if d < 0.5 * np.linalg.norm(first[i] - first[j]) else "off course"
    return "near miss"  # every pair met at the end but never all at once


def measure(args: Args, policy, task: str) -> dict:
    G = args.grpo.group_size
    per = max(1, args.envs_at_once // G)  # groups per rollout call
    world = envs.RealChunkEnv(task, per * G)
    world.next_seed = 8000
    trs, kinds = [], []
    for _ in range(-(-args.groups // per)):
        trs.append(wmpo.rollout(policy, world, envs.horizon(task), per, G, args.temperature))
        pos = np.stack(world.object_pos, 1)  # (b, frames, objects, 2)
        kinds += [None if s else failure_kind(task, ins, p[0], p[-1])
                  for s, ins, p in zip(trs[-1]["success"].tolist(), world.instructions, pos)]
    world.close()
    success = torch.cat([t["success"] for t in trs]).float()
    finish = torch.cat([t["finish"] for t in trs]).float()
    adv, st = group_advantages(success, G, return_stats=True)
    # all rollout calls as one batch of trajectories, in group order (what grpo_loop hands grad_signal)
    tr = {k: torch.cat([t[k] for t in trs]) for k in ["obs", "tokens", "words", "token_mask"]}
    batch = wmpo.flatten_rows(tr, adv, st["keep"].repeat_interleave(G))
    # the spread of the first action within a group: all G samples saw the same first frame
    first = torch.cat([wmpo.tokens_to_action(t["tokens"][:, 0, :2], policy.cfg.bins) for t in trs])  # (b, a)
    spread = first.reshape(-1, G, 2).std(1).mean().item()
    obs0 = torch.cat([t["obs"][::G, 0] for t in trs])
    greedy, _, _ = policy.act(obs0, torch.cat([t["words"][::G] for t in trs]), 0.0)
    gap = (first.reshape(-1, G, 2).mean(1) - greedy[:, 0]).abs().mean().item()
    cos = [wmpo.grad_signal(policy, batch, G, args.grpo, seed=s) for s in range(args.splits)]
    cos = [c for c in cos if c]
    out = {"label": args.label, "task": task, "checkpoint": args.checkpoint, "temperature": args.temperature,
           "execute": policy.cfg.execute, "agg": args.grpo.agg, "trajectories": len(success),
           "success": success.mean().item(), "groups_all_fail": (st["mean"] == 0).float().mean().item(),
           "groups_all_success": (st["mean"] == 1).float().mean().item(),
           "groups_mixed": st["keep"].float().mean().item(),
           "spread_first_action": spread, "greedy_gap_first_action": gap,
           "len_success": finish[success > 0].mean().item() if success.any() else None,
           "len_failure": finish[success == 0].mean().item() if (success == 0).any() else None}
    for k in ["grpo/grad_cos", "grpo/grad_cos_perm"]:
        v = np.array([c[k] for c in cos])
        name = k.split("/")[1]
        out[name] = float(v.mean()) if len(v) else None
        out[name + "_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    out["mixed_groups_per_half"] = cos[0]["grpo/grad_signal_groups"] // 2 if cos else 0
    # failure kinds over all failures, and in mixed groups alone (where GRPO's signal comes from)
    mixed = st["keep"].repeat_interleave(G).tolist()
    for name, sel in [("failures", [k for k in kinds if k]),
                      ("failures_in_mixed", [k for k, m in zip(kinds, mixed) if k and m])]:
        out[name] = {k: sel.count(k) / len(sel) for k in sorted(set(sel))} if sel else {}
    return out


def main(args: Args):
    policy = wmpo.load(wmpo.require(os.path.join(args.run_dir, f"{args.checkpoint}.safetensors"),
                                    f"python train_policy.py sft --run-dir {args.run_dir}"), expect="VLA")
    if args.execute > 0:
        policy.cfg.execute = min(args.execute, policy.cfg.chunk)
    args.grpo.temperature = args.temperature  # the loss's log-probs are those of the rollout distribution
    torch.manual_seed(args.seed)
    policy.train()
    print("| label | task | T | E | traj | success | fail / succ / mixed groups | spread | greedy gap | len s / f "
          "| grad_cos | grad_cos_perm | mixed groups per half | failures (in mixed groups) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        r = measure(args, policy, task)
        with open(os.path.join(args.run_dir, "rl_signal.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        kinds = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
        fmt = lambda v, se: "–" if v is None else f"{v:+.3f} ± {se or 0:.3f}"  # noqa: E731
        ls = "–" if r["len_success"] is None else f"{r['len_success']:.0f}"
        lf = "–" if r["len_failure"] is None else f"{r['len_failure']:.0f}"
        print(f"| {r['label']} | {task} | {r['temperature']:g} | {r['execute']} | {r['trajectories']} | "
              f"{r['success']:.2f} | {r['groups_all_fail']:.2f} / {r['groups_all_success']:.2f} / "
              f"{r['groups_mixed']:.2f} | {r['spread_first_action']:.3f} | {r['greedy_gap_first_action']:.3f} | "
              f"{ls} / {lf} | {fmt(r['grad_cos'], r['grad_cos_se'])} | "
              f"{fmt(r['grad_cos_perm'], r['grad_cos_perm_se'])} | {r['mixed_groups_per_half']} | "
              f"{kinds(r['failures'])} ({kinds(r['failures_in_mixed'])}) |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
