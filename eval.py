"""Real-environment evaluation: success rate of policy checkpoints on every task, with videos.

    python eval.py --checkpoints policy_sft policy_wmpo --episodes 500                 # greedy
    python eval.py --checkpoints policy_sft policy_wmpo --episodes 500 --temperatures 0 1.6

    python eval.py --checkpoints policy_sft policy_grpo_real policy_wmpo --suite generalisation --episodes 500

Writes into the run folder: eval.json (per checkpoint, task: success rate, 95% Wilson interval, episodes, mean
length of successful episodes, recovery rate; merged with what an earlier evaluation wrote there), eval.md (the
checkpoints side by side) and videos/<checkpoint>-<task>.gif (a few episodes, border green on success, red on
failure) plus videos/recoveries-<checkpoint>-<task>.gif (the successful episodes with the largest setbacks).
Evaluation seeds (envs.seeds("eval", ...)) are disjoint from every seed used for demos, rollouts and training.
A temperature T > 0 is reported under "<checkpoint>@T<T>".

--suite generalisation evaluates on the perturbed variants of the tasks (envs.SHIFTS: the pusher starts outside
the training range, a brown table, checkered objects), never used for training, and writes the paper's Table 2
layout (checkpoint x shift, mean over tasks) to eval.json (keys "generalisation/<Shift>" and "generalisation/mean"
under each checkpoint) and eval_generalisation.md.
Self-correction: an episode has a setback when the summed distance of the instructed objects to their goals rises
--setback-cm above its best so far (a block knocked off line or off its pad, an overshoot); the recovery rate is
the share of successful episodes that had one.
"""

import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import envs
import wmpo


@dataclass
class Args:
    run_dir: str = "runs/demo"
    """run folder holding the checkpoints"""
    preset: Literal["tiny", "small", "gpu"] = "tiny"
    """accepted for symmetry with the other scripts; evaluation does not depend on it"""
    checkpoints: tuple[str, ...] = ("policy_sft",)
    """checkpoint names in the run folder (without .safetensors)"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """task ids to evaluate (the generalisation suite evaluates their perturbed variants)"""
    episodes: int = 100
    """episodes per task (use >= 500 for results that are compared: standard error ~2 points)"""
    temperatures: tuple[float, ...] = (0.0,)
    """0 = greedy (argmax tokens); the paper rolls out at 1.6"""
    num_envs: int = 16
    """vectorised envs per task"""
    videos: int = 4
    """episodes per task shown in each GIF (0: none)"""
    seed: int = 0
    """sampling seed at T > 0; each (checkpoint, task, temperature) draws from its own seed derived from it, so a
    score never depends on which checkpoints were evaluated before"""
    execute: int = 0
    """actions of each chunk run before re-planning (0: the checkpoint's own, PolicyConfig.execute)"""
    sampling: Literal["", "independent", "shared"] = ""
    """how a chunk's tokens are drawn at T > 0 (empty: the checkpoint's own, PolicyConfig.sampling)"""
    split: Literal["eval", "val"] = "eval"
    """reset seeds: eval (reported numbers only) | val (for choosing checkpoints, rounds or levers; disjoint)"""
    device: str = "cpu"
    """torch device of the policy"""
    out: str = ""
    """output name: <out>.json and <out>.md in the run folder (default: the split, eval or val)"""
    suite: Literal["tasks", "generalisation"] = "tasks"
    """tasks: --tasks as they are | generalisation: their perturbed variants (envs.SHIFTS), never seen in training"""
    setback_cm: float = 2.0
    """recovery detector: a successful episode whose goal distance rose this far above its best so far"""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def setback(dist: np.ndarray) -> float:
    """Largest rise of a goal-distance trace above its running minimum (m): how far the episode went backwards."""
    return float((dist - np.minimum.accumulate(dist)).max())


def summarize(episodes: list[dict], setback_m: float = 0.02) -> dict:
    """Success rate with its Wilson interval, mean success length, and self-correction: the share of successful
    episodes that first moved an object at least `setback_m` away from its goal (a block knocked off line or off
    its pad, a pusher overshooting) and still succeeded."""
    succ = np.array([bool(ep["success"][-1]) for ep in episodes])
    lens = np.array([len(ep["actions"]) - 1 for ep in episodes])
    lo, hi = wilson(int(succ.sum()), len(succ))
    backs = np.array([setback(envs.goal_distance(ep["task"], ep["instruction"], ep["object_pos"])) for ep in episodes])
    recovered = succ & (backs >= setback_m)
    return {
        "success_rate": float(succ.mean()),
        "ci95": [lo, hi],
        "episodes": len(succ),
        "mean_success_len": float(lens[succ].mean()) if succ.any() else None,
        "recovery_rate": float(recovered.sum() / max(succ.sum(), 1)),  # of successful episodes
        "setback_rate": float((backs >= setback_m).mean()),  # of all episodes
    }


def video(episodes: list[dict], path: str, scale: int = 2) -> None:
    """A row of episodes as one GIF; each tile gets a green (success) or red (failure) border once it ends."""
    import imageio

    T = max(len(ep["frames"]) for ep in episodes)
    tiles = []
    for ep in episodes:
        f = np.concatenate([ep["frames"], np.repeat(ep["frames"][-1:], T - len(ep["frames"]), 0)])
        f = np.pad(f.repeat(scale, 1).repeat(scale, 2), ((0, 0), (3, 3), (3, 3), (0, 0)))
        color = np.array([40, 220, 40] if ep["success"][-1] else [230, 40, 40], np.uint8)
        end = len(ep["frames"]) - 1
        for t in range(end, T):  # border from the last real frame on
            f[t, :3], f[t, -3:], f[t, :, :3], f[t, :, -3:] = color, color, color, color
        tiles.append(f)
    grid = np.concatenate(tiles, axis=2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, list(grid), duration=0.1, loop=0)


def evaluate(policy: wmpo.VLA, task: str, n: int, temperature: float, num_envs: int, device="cpu", split="eval",
             seed: int = 0, name: str = "") -> list[dict]:
    """n episodes of `policy` on `split` reset seeds. Sampling draws from a seed of its own per (name, task,
    temperature), so evaluating A then B gives B the score it gets alone (issue 15)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{name}/{task}/{temperature:g}".encode()))
    fn = wmpo.policy_fn(policy, temperature, device)
    return envs.collect(task, fn, envs.seeds(split, task, n), num_envs=num_envs, desc=f"{split} {task} T={temperature}")


def generalisation_rows(results: dict, tasks: list[str], episodes: int) -> dict:
    """The paper's Table 2 layout, stored per checkpoint beside its tasks (every top-level key stays a checkpoint):
    "generalisation/<Shift>" = success over the tasks' variants with that shift, "generalisation/mean" = over all."""
    out = {}
    for name, res in results.items():
        row = {s: float(np.mean([res[envs.variant(t, s)]["success_rate"] for t in tasks])) for s in envs.SHIFTS}
        row["mean"] = float(np.mean(list(row.values())))
        n = {s: episodes * len(tasks) for s in envs.SHIFTS} | {"mean": episodes * len(tasks) * len(envs.SHIFTS)}
        out[name] = {f"generalisation/{s}": {"success_rate": v, "episodes": n[s]} for s, v in row.items()}
    return out


def generalisation_markdown(merged: dict) -> str:
    """Every checkpoint in eval.json with a generalisation row: checkpoint x shift."""
    cols = [*envs.SHIFTS, "mean"]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in merged.items():
        if "generalisation/mean" in res:
            rates = [f"{res[f'generalisation/{c}']['success_rate']:.1%}" for c in cols]
            lines.append(f"| {name} | " + " | ".join(rates) + " |")
    return "\n".join(lines) + "\n"


def recovery_gif(episodes: list[dict], path: str, n: int = 4) -> None:
    """The clearest recoveries: successful episodes with the largest setbacks."""
    succ = [ep for ep in episodes if ep["success"][-1]]
    succ.sort(key=lambda ep: -setback(envs.goal_distance(ep["task"], ep["instruction"], ep["object_pos"])))
    if succ:
        video(succ[:n], path)


def markdown(results: dict, tasks: list[str]) -> str:
    names = list(results)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in tasks + ["mean"]:
        cells = []
        for name in names:
            r = results[name][task]
            ci = f" [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]" if "ci95" in r else ""
            cells.append(f"{r['success_rate']:.1%}{ci}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| episodes per task | " + " | ".join(str(results[n][tasks[0]]["episodes"]) for n in names) + " |")
    lines.append("| recovered after a setback (of successes) | " + " | ".join(
        "/".join(f"{results[n][t]['recovery_rate']:.0%}" for t in tasks) for n in names) + " |")
    lines.append("| mean success length | " + " | ".join(
        "/".join(f"{results[n][t]['mean_success_len']:.1f}" if results[n][t]["mean_success_len"] else "-"
                 for t in tasks)
        for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args):
    if args.suite not in ("tasks", "generalisation"):
        raise ValueError(f"--suite must be tasks or generalisation, got {args.suite!r}")
    if args.split not in ("eval", "val"):
        raise ValueError(f"--split must be eval or val, got {args.split!r}")
    args.out = args.out or args.split
    base_tasks = list(args.tasks)
    if args.suite == "generalisation":
        args.tasks = tuple(envs.variant(t, s) for t in base_tasks for s in envs.SHIFTS)
    for t in args.tasks:
        envs.make(t).close()  # an unknown id fails before any work
    results = {}
    for name in args.checkpoints:
        path = envs.require(os.path.join(args.run_dir, f"{name}.safetensors"),
                            "python train_policy.py sft (or wmpo / grpo-real) --run-dir " + args.run_dir)
        policy = wmpo.load(path, args.device, expect="VLA").eval()
        if args.execute:
            if not 0 < args.execute <= policy.cfg.chunk:
                raise ValueError(f"--execute must be in 1..{policy.cfg.chunk}, got {args.execute}")
            policy.cfg.execute = args.execute
        policy.cfg.sampling = args.sampling or policy.cfg.sampling
        for temp in args.temperatures:
            key = name if temp == 0 else f"{name}@T{temp:g}"
            results[key] = {}
            for task in args.tasks:
                eps = evaluate(policy, task, args.episodes, temp, args.num_envs, args.device, args.split, args.seed,
                               name)
                results[key][task] = summarize(eps, args.setback_cm / 100)
                r = results[key][task]
                print(f"{key:24s} {task:20s} success {r['success_rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"
                      f" n={r['episodes']}")
                if args.videos:
                    video(eps[: args.videos], os.path.join(args.run_dir, "videos", f"{key}-{task.split('/')[1]}.gif"))
                    recovery_gif(eps, os.path.join(args.run_dir, "videos",
                                                   f"recoveries-{key}-{task.split('/')[1]}.gif"))
            rates = [results[key][t]["success_rate"] for t in args.tasks]
            results[key]["mean"] = {"success_rate": float(np.mean(rates)), "episodes": args.episodes * len(args.tasks)}
    md = markdown(results, list(args.tasks))
    # merged into <out>.json: evaluations of other checkpoints, tasks or suites already there are kept
    path = os.path.join(args.run_dir, f"{args.out}.json")
    try:
        merged = json.load(open(path)) if os.path.exists(path) else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start a new one") from e
    if args.suite == "generalisation":
        for key, rows in generalisation_rows(results, base_tasks, args.episodes).items():
            del results[key]["mean"]  # "mean" stays the unshifted tasks' mean (the tasks suite's)
            results[key].update(rows)
    for key, res in results.items():
        merged.setdefault(key, {}).update(res)
    if args.suite == "generalisation":
        md = generalisation_markdown(merged) + "\n" + md  # every checkpoint evaluated so far
    data = json.dumps(merged, indent=2)
    envs.atomic_write(path, lambda tmp: open(tmp, "w").write(data))
    md_name = args.out if args.suite == "tasks" else f"{args.out}_generalisation"
    envs.atomic_write(os.path.join(args.run_dir, f"{md_name}.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, non-zero exit, nothing written
        raise SystemExit(f"error: {e}")
