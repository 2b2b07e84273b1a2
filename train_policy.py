"""Policy training: SFT of the base VLA, WMPO (GRPO inside the world model), and the real-env GRPO baseline.

    python train_policy.py sft  --preset tiny                 # demos -> policy_sft.safetensors
    python train_policy.py wmpo --preset tiny                 # policy_sft + wm + reward -> policy_wmpo.safetensors
    python train_policy.py grpo-real --budget 128             # the same GRPO on P real trajectories

All three read and write one run folder (--run-dir, default runs/demo); see ../shared/INTERFACE.md.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import ddp
import envs
import wmpo
from kernels.grpo import group_advantages
from scripts.rl_signal import grad_signal  # a diagnostic, logged every iteration

# ----------------------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTArgs:
    # run
    run_dir: str = "runs/demo"
    """run folder: inputs and outputs of every step"""
    preset: Literal["tiny", "small", "gpu"] = "tiny"
    """tiny (2 CPU cores) | small | gpu (one H100): picks the demo budget and steps below when left at -1"""
    seed: int = 0
    """torch seed (demo seeds come from envs.seeds, disjoint from evaluation)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device (cuda when one is visible)"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """tasks to train on (one multi-task policy)"""
    wandb: bool = False
    """also log metrics to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works without network)"""
    # data
    demos: tuple[int, ...] = ()
    """expert demonstrations per task, in --tasks order (empty: the preset's budget)"""
    dart_noise: float = 0.3
    """DART: demos execute the expert's action plus this Gaussian noise, labelled with the clean action"""
    recovery_from: str = ""
    """a policy checkpoint whose failed rollouts at T = 0.5 the expert takes over: recovery demos (empty: none)"""
    recovery: tuple[int, ...] = ()
    """rollouts of --recovery-from per task, in --tasks order (its failures become recovery demos)"""
    # optim
    num_steps: int = -1
    """optimizer steps (-1: the preset's)"""
    batch_size: int = 64
    """(frame, action chunk) pairs per step, over all processes"""
    lr: float = 1e-3
    """peak AdamW learning rate (100 warm-up steps, cosine to 0)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    augment_px: int = 3
    """random-shift augmentation in pixels"""
    label_sigma: float = 0.0
    """targets: one-hot (0) or a Gaussian over bins of this std in bins (HL-Gauss; 0.75 per Farebrother et al. 2024)"""
    eval_every: int = 500
    """checkpoint (and resume point) interval in steps"""
    policy: wmpo.PolicyConfig = field(default_factory=wmpo.PolicyConfig)


# Demo budgets and steps (README, "Base policy"). tiny, 300 val episodes per task, executing 2 actions per look:
# 3,000 steps -> 55 / 22 / 1% (Reach / PushCube / PushTwo), 8,000 steps -> 73 / 45 / 3% (~12 min on 2 cores).
SFT_PRESETS = {
    "tiny": {"demos": (30, 300, 600), "num_steps": 8000},
    "small": {"demos": (20, 100, 200), "num_steps": 6000},
    "gpu": {"demos": (20, 100, 200), "num_steps": 20000},
}


def chunk_targets(episodes: list[dict], K: int, bins: int, vocab: list[str]):
    """Every step t of every episode -> (frame t, instruction word ids in `vocab`, tokens of actions t..t+K-1, mask
    past the end)."""
    frames, words, tokens, masks = [], [], [], []
    for ep in episodes:
        T = len(ep["actions"]) - 1  # real actions (the last row is padding)
        target = ep.get("labels", ep["actions"])  # DART demos: the clean expert's action in each visited state
        acts = np.concatenate([target[:T], np.zeros((K, 2), np.float32)])
        idx = np.arange(T)[:, None] + np.arange(K)[None]  # (T, K)
        frames.append(ep["frames"][:T])
        tokens.append(rearrange(wmpo.action_to_tokens(torch.from_numpy(acts[idx]), bins), "t k a -> t (k a)"))
        masks.append(torch.from_numpy(np.repeat(idx < T, 2, axis=1)))
        words.append(wmpo.tokenize([ep["instruction"]], vocab).expand(T, -1))
    return torch.from_numpy(np.concatenate(frames)), torch.cat(words), torch.cat(tokens), torch.cat(masks)


def collect_demos(args: SFTArgs, budgets) -> list[dict]:
    """The expert's demos per task, plus --recovery-from's recovery demos (envs.collect_demos: cached in DIR/data)."""
    base = wmpo.policy_fn(wmpo.load(args.recovery_from, expect="VLA"), 0.5) if args.recovery_from else None
    return envs.collect_demos(os.path.join(args.run_dir, "data"), args.tasks, budgets, args.dart_noise, args.seed,
                              base, args.recovery, args.recovery_from)


def sft(args: SFTArgs):
    envs.check_flags(args, positive=("batch_size", "lr", "eval_every"),
                     non_negative=("dart_noise", "augment_px", "weight_decay", "label_sigma"))
    budgets = args.demos or SFT_PRESETS[args.preset]["demos"]
    num_steps = args.num_steps if args.num_steps > 0 else SFT_PRESETS[args.preset]["num_steps"]
    recovery = len(args.recovery) if args.recovery_from else len(args.tasks)  # only checked with --recovery-from
    for flag, n in [("demos", len(budgets)), ("recovery", recovery)]:
        if n != len(args.tasks):
            raise SystemExit(f"error: --{flag} needs one number per task ({len(args.tasks)}), got {n}")
    if args.recovery_from:
        envs.require(args.recovery_from, "python train_policy.py sft --run-dir <another run folder>")
    [envs.make(t).close() for t in args.tasks]  # unknown ids fail here, before any work
    rank, world = ddp.dist_init()
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must divide over {world} processes")
    torch.manual_seed(args.seed)
    if rank == 0:  # rank 0 collects the demos and writes every file; the others read the demos it saved
        envs.write_args(args.run_dir, "sft", args)
        collect_demos(args, budgets)
    ddp.barrier()
    episodes = [ep for ep in collect_demos(args, budgets) if ep["success"][-1]]  # clone successes only
    # a new policy's words: today's vocabulary (the checkpoint then keeps it)
    frames, words, tokens, masks = chunk_targets(episodes, args.policy.chunk, args.policy.bins, wmpo.VOCAB)
    print(f"SFT on {len(episodes)} demos, {len(frames)} (frame, chunk) pairs, {num_steps} steps")

    policy = wmpo.VLA(args.policy).to(args.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ckpt = os.path.join(args.run_dir, "policy_sft.safetensors")
    state = wmpo.resume(ckpt, policy, opt, expect="VLA")  # the same command picks up where it stopped
    start = state["step"] if state else 0
    if start:
        print(f"resuming SFT from step {start}")
    net = ddp.wrap_ddp(policy)  # the policy itself in one process
    bar = tqdm(range(start, num_steps), desc="sft", initial=start, total=num_steps, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        lr = wmpo.lr_at(step, num_steps, args.lr)  # 100 warm-up steps, cosine to 0
        for g in opt.param_groups:
            g["lr"] = lr
        # the global batch is a function of (seed, step) alone: every rank draws the same one and keeps its slice,
        # so N processes train exactly like one, and a resumed run sees the batches the killed one would have
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(frames), (args.batch_size,), generator=gen)
        shifts = torch.randint(0, 2 * args.augment_px + 1, (2, args.batch_size), generator=gen)
        idx, shifts = idx[rank::world], shifts[:, rank::world]
        batch_frames = wmpo.shift_augment(frames[idx], args.augment_px, shifts) if args.augment_px else frames[idx]
        count = ddp.all_sum(masks[idx].sum().float()).item() / world
        loss, logs = net(batch_frames.to(args.device), words[idx].to(args.device), tokens[idx].to(args.device),
                         masks[idx].to(args.device), count, args.label_sigma)
        loss_all = ddp.all_sum(loss.detach())  # the global batch's loss, identical on every rank
        if not torch.isfinite(loss_all):
            raise SystemExit(f"error: SFT loss is {loss_all.item()} at step {step}; kept the last checkpoint {ckpt}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.update({"sft/loss": loss_all.item() / world}, step=step, lr=lr, dt=time.time() - t0)
        if rank == 0:
            envs.log_metrics(args.run_dir, "sft", logs)
            bar.set_postfix(loss=f"{logs['sft/loss']:.3f}", acc=f"{logs['sft/token_acc_2bins']:.2f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == num_steps:
                wmpo.save(policy, ckpt, step + 1)
                wmpo.save_train_state(ckpt.replace(".safetensors", ".train.pt"), opt, step + 1)
    ddp.barrier()
    if rank == 0:
        print(f"saved {ckpt}")


# ----------------------------------------------------------------------------------------------------------
# GRPO: in the world model (wmpo) or in the real env (grpo-real), one code path


@dataclass
class WMPOArgs:
    # run
    run_dir: str = "runs/demo"
    """run folder: reads policy_sft and train_wm.py's models and rollouts, writes the policy and metrics"""
    preset: Literal["tiny", "small", "gpu"] = "tiny"
    """tiny (2 CPU cores, <= 30 min) | small | gpu: iterations when left at -1"""
    seed: int = 0
    """torch seed of sampling and initial-state draws"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device (cuda when one is visible)"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """tasks trained together, one group batch per task per iteration"""
    wandb: bool = False
    """also log metrics to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works without network)"""
    init: str = "policy_sft"
    """checkpoint the policy starts from"""
    out: str = "policy_wmpo"
    """checkpoint written (policy_wmpo; grpo-real writes policy_grpo_real); its step files are named after it
    without "policy_" (wmpo.args.json, wmpo.metrics.jsonl; --out policy_grpo_real_p512 -> grpo_real_p512.*)"""
    # algorithm
    iterations: int = -1
    """GRPO iterations (-1: preset); grpo-real stops earlier when the real budget is spent"""
    rounds: int = 1
    """lifelong rounds: after each, `train_wm.py --round r` collects --budget new real rollouts of the current policy
    and refreshes the world and reward models on all real data so far; then WMPO runs again (1 = plain WMPO)"""
    budget: int = 128
    """P: real trajectories per lifelong round (wmpo) / in total (grpo-real)"""
    val_every: int = 5
    """every this many iterations (and after the last), real success at the rollout temperature on `val` reset seeds
    beside the imagined success: the reward-hacking check (monitoring only; nothing is chosen on it; 0: never)"""
    val_episodes: int = 50
    """real episodes per task for that check (and after each lifelong round)"""
    world_model: str = "wm"
    """world-model checkpoint imagined in (lifelong round r uses wm.round<r>, written by train_wm.py --round r)"""
    reward_model: str = "reward"
    """reward-model checkpoint that judges imagined rollouts (round r: reward.round<r>)"""
    execute: int = -1
    """actions run per chunk before the policy looks again (-1: the checkpoint's; the trained policy keeps it)"""
    sampling: Literal["", "independent", "shared"] = ""
    """how a chunk's tokens are drawn (PolicyConfig.sampling; empty: the checkpoint's; the trained policy keeps it)"""
    grad_signal_every: int = 1
    """log grad_signal (scripts/rl_signal.py: the update's signal vs a permuted-label control) every this many
    iterations (0: never)"""
    grpo: wmpo.GRPOConfig = field(default_factory=wmpo.GRPOConfig)


@dataclass
class GRPORealArgs(WMPOArgs):
    out: str = "policy_grpo_real"
    states_per_task_real: int = 1
    """initial states per task per iteration in the real env: P = 128 allows 128 // (3 tasks * 1 * 8) = 5 updates"""


WMPO_PRESETS = {"tiny": 15, "small": 60, "gpu": 200}


def val_success(policy, args: WMPOArgs) -> dict:
    """Real success on `val` seeds (never `eval`) at the rollout temperature: beside what imagination says it is."""
    logs = {}
    act = wmpo.policy_fn(policy, args.grpo.temperature, args.device)
    with torch.random.fork_rng():  # sampling here must not shift the training run's random stream
        torch.manual_seed(0)  # the same draws at every check: differences between checks are the policy's
        for t in args.tasks:
            eps = envs.collect(t, act, envs.seeds("val", t, args.val_episodes, start=5000), desc=f"val {t}")
            logs[f"val/real_success/{t}"] = float(np.mean([e["success"][-1] for e in eps]))
    logs["val/real_success"] = float(np.mean(list(logs.values())))
    return logs


def grpo_loop(args: WMPOArgs, real: bool):
    iterations = args.iterations if args.iterations > 0 else WMPO_PRESETS[args.preset]
    horizons = [envs.horizon(t) for t in args.tasks]  # unknown ids fail here, before any work
    envs.check_flags(args, positive=["budget", "rounds", "grpo.lr"],
                     non_negative=["grpo.temperature", "val_every", "grad_signal_every"],
                     at_least={"grpo.group_size": 2, "grpo.states_per_task": 1})
    # under torchrun each rank rolls out its own B groups per task (a group never spans ranks: its statistics are
    # local) and GRPO averages gradients over ranks: N processes = an N times larger batch per iteration
    rank, world_size = ddp.dist_init()
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    name = args.out.removeprefix("policy_")  # the step name of its files: wmpo, grpo_real, wmpo_r1, grpo_real_p512
    if rank == 0:
        envs.write_args(args.run_dir, name, args)
    init_path = envs.require(os.path.join(args.run_dir, f"{args.init}.safetensors"),
                             f"python train_policy.py sft --run-dir {args.run_dir}")
    policy = wmpo.load(init_path, args.device, expect="VLA")
    if args.execute > 0:
        policy.cfg.execute = min(args.execute, policy.cfg.chunk)
    policy.cfg.sampling = args.sampling or policy.cfg.sampling
    G = args.grpo.group_size
    B = args.states_per_task_real if real else args.grpo.states_per_task
    # the real env, or one world and reward model with one pool of real first frames per task
    w = None if real else wmpo.load_world(args.run_dir, args.device, args.world_model, args.reward_model)
    worlds = [envs.RealChunkEnv(t, B * G) if real else wmpo.WorldModelEnv(w.wm, w.codec, args.device, w.reward,
              wmpo.first_frames(args.run_dir, t)) for t in args.tasks]
    opt = torch.optim.AdamW(policy.parameters(), lr=args.grpo.lr, weight_decay=0.0)
    out_path = os.path.join(args.run_dir, f"{args.out}.safetensors")
    state = wmpo.resume(out_path, policy, opt, expect="VLA")
    start, used_before = (state["step"], state.get("real_trajectories", 0)) if state else (0, 0)
    for w in worlds:  # the real env goes on with fresh seeds after a resume
        w.next_seed = state.get("next_real_seed", 0) if state else 0
    print(f"resuming {name} from iteration {start}" if start else f"{name}: {iterations} iterations")
    used = used_before
    per_iteration = world_size * len(worlds) * B * G if real else 0  # real resets an iteration costs, all ranks
    final_val = None  # the last iteration's val check, when there is one (lifelong reports it)
    if rank == 0 and args.val_every and start == 0:  # the starting point of the imagined-vs-real curve
        envs.log_metrics(args.run_dir, name, {"step": -1, **val_success(policy.eval(), args)})
    bar = tqdm(range(start, iterations), desc=name, initial=start, total=iterations, disable=rank > 0)
    for it in bar:
        if used + per_iteration > args.budget:
            print(f"real budget spent: {used} of P = {args.budget} trajectories used")
            break
        t0 = time.time()
        policy.eval()
        rows, logs, n_traj, kept_groups, total_groups = [], {}, 0, 0, 0
        for attempt in range(1 + (0 if real else args.grpo.resample_rounds)):
            for w, task, horizon in zip(worlds, args.tasks, horizons):
                tr = wmpo.rollout(policy, w, horizon, B, G, args.grpo.temperature)
                adv, stats = group_advantages(tr["success"].float(), G, return_stats=True)
                rows.append(wmpo.flatten_rows(tr, adv, stats["keep"].repeat_interleave(G)))
                rows[-1]["traj"] += n_traj  # trajectory ids unique over the batch, in group order
                logs.update(wmpo.rollout_logs(tr, stats, policy.cfg.bins, task))
                n_traj += len(tr["success"])
                kept_groups, total_groups = kept_groups + int(stats["keep"].sum()), total_groups + len(stats["keep"])
            # dynamic sampling: roll out more only when under half the groups carry a learning signal
            if kept_groups * 2 >= total_groups:
                break
        used = used_before + int(ddp.all_sum(torch.tensor(sum(w.real_trajectories for w in worlds))).item())  # P
        t_roll = time.time() - t0
        batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        if world_size > 1 and kept_groups == 0:  # this rank's groups are all dropped, but it must join the gradient
            batch["adv"] = torch.zeros_like(batch["adv"])  # all-reduce of the others: its rows add zero gradient
            batch["mask"] = torch.ones_like(batch["mask"])
        policy.train()
        if args.grad_signal_every and it % args.grad_signal_every == 0 and world_size == 1:
            logs.update(grad_signal(policy, batch, G, args.grpo, args.device, seed=it))
        t_upd = time.time()  # the update's own throughput, without the diagnostic
        if ddp.all_sum(torch.tensor(kept_groups)).item() > 0:
            logs.update(wmpo.grpo_update(policy, opt, batch, args.grpo, args.device))
        logs.update({
            "step": it, "wmpo/imagined_success" if not real else "grpo/real_success":
                float(np.mean([logs[f"wmpo/success/{t}"] for t in args.tasks])),
            "wmpo/kept_group_frac": kept_groups / max(total_groups, 1),
            "wmpo/trajectories_per_s": n_traj / max(t_roll, 1e-6),
            "wmpo/tokens_per_s": logs.get("grpo/tokens", 0) / max(time.time() - t_upd, 1e-6),
            "real_trajectories": used, "dt": time.time() - t0,
        })
        if rank == 0 and args.val_every and ((it + 1) % args.val_every == 0 or it + 1 == iterations):
            logs.update(val_success(policy.eval(), args))
            final_val = {k: v for k, v in logs.items() if k.startswith("val/")} if it + 1 == iterations else None
        if rank == 0:
            envs.log_metrics(args.run_dir, name, logs)
            bar.set_postfix(succ=f"{logs.get('wmpo/imagined_success', logs.get('grpo/real_success')):.2f}",
                            kept=f"{logs['wmpo/kept_group_frac']:.2f}", clip=f"{logs.get('grpo/clipfrac', 0):.3f}")
            wmpo.save(policy, out_path, it + 1, real_trajectories=used)
            wmpo.save_train_state(out_path.replace(".safetensors", ".train.pt"), opt, it + 1, real_trajectories=used,
                                  next_real_seed=worlds[0].next_seed)
    [w.close() for w in worlds]
    ddp.barrier()
    print(f"saved {out_path} ({used} real trajectories used)" if real else f"saved {out_path}")
    return policy, final_val


# round-0 flags of train_wm.py that a lifelong refresh repeats (model sizes come from the checkpoints themselves)
REFRESH_FLAGS = ["explore_noise", "explore_per_level", "heldout_groups", "group_size", "val_share", "codec_steps",
                 "wm_steps", "wm_finetune_steps", "reward_steps", "batch_size", "lr", "motion_windows",
                 "reward_imagined", "reward_replays", "eval_every", "rollout_temperature", "window_chunks",
                 "grpo_path_states"]


def lifelong(args: WMPOArgs):
    """Round 0 is plain WMPO. Round r >= 1: `train_wm.py --round r` collects P real rollouts of the current policy
    and re-aligns round r-1's world and reward models on all real data so far (the same code and flags as round
    0, read from train_wm.args.json); then WMPO runs again from the current policy in the refreshed models. Each
    round writes its own files (wm.round<r>, reward.round<r>, wm_report.round<r>, policy_wmpo_r<r>)."""
    wm_args = json.load(open(envs.require(os.path.join(args.run_dir, "train_wm.args.json"),
                                          f"python train_wm.py --run-dir {args.run_dir}")))
    base_out = args.out
    rank, _ = ddp.dist_init()
    for r in range(args.rounds):
        if r > 0:
            args.init = base_out if r == 1 else f"{base_out}_r{r - 1}"
            cmd = [sys.executable, "train_wm.py", "--run-dir", args.run_dir, "--round", str(r), "--policy", args.init,
                   "--budget", str(args.budget), "--seed", str(args.seed), "--device", args.device, "--tasks",
                   *args.tasks]
            for k in [k for k in REFRESH_FLAGS if k in wm_args]:  # flags newer than the run folder: defaults
                v = wm_args[k]
                cmd += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
            if rank == 0:  # one process refreshes the models; the others wait for its files
                print(f"round {r}: {' '.join(cmd)}")
                subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            ddp.barrier()
            args.world_model, args.reward_model = f"wm.round{r}", f"reward.round{r}"
        args.out = base_out if r == 0 else f"{base_out}_r{r}"
        policy, res = grpo_loop(args, real=False)
        if rank > 0:  # rank 0 alone measures and writes the round's row; the others go on to the next round
            continue
        res = res or val_success(policy.eval(), args)  # the loop's last check: same policy, seeds
        files = ["budget.json"] + [f"budget.round{q}.json" for q in range(1, r + 1)]
        paid = [json.load(open(os.path.join(args.run_dir, f))) for f in files]
        row = {"round": r, "checkpoint": args.out, "world_model": args.world_model,
               "real_trajectories": sum(b["real_trajectories"] for b in paid), **res}  # cumulative, as counted
        print(f"round {r}: val real success {res['val/real_success']:.1%} "
              f"({args.val_episodes} episodes per task at T = {args.grpo.temperature:g})")
        envs.log_metrics(args.run_dir, "lifelong", row)


if __name__ == "__main__":
    import tyro

    args = tyro.extras.subcommand_cli_from_dict({"sft": SFTArgs, "wmpo": WMPOArgs, "grpo-real": GRPORealArgs})
    try:
        if isinstance(args, WMPOArgs):  # wmpo, or grpo-real (GRPORealArgs): the same loop in another world
            real = isinstance(args, GRPORealArgs)  # grpo-real has no lifelong rounds
            lifelong(args) if args.rounds > 1 and not real else grpo_loop(args, real)
        else:
            sft(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: one clear line, non-zero exit
        raise SystemExit(f"error: {e}")
