"""Is imagination cheaper than reality? GRPO's rollout (wmpo.rollout) of one batch of B initial states x G samples,
timed in the real env (envs.RealChunkEnv) and in the world model (wmpo.WorldModelEnv) on the same machine in one run,
and where imagination's time goes: the codec (encode / decode), the dynamics (WorldModel.next_latents), the reward
model (judge) and the policy (act). Issue 38: imagined trajectories per second must reach the real env's.

    python scripts/bench_imagine.py                         # untrained models at the tiny preset's shapes
    python scripts/bench_imagine.py --run-dir runs/tiny-s0  # the run's trained policy, world and reward models

Speed does not depend on the weights, so the untrained models measure the same cost; a run folder adds its own
shapes (and imagination from its real first frames). Prints a markdown table; nothing is written.
"""

import collections
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import wmpo  # noqa: E402


@dataclass
class Args:
    run_dir: str = ""
    """run folder with policy_sft, wm, codec and reward checkpoints (empty: untrained models, default configs)"""
    task: str = "wmpo/PushCube-v0"
    """task whose horizon and first frames are rolled out"""
    states: int = 8
    """B initial states"""
    group: int = 8
    """G samples per initial state"""
    execute: int = 8
    """E actions run per chunk (the real env and the world model both step E at a time)"""
    temperature: float = 1.0
    """policy sampling temperature"""
    bins: int = 16
    """action bins of the untrained policy (ignored with --run-dir)"""
    context_from: str = "frames"
    """the untrained world model's next context (WorldModelConfig.context_from: frames re-encodes each chunk, latents
    does not; ignored with --run-dir)"""
    threads: int = 0
    """torch threads (0: torch's default, all cores)"""


def timed(obj, name: str, label: str, clock: collections.Counter):
    """Wrap obj.name so each call adds its wall time to clock[label]."""
    f = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        clock[label] += time.perf_counter() - t
        return out

    setattr(obj, name, wrapper)


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run_dir:
        policy = wmpo.load(envs.require(os.path.join(args.run_dir, "policy_sft.safetensors"),
                                        f"python train_policy.py sft --run-dir {args.run_dir}"), expect="VLA").eval()
        world = wmpo.load_world(args.run_dir, reward_model="reward", starts=wmpo.first_frames(args.run_dir, args.task))
    else:
        policy = wmpo.VLA(wmpo.PolicyConfig(bins=args.bins)).eval()
        first = envs.RealChunkEnv(args.task, args.states)  # imagination starts from real first frames
        starts = first.start(args.states, 1)
        first.close()
        world = wmpo.WorldModelEnv(wmpo.WorldModel(wmpo.WorldModelConfig(context_from=args.context_from)).eval(),
                                   wmpo.FrameCodec(wmpo.CodecConfig()).eval(), reward=wmpo.RewardModel(
                                       wmpo.RewardConfig()).eval(), starts=starts)
    policy.cfg.execute = args.execute
    horizon, n = envs.horizon(args.task), args.states * args.group
    clock, rows = collections.Counter(), []
    for obj, fn, label in [(world.codec, "encode", "codec encode"), (world.codec, "decode", "codec decode"),
                           (world.wm, "next_latents", "dynamics"), (world, "judge", "reward model"),
                           (policy, "act", "policy")]:
        timed(obj, fn, label, clock)
    real = envs.RealChunkEnv(args.task, n)
    for name, w in [("real env", real), ("world model", world)]:
        clock.clear()
        t = time.perf_counter()
        with torch.no_grad():
            tr = wmpo.rollout(policy, w, horizon, args.states, args.group, args.temperature)
        total = time.perf_counter() - t
        rows.append((name, total, n / total, tr["success"].float().mean().item(), dict(clock)))
    real.close()
    print(f"{args.task}, B {args.states} x G {args.group}, horizon {horizon}, E {args.execute}, T {args.temperature}, "
          f"{torch.get_num_threads()} threads, {'models of ' + args.run_dir if args.run_dir else 'untrained models'}\n")
    print("| world | seconds | trajectories / s | success | where the time goes |\n|---|---|---|---|---|")
    for name, total, rate, succ, parts in rows:
        where = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        rest = 100 * (1 - sum(parts.values()) / total)  # the real env's simulator and renderer; python glue
        print(f"| {name} | {total:.1f} | {rate:.2f} | {succ:.2f} | {where}, rest {rest:.0f}% |")
    print(f"\nimagined / real trajectories per second: {rows[1][2] / rows[0][2]:.2f} (issue 38's gate: >= 1)")


if __name__ == "__main__":
    main(tyro.cli(Args))
