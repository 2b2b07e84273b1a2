"""Policy training: SFT of the base VLA, WMPO (GRPO inside the world model), and the real-env GRPO baseline.

    python train_policy.py sft  --preset tiny                 # demos -> policy_sft.safetensors
    python train_policy.py wmpo --preset tiny                 # policy_sft + wm + reward -> policy_wmpo.safetensors
    python train_policy.py grpo-real --budget 128             # the same GRPO on P real trajectories

All three read and write one run folder (--run-dir, default runs/demo); see ../shared/INTERFACE.md.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import envs
import wmpo

# ----------------------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTArgs:
    # run
    run_dir: str = "runs/demo"
    """run folder: inputs and outputs of every step"""
    preset: str = "tiny"
    """tiny (2 CPU cores) | small | gpu (one H100): picks the demo budget and steps below when left at -1"""
    seed: int = 0
    """torch seed (demo seeds come from envs.seeds, disjoint from evaluation)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """tasks to train on (one multi-task policy)"""
    # data
    demos: tuple[int, ...] = ()
    """expert demonstrations per task, in --tasks order (empty: the preset's budget)"""
    dart_noise: float = 0.3
    """DART: demos execute the expert's action plus this Gaussian noise, labelled with the clean action"""
    # optim
    num_steps: int = -1
    """optimizer steps (-1: the preset's)"""
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment_px: int = 3
    """random-shift augmentation in pixels"""
    eval_every: int = 500
    """checkpoint (and resume point) interval in steps"""
    policy: wmpo.PolicyConfig = field(default_factory=wmpo.PolicyConfig)


# Demo budgets per task leave the base policy 20-60% real success on each task (README, "Base policy").
SFT_PRESETS = {
    "tiny": {"demos": (30, 300, 600), "num_steps": 3000},
    "small": {"demos": (20, 100, 200), "num_steps": 6000},
    "gpu": {"demos": (20, 100, 200), "num_steps": 20000},
}


def chunk_targets(episodes: list[dict], K: int, bins: int):
    """Every step t of every episode -> (frame t, instruction, tokens of actions t..t+K-1, mask past the end)."""
    frames, words, tokens, masks = [], [], [], []
    for ep in episodes:
        T = len(ep["actions"]) - 1  # real actions (the last row is padding)
        target = ep.get("labels", ep["actions"])  # DART demos: the clean expert's action in each visited state
        acts = np.concatenate([target[:T], np.zeros((K, 2), np.float32)])
        idx = np.arange(T)[:, None] + np.arange(K)[None]  # (T, K)
        frames.append(ep["frames"][:T])
        tokens.append(rearrange(wmpo.action_to_tokens(torch.from_numpy(acts[idx]), bins), "t k a -> t (k a)"))
        masks.append(torch.from_numpy(np.repeat(idx < T, 2, axis=1)))
        words.append(wmpo.tokenize([ep["instruction"]]).expand(T, -1))
    return torch.from_numpy(np.concatenate(frames)), torch.cat(words), torch.cat(tokens), torch.cat(masks)


def collect_demos(args: SFTArgs, budgets) -> list[dict]:
    data_dir = os.path.join(args.run_dir, "data")
    episodes = []
    for task, n in zip(args.tasks, budgets):
        name = task.split("/")[1].lower()
        path = os.path.join(data_dir, f"demos-{name}-{n}-dart{args.dart_noise:g}.safetensors")
        if os.path.exists(path):
            eps = envs.load_episodes(path)  # reuse: same task, same budget, same seeds
        else:
            expert = envs.expert_policy(args.dart_noise, seed=args.seed, dart=args.dart_noise > 0)
            eps = envs.collect(task, expert, envs.seeds("demos", task, n), desc=f"demos {task}")
            envs.save_episodes(path, eps, policy="expert", dart_noise=args.dart_noise)
        print(f"{task}: {len(eps)} demos, expert success {np.mean([e['success'][-1] for e in eps]):.0%}")
        episodes += eps
    return episodes


def sft(args: SFTArgs):
    preset = SFT_PRESETS[args.preset]
    budgets = args.demos or preset["demos"]
    num_steps = args.num_steps if args.num_steps > 0 else preset["num_steps"]
    if len(budgets) != len(args.tasks):
        raise SystemExit(f"error: --demos needs one number per task ({len(args.tasks)}), got {len(budgets)}")
    for t in args.tasks:
        envs.make(t).close()  # unknown ids fail here, before any work
    torch.manual_seed(args.seed)
    wmpo.write_args(args.run_dir, "sft", args)
    episodes = [ep for ep in collect_demos(args, budgets) if ep["success"][-1]]  # clone successes only
    frames, words, tokens, masks = chunk_targets(episodes, args.policy.chunk, args.policy.bins)
    print(f"SFT on {len(episodes)} demos, {len(frames)} (frame, chunk) pairs, {num_steps} steps")

    policy = wmpo.VLA(args.policy).to(args.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ckpt = os.path.join(args.run_dir, "policy_sft.safetensors")
    start = 0
    state = wmpo.load_train_state(ckpt.replace(".safetensors", ".train.pt"))
    if state is not None and os.path.exists(ckpt):  # resume: same command picks up where it stopped
        policy.load_state_dict(wmpo.load(ckpt, expect="VLA").state_dict())
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        print(f"resuming SFT from step {start}")

    bar = tqdm(range(start, num_steps), desc="sft", initial=start, total=num_steps)
    for step in bar:
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / num_steps))  # warmup + cosine
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(frames), (args.batch_size,))
        batch_frames = wmpo.shift_augment(frames[idx], args.augment_px) if args.augment_px else frames[idx]
        loss, logs = policy(batch_frames.to(args.device), words[idx].to(args.device), tokens[idx].to(args.device), masks[idx].to(args.device))
        if not torch.isfinite(loss):
            raise SystemExit(f"error: SFT loss is {loss.item()} at step {step}; kept the last checkpoint {ckpt}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.update(step=step, lr=lr, dt=time.time() - t0)
        wmpo.log_metrics(args.run_dir, "sft", logs)
        bar.set_postfix(loss=f"{logs['sft/loss']:.3f}", acc=f"{logs['sft/token_acc_2bins']:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == num_steps:
            wmpo.save(policy, ckpt, step + 1)
            wmpo.save_train_state(ckpt.replace(".safetensors", ".train.pt"), opt, step + 1)
    print(f"saved {ckpt}")


if __name__ == "__main__":
    import tyro

    args = tyro.extras.subcommand_cli_from_dict({"sft": SFTArgs})
    if isinstance(args, SFTArgs):
        sft(args)
