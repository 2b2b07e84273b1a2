"""Does a GRPO batch of this policy carry a learning signal, and are its failures decisions or luck? A few-minute
headroom check to run before any long GRPO run (issue 33).

    python scripts/rl_signal.py --run-dir runs/s0 --temperature 0.5 --groups 16 --batches 4

Per task, rolls out --batches independent batches of --groups initial states x G samples in the real env (fresh
`grpo_real` seeds from 8,000 on, never `val` or `eval`) exactly as grpo-real does, then reports:
    success, group census   share of all-failure / all-success / mixed groups (only mixed groups teach)
    spread                  std of the first executed action within a group, in action units (same frame, so it is
                            the sampling temperature's spread alone), and the greedy-vs-sampled action gap
    lengths                 mean steps of successes and failures
    grad_cos                cosine between the GRPO gradients (ratio 1, the update's loss) of two independent batches,
                            mean ± se over every pair of batches, beside grad_cos_perm, the same with the success
                            labels permuted inside each group: a gradient that does not stand above the control is a
                            random walk (one pair is too noisy: ±0.05-0.1)
    explained               how much of the outcome the simulator's state explains at the policy's decisions: a small
                            classifier on distances from the true object positions (named object to its pad, to the
                            nearest other pad, pusher to the block) + the decision's time, fitted on half the batches
                            and scored on the others (2-fold), 1 - held-out log-loss / log-loss of the constant
                            success rate, overall and per quarter of the horizon. Decisions: explained early, groups
                            mixed, cosine above control. Luck: groups mixed, little explained until the end.
Appends one JSON line per task to <run-dir>/rl_signal.jsonl and prints a markdown table.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
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
    sampling: Literal["", "independent", "shared"] = ""
    """how a chunk's tokens are drawn (PolicyConfig.sampling; empty: the checkpoint's)"""
    groups: int = 16
    """initial states per batch (G samples each): GRPO's batch per task is 8"""
    batches: int = 4
    """independent batches per task; the cosines average over all pairs of them (4 -> 6 pairs)"""
    envs_at_once: int = 64
    """real envs stepped together"""
    seed: int = 0
    """torch seed of sampling"""
    label: str = ""
    """name of this configuration in the output"""
    grpo: wmpo.GRPOConfig = field(default_factory=wmpo.GRPOConfig)


# ----------------------------------------------------------------------------------------------------------
# the update's direction: signal or noise


def policy_gradient(policy: wmpo.VLA, batch: dict, rows: torch.Tensor, adv: torch.Tensor, cfg: wmpo.GRPOConfig, device):
    """The GRPO loss's gradient (flattened) on `rows` of a flatten_rows batch with advantages `adv` per row, at
    ratio 1 (old log-probs = current): the direction one update would start in."""
    o, w, t, tmask, traj = (batch[k][rows] for k in ["obs", "words", "tokens", "token_mask", "traj"])
    loss, _ = wmpo.minibatch_loss(policy, o, w, t, None, adv[rows], tmask, traj, cfg, device)
    grads = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def permuted_within_groups(adv: torch.Tensor, G: int, gen: torch.Generator) -> torch.Tensor:
    """Each trajectory takes a random group-mate's advantage: the same group statistics, outcome detached from
    behaviour."""
    n = len(adv) // G
    perm = torch.rand(n, G, generator=gen).argsort(1) + torch.arange(n)[:, None] * G
    return adv[perm.reshape(-1)]


def grad_signal(policy: wmpo.VLA, batch: dict, G: int, cfg: wmpo.GRPOConfig, device="cpu", seed: int = 0) -> dict:
    """Is the batch's gradient signal or noise? The kept groups are split in two random halves; the cosine between
    the halves' gradients (`grad_cos`) beside the same with each group's advantages permuted among its members
    (`grad_cos_perm`: same group statistics, outcomes detached from behaviour). Independent noise gives ~0 for
    both; a gradient that generalises across initial states gives grad_cos well above the control. batch needs
    `traj` ids in group order (trajectory i in group i // G), as grpo_loop builds them. Logged by the GRPO loop every
    iteration (`grpo/grad_cos`)."""
    gen = torch.Generator().manual_seed(seed)
    traj, rows_ok = batch["traj"], batch["mask"]
    n_traj = int(traj.max()) + 1
    adv_t = torch.zeros(n_traj).index_copy(0, traj, batch["adv"].float())  # (trajectories,)
    kept = torch.zeros(n_traj // G, dtype=torch.bool).index_fill(0, traj[rows_ok] // G, True)
    groups = kept.nonzero()[:, 0][torch.randperm(int(kept.sum()), generator=gen)]
    if len(groups) < 2:
        return {}
    adv_perm = permuted_within_groups(adv_t, G, gen)[traj]  # per row
    halves = [torch.isin(traj // G, h) & rows_ok for h in groups.chunk(2)]
    grads = {(k, i): policy_gradient(policy, batch, h.nonzero()[:, 0], a, cfg, device)
             for k, a in [("real", batch["adv"]), ("perm", adv_perm)] for i, h in enumerate(halves)}
    cos = {k: F.cosine_similarity(grads[(k, 0)], grads[(k, 1)], dim=0).item() for k in ["real", "perm"]}
    return {"grpo/grad_cos": cos["real"], "grpo/grad_cos_perm": cos["perm"], "grpo/grad_signal_groups": len(groups)}


def failure_kind(task: str, instruction: str, first: np.ndarray, last: np.ndarray) -> str:
    """What a failed episode looks like, from the simulator's object positions (objects, 2) at its first and last
    frame, for the first goal pair not met: wrong target (the moved object ends nearer another pad, or another
    block moved more than the named one), near miss (within 2 success radii), untouched (the named block moved
    < 1 cm), halfway (ends nearer than half its starting distance to the pad) or off course."""
    names, _ = envs.object_layout(task)
    r = envs.success_radius(task)
    for o, p in envs.goal_pairs(task, instruction):
        i, j = names.index(o), names.index(p)
        d = np.linalg.norm(last[i] - last[j])
        if d < r:
            continue
        other_pads = [np.linalg.norm(last[i] - last[k]) for k, n in enumerate(names) if n.startswith("pad_") and k != j]
        moved = {n: np.linalg.norm(last[k] - first[k]) for k, n in enumerate(names) if n.startswith("block_")}
        nearer_pad = other_pads and min(other_pads) < min(d, 2 * r)
        if nearer_pad or (o in moved and moved[o] < max(moved.values()) - 0.01):
            return "wrong target"
        if d < 2 * r:
            return "near miss"
        if o in moved and moved[o] < 0.01:
            return "untouched"
        # the right way but not there in time (or stuck on the way) vs anywhere else
        return "halfway" if d < 0.5 * np.linalg.norm(first[i] - first[j]) else "off course"
    return "near miss"  # every pair met at the end but never all at once


def state_features(task: str, instruction: str, pos: np.ndarray) -> np.ndarray:
    """What the simulator knows at each frame, for the outcome classifier: (t, objects, 2) -> (t, f). Per goal pair
    (object o, pad p) the instruction names: |o - p| (progress), the distance from o to the nearest other pad (a
    wrong target) and, when o is a block, |pusher - o| (in contact or not). Distances, not coordinates: with ~30
    layouts per fold a classifier on raw offsets memorised them (held-out log-loss worse than a constant's on the v1
    base) where one on these explains 10-40% (docs/experiments.md, 2026-12-05)."""
    names, _ = envs.object_layout(task)
    d = lambda a, b: np.linalg.norm(pos[:, names.index(a)] - pos[:, names.index(b)], axis=-1)  # noqa: E731
    cols = []
    for o, p in envs.goal_pairs(task, instruction):
        cols.append(d(o, p))
        others = [n for n in names if n.startswith("pad_") and n != p]
        if others:
            cols.append(np.min([d(o, q) for q in others], axis=0))
        if o != "pusher":
            cols.append(d("pusher", o))
    return np.stack(cols, 1)


def fit_outcome(x: list[np.ndarray], y: list[np.ndarray], group: list[int], steps: int = 600, seed: int = 0):
    """A small MLP p(success | state features), fitted by AdamW on the log-loss with early stopping on a quarter of
    the initial states held out (the G episodes of a group start from one layout and the rows of an episode are
    near-copies: without it the MLP memorises layouts and is confidently wrong on new ones). x, y: one array per
    episode; group: its initial state's id. Returns features -> probabilities."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = sorted(set(group))
    held = {ids[i] for i in torch.randperm(len(ids), generator=gen)[: max(1, len(ids) // 4)].tolist()}

    def cat(val, a):  # the held-out (val=True) or fitting episodes' rows
        return torch.as_tensor(np.concatenate([a[i] for i, g in enumerate(group) if (g in held) == val]),
                               dtype=torch.float32)

    xt, yt, xv, yv = cat(False, x), cat(False, y), cat(True, x), cat(True, y)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                              torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    logloss = lambda a, b: F.binary_cross_entropy_with_logits(net((a - mu) / sd)[:, 0], b)  # noqa: E731
    best, best_state = float("inf"), None
    for step in range(steps):
        loss = logloss(xt, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                v = logloss(xv, yv).item()
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return lambda q: torch.sigmoid(net((torch.as_tensor(q, dtype=torch.float32) - mu) / sd)[:, 0]).detach()


def outcome_explained(batches: list[dict], horizon: int, E: int, G: int) -> dict:
    """1 - held-out log-loss / constant log-loss of the outcome from the state at each decision (2-fold over
    batches, so over initial states never fitted on), overall and per quarter of the horizon. Decisions after a
    success (the env had stopped) are left out. Episodes are in group order (G per initial state)."""
    folds = [{"x": [], "y": [], "q": [], "g": []} for _ in range(2)]
    for k, b in enumerate(batches):
        for e, (feats, ok, finish) in enumerate(zip(b["features"], b["success"].tolist(), b["finish"].tolist())):
            folds[k % 2]["g"].append(k * 100_000 + e // G)
            steps = np.arange(0, min(finish, horizon), E)  # the frames the policy chose a chunk from
            folds[k % 2]["x"].append(np.concatenate([feats[steps], (steps / horizon)[:, None]], 1))
            folds[k % 2]["y"].append(np.full(len(steps), float(ok)))
            folds[k % 2]["q"].append(np.minimum(4 * steps // horizon, 3))
    ll, ll0, quarter = [], [], []
    for f in range(2):
        train, test = folds[1 - f], folds[f]
        yt = np.concatenate(train["y"])
        if not test["y"] or yt.min() == yt.max():  # one outcome only: nothing to explain
            return {"explained": None, "explained_by_quarter": None}
        p = fit_outcome(train["x"], train["y"], train["g"])(np.concatenate(test["x"])).numpy().clip(1e-3, 1 - 1e-3)
        p0 = np.clip(yt.mean(), 1e-3, 1 - 1e-3)
        ys = np.concatenate(test["y"])
        ll.append(-(ys * np.log(p) + (1 - ys) * np.log(1 - p)))
        ll0.append(-(ys * np.log(p0) + (1 - ys) * np.log(1 - p0)))
        quarter.append(np.concatenate(test["q"]))
    ll, ll0, quarter = np.concatenate(ll), np.concatenate(ll0), np.concatenate(quarter)
    by_q = [float(1 - ll[quarter == k].mean() / ll0[quarter == k].mean()) if (quarter == k).any() else None
            for k in range(4)]
    return {"explained": float(1 - ll.mean() / ll0.mean()), "explained_by_quarter": by_q}


def rollout_batch(args: Args, policy, world, task: str) -> dict:
    """One GRPO batch of --groups initial states x G samples: rollouts, advantages, object positions, failure kinds."""
    G = args.grpo.group_size
    per = world.num_envs // G  # groups per rollout call
    trs, kinds, feats, positions, instructions = [], [], [], [], []
    for _ in range(-(-args.groups // per)):
        trs.append(wmpo.rollout(policy, world, envs.horizon(task), per, G, args.temperature))
        pos = np.stack(world.object_pos, 1)[: len(trs[-1]["success"])]  # (b, frames, objects, 2)
        kinds += [None if s else failure_kind(task, ins, p[0], p[-1])
                  for s, ins, p in zip(trs[-1]["success"].tolist(), world.instructions, pos)]
        feats += [state_features(task, ins, p) for ins, p in zip(world.instructions, pos)]
        positions += list(pos)
        instructions += list(world.instructions)
    tr = {k: torch.cat([t[k] for t in trs]) for k in ["obs", "tokens", "words", "token_mask", "success", "finish"]}
    adv, st = group_advantages(tr["success"].float(), G, return_stats=True)
    return {**tr, "adv": adv, "stats": st, "kinds": kinds, "features": feats, "object_pos": positions,
            "instructions": instructions,
            "rows": wmpo.flatten_rows(tr, adv, st["keep"].repeat_interleave(G))}


def measure(args: Args, policy, task: str) -> dict:
    G, E = args.grpo.group_size, policy.cfg.execute
    world = envs.RealChunkEnv(task, min(args.groups, max(1, args.envs_at_once // G)) * G)
    world.next_seed = 8000
    batches = [rollout_batch(args, policy, world, task) for _ in range(args.batches)]
    world.close()
    success = torch.cat([b["success"] for b in batches]).float()
    finish = torch.cat([b["finish"] for b in batches]).float()
    means = torch.cat([b["stats"]["mean"] for b in batches])
    keep = torch.cat([b["stats"]["keep"] for b in batches])
    # the spread of the first action within a group: all G samples saw the same first frame
    first = torch.cat([wmpo.tokens_to_action(b["tokens"][:, 0, :2], policy.cfg.bins) for b in batches])  # (b, a)
    spread = first.reshape(-1, G, 2).std(1).mean().item()
    obs0 = torch.cat([b["obs"][::G, 0] for b in batches])
    greedy, _, _ = policy.act(obs0, torch.cat([b["words"][::G] for b in batches]), 0.0)
    gap = (first.reshape(-1, G, 2).mean(1) - greedy[:, 0]).abs().mean().item()
    # each batch's update direction, with its own and with permuted labels; cosines over pairs of batches
    gen = torch.Generator().manual_seed(args.seed)
    grads = {"real": [], "perm": []}
    for b in batches:
        rows = b["rows"]["mask"].nonzero()[:, 0]
        if len(rows) == 0:  # no mixed group: this batch has no gradient
            continue
        adv_perm = permuted_within_groups(b["adv"], G, gen)[b["rows"]["traj"]]
        for k, a in [("real", b["rows"]["adv"]), ("perm", adv_perm)]:
            grads[k].append(policy_gradient(policy, b["rows"], rows, a, args.grpo, "cpu"))
    out = {"label": args.label, "task": task, "checkpoint": args.checkpoint, "temperature": args.temperature,
           "execute": E, "sampling": policy.cfg.sampling, "agg": args.grpo.agg, "trajectories": len(success),
           "batches": args.batches,
           "success": success.mean().item(), "groups_all_fail": (means == 0).float().mean().item(),
           "groups_all_success": (means == 1).float().mean().item(), "groups_mixed": keep.float().mean().item(),
           "spread_first_action": spread, "greedy_gap_first_action": gap,
           "len_success": finish[success > 0].mean().item() if success.any() else None,
           "len_failure": finish[success == 0].mean().item() if (success == 0).any() else None}
    for k in ["real", "perm"]:
        g = grads[k]
        v = np.array([F.cosine_similarity(g[i], g[j], dim=0).item() for i in range(len(g)) for j in range(i)])
        name = "grad_cos" if k == "real" else "grad_cos_perm"
        out[name] = float(v.mean()) if len(v) else None
        out[name + "_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    out["pairs"] = len(grads["real"]) * (len(grads["real"]) - 1) // 2
    out.update(outcome_explained(batches, envs.horizon(task), E, G))
    # what the classifier saw, to re-analyse without new rollouts: outcome_explained(torch.load(path), horizon, E, G)
    torch.save([{k: b[k] for k in ["features", "success", "finish", "object_pos", "instructions"]} for b in batches],
               os.path.join(args.run_dir, f"rl_signal_states-{args.label or 'run'}-{envs.task_name(task)}.pt"))
    # failure kinds over all failures, and in mixed groups alone (where GRPO's signal comes from)
    kinds = [k for b in batches for k in b["kinds"]]
    mixed = keep.repeat_interleave(G).tolist()
    for name, sel in [("failures", [k for k in kinds if k]),
                      ("failures_in_mixed", [k for k, m in zip(kinds, mixed) if k and m])]:
        out[name] = {k: sel.count(k) / len(sel) for k in sorted(set(sel))} if sel else {}
    return out


def main(args: Args):
    policy = wmpo.load(envs.require(os.path.join(args.run_dir, f"{args.checkpoint}.safetensors"),
                                    f"python train_policy.py sft --run-dir {args.run_dir}"), expect="VLA")
    if args.execute > 0:
        policy.cfg.execute = min(args.execute, policy.cfg.chunk)
    policy.cfg.sampling = args.sampling or policy.cfg.sampling
    args.grpo.temperature = args.temperature  # the loss's log-probs are those of the rollout distribution
    torch.manual_seed(args.seed)
    policy.train()
    print("| label | task | T | E | traj | success | fail / succ / mixed groups | spread | greedy gap | len s / f "
          "| grad_cos | grad_cos_perm | pairs | explained (by quarter) | failures (in mixed groups) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        r = measure(args, policy, task)
        with open(os.path.join(args.run_dir, "rl_signal.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        kinds = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
        fmt = lambda v, se: "–" if v is None else f"{v:+.3f} ± {se or 0:.3f}"  # noqa: E731
        ls = "–" if r["len_success"] is None else f"{r['len_success']:.0f}"
        expl = lambda r: "–" if r["explained"] is None else f"{r['explained']:.2f} (" + " ".join(  # noqa: E731
            "–" if q is None else f"{q:.2f}" for q in r["explained_by_quarter"]) + ")"
        lf = "–" if r["len_failure"] is None else f"{r['len_failure']:.0f}"
        print(f"| {r['label']} | {task} | {r['temperature']:g} | {r['execute']} | {r['trajectories']} | "
              f"{r['success']:.2f} | {r['groups_all_fail']:.2f} / {r['groups_all_success']:.2f} / "
              f"{r['groups_mixed']:.2f} | {r['spread_first_action']:.3f} | {r['greedy_gap_first_action']:.3f} | "
              f"{ls} / {lf} | {fmt(r['grad_cos'], r['grad_cos_se'])} | "
              f"{fmt(r['grad_cos_perm'], r['grad_cos_perm_se'])} | {r['pairs']} | {expl(r)} | "
              f"{kinds(r['failures'])} ({kinds(r['failures_in_mixed'])}) |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
