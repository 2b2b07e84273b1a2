"""Collect real data, train the frame codec, the world model and the reward model, and measure their fidelity.

    python train_wm.py --check                        # <= 5 min: does the world model follow its actions? (no policy)
    python train_wm.py --preset tiny                  # needs policy_sft.safetensors (python train_policy.py sft)
    python train_wm.py --budget 1280                  # P real rollouts of the base policy for behaviour alignment

Data (all real, in DIR/data): expert demos (from SFT), noisy-expert episodes at several noise levels (contact-rich;
not policy rollouts: not counted in P), P rollouts of the base policy (behaviour alignment), validation rollouts (the
reward threshold), held-out groups of G rollouts from shared initial states (the report; never trained on). All but
the demos run the task's full horizon, as imagined rollouts do. The world model is trained teacher-forced, then
unrolled on its own predictions (H = 2 -> 4 -> 8: straight to 8 fell back to copying the last frame). The reward
model learns from real clips and from imagined replays of training episodes labelled with what really happened (so
it learns the world model's bias). Writes codec / wm / reward (+ reward_real, real frames only) .safetensors,
wm_report.json (keys in ../shared/INTERFACE.md) and videos/wm_<task>.gif (real | imagined).
"""

import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

import ddp
import envs
import fidelity
import wmpo


@dataclass
class Args:
    # run
    run_dir: str = "runs/demo"
    """run folder: reads the policy checkpoint and data/, writes models, report and videos"""
    preset: Literal["tiny", "small", "gpu"] = "tiny"
    """tiny: 2 CPU cores, ~30 min | small | gpu: fills in every field left at -1"""
    seed: int = 0
    """seed of data order, noise and initialisation"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """task ids to collect and train on"""
    wandb: bool = False
    """also log metrics to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works without network)"""
    round: int = 0
    """lifelong round r >= 1: refresh round r-1's world and reward models instead of training from scratch, on P new
    rollouts of --policy plus all real data so far, with the same stages and flags as round 0 (train_policy.py wmpo
    --rounds N runs this); writes wm.round<r>, reward.round<r>, wm_report.round<r> and never overwrites round 0"""
    policy: str = "policy_sft"
    """checkpoint in the run folder whose rollouts are collected (round 0: the base policy)"""
    check: bool = False
    """the <= 5-minute diagnostic (PushCube, noisy-expert data only): pusher error at h=8 with true vs shuffled
    actions after a short training with its own lr, warm-up, batches and curriculum; run it before every long run"""
    # data
    budget: int = 128
    """P: every real trajectory drawn with the policy that trains or chooses anything (alignment rollouts plus
    validation rollouts), split evenly over tasks; held-out report trajectories only measure and are not counted"""
    rollout_temperature: float = 0.5
    """temperature of the base policy's rollouts (the same as WMPO's, GRPOConfig.temperature)"""
    explore_noise: tuple[float, ...] = (0.3, 0.7, 1.2)
    """action-noise levels of the exploratory noisy-expert episodes"""
    explore_per_level: int = -1
    """exploratory episodes per task and noise level (-1: preset)"""
    val_share: float = 0.25
    """share of each task's budget spent on validation rollouts (full horizon) that choose the reward threshold;
    the rest are alignment rollouts"""
    heldout_groups: int = 64
    """held-out initial states per task, each rolled out G times, full horizon: the fidelity report"""
    group_size: int = 8
    """G: rollouts per held-out initial state (advantage correlation is computed within groups)"""
    grpo_path_states: int = 16
    """initial states (x G) the report imagines as GRPO does: the policy in the loop, full horizon, reward model"""
    # optim
    codec_steps: int = -1
    """codec steps (-1: preset)"""
    wm_steps: int = -1
    """world-model steps on all real data: teacher forcing, then the unroll curriculum (-1: preset)"""
    wm_finetune_steps: int = -1
    """then unrolled (H=8) steps on 3/4 base-policy rollouts + 1/4 everything (alignment; -1: preset)"""
    reward_steps: int = -1
    """reward-model steps (-1: preset)"""
    batch_size: int = 16
    """world-model windows (C+K frames each) per step; reward clips and codec frames use 8x this"""
    lr: float = 1e-3
    """peak learning rate (warm-up 100 steps, cosine to 0.1x); unrolled stages use 0.4x"""
    curriculum: tuple[float, float, float] = (0.25, 0.4, 0.55)
    """fractions of --wm-steps where the unroll length switches 1 -> 2 -> 4 -> 8"""
    window_chunks: int = 1
    """chunks per window in the unrolled stages: each chunk's context is made from the one before it exactly as in
    imagination (WorldModelConfig.context_from); teacher forcing keeps one chunk"""
    full_horizon: bool = True
    """noisy-expert and alignment episodes run to the task's horizon past success, as imagined rollouts do (False:
    they stop at success, the data of world models before v3)"""
    motion_windows: float = 0.5
    """fraction of world-model windows whose future holds block motion (contact is rare in uniform windows)"""
    reward_imagined: float = 0.5
    """fraction of reward clips cut from imagined replays of training episodes, labelled with the real outcome"""
    reward_replays: int = 96
    """training episodes per task replayed in the world model for the reward model"""
    eval_every: int = 250
    """checkpoint interval in steps"""
    warmup: int = 100
    """linear learning-rate warm-up steps of every stage (--check: 20, its stages are a few hundred steps)"""
    codec: wmpo.CodecConfig = field(default_factory=wmpo.CodecConfig)
    wm: wmpo.WorldModelConfig = field(default_factory=wmpo.WorldModelConfig)
    reward: wmpo.RewardConfig = field(default_factory=wmpo.RewardConfig)


PRESETS = {
    "tiny": dict(explore_per_level=100, codec_steps=1500, wm_steps=1800, wm_finetune_steps=200, reward_steps=1000),
    "small": dict(explore_per_level=200, codec_steps=3000, wm_steps=5000, wm_finetune_steps=500, reward_steps=2000),
    "gpu": dict(explore_per_level=600, codec_steps=20000, wm_steps=40000, wm_finetune_steps=4000, reward_steps=8000),
}


def budget_split(args: Args) -> tuple[int, int]:
    """Per task: (alignment rollouts, validation rollouts), together at most budget / tasks real trajectories."""
    per_task = args.budget // len(args.tasks)
    n_val = max(1, round(per_task * args.val_share))
    if per_task - n_val < 1:
        raise SystemExit(f"error: --budget {args.budget} leaves no alignment rollout on {len(args.tasks)} tasks "
                         f"after {n_val} validation rollouts each (--val-share {args.val_share})")
    return per_task - n_val, n_val


def collect_all(args: Args, policy) -> dict[str, list[dict]]:
    """Every real data set of this round, collected once (and read back from DIR/data after that). Round r draws
    new rollout and validation seeds (offset 1000 r) and the same held-out initial states as round 0."""
    data_dir = os.path.join(args.run_dir, "data")
    sets = {"demos": [], "explore": [], "rollouts": [], "val": [], "heldout": []}
    n_roll, n_val = budget_split(args)
    act = wmpo.policy_fn(policy, args.rollout_temperature, args.device) if policy is not None else None
    r, sfx = args.round, data_suffix(args.round)
    meta = dict(policy=args.policy, temperature=args.rollout_temperature)
    for task in args.tasks:
        name = envs.task_name(task)
        if policy is not None:
            sets["demos"] += envs.load_dir(data_dir, f"demos-{name}")
        for i, noise in enumerate(args.explore_noise):
            n = args.explore_per_level
            sets["explore"] += envs.collect_cached(
                os.path.join(data_dir, f"explore-{name}-{noise:g}-{n}.safetensors"), task,
                envs.expert_policy(noise, seed=i), envs.seeds("explore", task, n, start=i * 2000),
                f"explore {name} σ={noise}", args.full_horizon, policy=f"expert+noise {noise}")
        if policy is None:  # --check: noisy-expert data only
            continue
        sets["rollouts"] += envs.collect_cached(os.path.join(data_dir, f"rollouts-{name}-{n_roll}{sfx}.safetensors"),
                                                task, act, envs.seeds("rollouts", task, n_roll, start=1000 * r),
                                                f"rollouts {name}", args.full_horizon, **meta)
        sets["val"] += envs.collect_cached(os.path.join(data_dir, f"val-{name}-{n_val}{sfx}.safetensors"), task, act,
                                           envs.seeds("val", task, n_val, start=1000 * r), f"val {name}",
                                           full_horizon=True, **meta)
        # held-out groups: each initial state rolled out G times (consecutive episodes form a group)
        seeds = [s for s in envs.seeds("heldout", task, args.heldout_groups) for _ in range(args.group_size)]
        sets["heldout"] += envs.collect_cached(
            os.path.join(data_dir, f"heldout-{name}-{args.heldout_groups}x{args.group_size}{sfx}.safetensors"),
            task, act, seeds, f"heldout {name}", full_horizon=True, **meta)
    fidelity.print_census(fidelity.data_census(sets))
    if policy is not None and not sets["demos"]:
        raise SystemExit(f"error: no demos in {data_dir}; make them first with: "
                         f"python train_policy.py sft --run-dir {args.run_dir}")
    return sets


def earlier_rounds(args: Args, prefix: str) -> list[dict]:
    """The rollouts (or validation episodes) rounds 0..r-1 collected: lifelong refreshes train on all real data."""
    data_dir = os.path.join(args.run_dir, "data")
    n = budget_split(args)[prefix != "rollouts"]  # (alignment, validation) rollouts per task
    eps = []
    for t in args.tasks:
        for q in range(args.round):
            path = os.path.join(data_dir, f"{prefix}-{envs.task_name(t)}-{n}{data_suffix(q)}.safetensors")
            eps += envs.load_episodes(envs.require(path, f"python train_wm.py --run-dir {args.run_dir} --round {q}"))
    return eps


def data_suffix(r: int) -> str:
    """Round r's data shards carry '-round<r>' (rollouts-pushcube-v0-24-round1.safetensors); round 0's none."""
    return f"-round{r}" if r else ""


# ----------------------------------------------------------------------------------------------------------


def train_world_model(args, codec, train_eps, policy_eps, B, wm=None, out="wm"):
    """Round 0: teacher forcing, then the unroll curriculum on all real data (wm_pretrain). Every round: unrolled
    (H = 8) alignment on 3/4 the policy's rollouts + 1/4 everything, from round r-1's model in round r."""
    def windows(eps):
        with torch.no_grad():
            z = [codec.encode(torch.from_numpy(e["frames"]).to(args.device)) for e in eps]
        return wmpo.Windows(z, [torch.from_numpy(e["actions"]).to(args.device) for e in eps], eps, C, K,
                            args.motion_windows)

    C, K = (wm.cfg.context, wm.cfg.chunk) if wm is not None else (args.wm.context, args.wm.chunk)
    w_all = windows(train_eps)
    fit = lambda model, name, steps, loss_fn, lr, stage, **kw: wmpo.fit(  # noqa: E731
        model, os.path.join(args.run_dir, f"{name}.safetensors"), steps, loss_fn, lr, args.run_dir,
        f"train_wm{suffix(args)}", stage, args.eval_every, warmup=args.warmup, **kw)
    if wm is None:
        bounds = [int(f * args.wm_steps) for f in args.curriculum]
        unroll_at = lambda step: [0, 2, 4, 8][sum(step >= b for b in bounds)]  # noqa: E731
        wm = wmpo.WorldModel(args.wm).to(args.device)
        chunks = lambda step: 1 if unroll_at(step) == 0 else args.window_chunks  # noqa: E731
        wm = fit(wm, "wm_pretrain", args.wm_steps,
                 lambda net, step: net(*w_all.sample(B, chunks(step)), unroll_at(step), codec), args.lr, "wm",
                 lr_mult=lambda step: 1.0 if unroll_at(step) == 0 else 0.4)
    if policy_eps and args.wm_finetune_steps > 0:
        w_pol = windows(policy_eps)

        def aligned(net, step):  # 3/4 policy rollouts, 1/4 everything else (no forgetting of rarer contacts)
            zp, ap = w_pol.sample(3 * B // 4, args.window_chunks)
            za, aa = w_all.sample(B - len(zp), args.window_chunks)
            return net(torch.cat([zp, za]), torch.cat([ap, aa]), 8, codec)

        wm = fit(wm.train().requires_grad_(True), out, args.wm_finetune_steps, aligned, args.lr * 0.3,
                 f"wm-align{suffix(args)}")
    else:
        wmpo.save(wm, os.path.join(args.run_dir, f"{out}.safetensors"), args.wm_steps)
    return wm.eval().requires_grad_(False)


def train_codec(args, frames, world):
    args.codec.table_rgb = tuple((frames[:2000].reshape(-1, 3).float().median(0).values / 127.5 - 1).tolist())
    codec = wmpo.FrameCodec(args.codec).to(args.device)
    codec = wmpo.fit(codec, os.path.join(args.run_dir, "codec.safetensors"), args.codec_steps,
                     lambda net, step: net(frames[torch.randint(len(frames), (8 * args.batch_size // world,))]
                                           .to(args.device)),
                     args.lr, args.run_dir, "train_wm", "codec", args.eval_every, warmup=args.warmup)
    return codec.eval().requires_grad_(False)


def suffix(args) -> str:
    """Round r's files carry '.round<r>' (wm.round1.safetensors, wm_report.round1.json); round 0's have none."""
    return f".round{args.round}" if args.round else ""


def check(args):
    """The <= 5-minute diagnostic: PushCube, noisy-expert data only; pusher error at h=8, true vs shuffled actions."""
    t0 = time.time()
    # its own folder (it must never resume from, or overwrite, a full run's models) and a fixed small budget
    args.run_dir = os.path.join(args.run_dir, "check")
    args.tasks, args.wm_finetune_steps = ("wmpo/PushCube-v0",), 0
    for k, v in [("explore_per_level", 40), ("codec_steps", 250), ("wm_steps", 150)]:
        if getattr(args, k) < 0:  # explicit flags win (the test runs it with a few steps, to see it fail)
            setattr(args, k, v)
    # short stages: short warm-up, larger step, 32 codec frames / 8 windows a step, teacher forcing then 8-frame unrolls
    args.lr, args.warmup, args.batch_size, args.curriculum = 2e-3, 20, 4, (0.7, 0.7, 0.7)
    sets = collect_all(args, None)
    held = envs.collect(args.tasks[0], envs.expert_policy(0.5, seed=9),
                        envs.seeds("heldout", args.tasks[0], 32, start=8000),
                        desc="check held-out", full_horizon=True)
    frames = torch.from_numpy(np.concatenate([e["frames"] for e in sets["explore"]]))
    codec = train_codec(args, frames, 1)
    wm = train_world_model(args, codec, sets["explore"], [], 8)
    world = wmpo.WorldModelEnv(wm, codec, args.device)
    held = [{**e, "frames": e["frames"][:9], "actions": e["actions"][:9]} for e in held]  # one chunk: h = 1..8 only
    d_r = np.stack([fidelity.detect_objects(e["frames"]) for e in held])
    d_i = np.stack([fidelity.detect_objects(f) for f in fidelity.imagine_replay(world, held)])
    shuffled = [held[(i + 8) % len(held)]["actions"] for i in range(len(held))]  # another episode's actions
    d_s = np.stack([fidelity.detect_objects(f) for f in fidelity.imagine_replay(world, held, shuffled)])
    true, shuf = fidelity.error_curves(d_r, d_i)[7, 0], fidelity.error_curves(d_r, d_s)[7, 0]
    copy = fidelity.error_curves(d_r, np.repeat(d_r[:, :1], 9, 1))[7, 0]
    ok = true < shuf / 3
    res = {"pusher_err_px_h8": float(true), "shuffled": float(shuf), "copy": float(copy), "pass": bool(ok),
           "wm_steps": args.wm_steps, "wall_s": time.time() - t0}
    envs.atomic_write(os.path.join(args.run_dir, "check.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(res, indent=1)))
    print(f"check: pusher error at h=8 {true:.2f} px with true actions, {shuf:.2f} px shuffled, "
          f"{copy:.2f} px copy-last-frame -> {'PASS' if ok else 'FAIL'} (true < shuffled / 3), {res['wall_s']:.0f} s")
    if not ok:
        raise SystemExit(1)


def main(args: Args):
    if args.check:
        return check(args)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) < 0:
            setattr(args, k, v)
    [envs.make(t).close() for t in args.tasks]  # unknown ids fail here, before any work
    envs.check_flags(args, positive=["budget", "batch_size", "lr", "eval_every", "heldout_groups", "val_share",
                                     "window_chunks", "grpo_path_states"],
                     non_negative=["round"], at_least={"group_size": 2})
    budget_split(args)  # a budget too small for the tasks fails here, before any work
    rank, world = ddp.dist_init()
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must divide over {world} processes")
    B = args.batch_size // world  # this rank's share of every batch
    torch.manual_seed(args.seed + rank)  # ranks draw different windows and noise: together, one global batch
    np.random.seed(args.seed + rank)
    sfx, r = suffix(args), args.round
    print(f"train_wm{sfx}: {args.preset}: codec {args.codec_steps}, wm {args.wm_steps}+{args.wm_finetune_steps}, "
          f"reward {args.reward_steps} steps; {args.explore_per_level} noisy-expert episodes per task and level")
    t_start = time.time()
    policy_path = envs.require(os.path.join(args.run_dir, f"{args.policy}.safetensors"),
                               f"python train_policy.py sft --run-dir {args.run_dir}")
    policy = wmpo.load(policy_path, args.device, expect="VLA").eval()
    if rank == 0:  # rank 0 collects every data set and writes every file; the others read what it saved
        envs.write_args(args.run_dir, f"train_wm{sfx}", args)
        collect_all(args, policy)
    ddp.barrier()
    sets = collect_all(args, policy)
    # the real budget, counted: every trajectory drawn with the policy that trains or chooses anything (this round)
    used = {"rollouts": len(sets["rollouts"]), "val": len(sets["val"])}
    budget = {"budget": args.budget, "real_trajectories": sum(used.values()), **used, "round": r,
              "heldout_not_counted": len(sets["heldout"])}  # measurement only: the fidelity report, like eval.py
    assert budget["real_trajectories"] <= args.budget, budget
    if rank == 0:
        data = json.dumps(budget, indent=1)
        envs.atomic_write(os.path.join(args.run_dir, f"budget{sfx}.json"), lambda tmp: open(tmp, "w").write(data))
    policy_eps = sets["rollouts"] + (earlier_rounds(args, "rollouts") if r else [])  # all real rollouts so far
    val_eps = sets["val"] + (earlier_rounds(args, "val") if r else [])
    train_eps = sets["demos"] + sets["explore"] + policy_eps

    # -- 1. frame codec (round 0 only), 2. world model (round r: round r-1's, re-aligned) --
    make = f"python train_wm.py --run-dir {args.run_dir}"
    if r == 0:
        codec = train_codec(args, torch.from_numpy(np.concatenate([e["frames"] for e in train_eps])), world)
        wm = train_world_model(args, codec, train_eps, sets["rollouts"], B)
    else:
        prev = "" if r == 1 else f".round{r - 1}"
        codec = wmpo.load(envs.require(os.path.join(args.run_dir, "codec.safetensors"), make), args.device,
                          expect="FrameCodec").eval()
        wm = wmpo.load(envs.require(os.path.join(args.run_dir, f"wm{prev}.safetensors"), make), args.device,
                       expect="WorldModel")
        wm = train_world_model(args, codec, train_eps, policy_eps, B, wm, out=f"wm{sfx}")
    imag_world = wmpo.WorldModelEnv(wm, codec, args.device)

    # -- 3. reward models: ours (real clips + imagined replays with real labels, threshold on imagined validation
    #       replays) and, in round 0, the paper's (real clips only, threshold on real validation episodes) as a
    #       baseline. Round r fine-tunes round r-1's for a third of the steps and re-chooses its threshold. --
    rng = np.random.default_rng(args.seed + r)  # the same replay subset on every rank
    replay_eps = []
    for t in args.tasks:
        es = [e for e in train_eps if e["task"] == t]
        replay_eps += [es[i] for i in rng.permutation(len(es))[: args.reward_replays]]
    replay_imag = fidelity.imagine_replay(imag_world, replay_eps)
    replayed = {id(e) for e in replay_eps}
    rest = [e for e in train_eps if id(e) not in replayed]
    val_real, val_imag = [e["frames"] for e in val_eps], fidelity.imagine_replay(imag_world, val_eps)
    val_succ = np.array([bool(e["success"].any()) for e in val_eps])
    rewards = {}
    models = [("reward", args.reward_imagined, val_imag)] + [("reward_real", 0.0, val_real)] * (r == 0)
    for name, frac, val_frames in models:
        if r == 0:
            rm, steps, lr = wmpo.RewardModel(args.reward).to(args.device), args.reward_steps, args.lr
        else:
            prev_path = envs.require(os.path.join(args.run_dir, f"{name}{prev}.safetensors"), make)
            rm = wmpo.load(prev_path, args.device, expect="RewardModel")
            steps, lr = max(1, args.reward_steps // 3), args.lr * 0.3
        path = os.path.join(args.run_dir, f"{name}{sfx}.safetensors")
        def clips(net, step):
            return net(*wmpo.clip_batch(replay_eps + rest, replay_imag, codec, rm.cfg.clip, 4 * B, args.device, frac,
                                        rm.text.words))
        rm = wmpo.fit(rm, path, steps, clips, lr, args.run_dir, f"train_wm{sfx}", f"{name}{sfx}", args.eval_every,
                      warmup=args.warmup)
        rm.eval().requires_grad_(False)
        if rank == 0:
            probs = fidelity.reward_probs(rm, val_frames, [e["instruction"] for e in val_eps], args.device)
            rm.cfg.threshold = wmpo.choose_threshold(probs, val_succ)
            wmpo.save(rm, path, steps)
            print(f"{name}{sfx} threshold {rm.cfg.threshold:.3f} ({len(val_eps)} validation episodes, "
                  f"{'imagined' if frac > 0 else 'real'} replays)")
        rewards[name] = rm
    if rank > 0:  # the report and every file are rank 0's
        return

    # -- 4. fidelity report on held-out groups (round r: rollouts of this round's policy from the same states) --
    per_task = {}
    for task in args.tasks:
        eps = [e for e in sets["heldout"] if e["task"] == task]
        per_task[task], gif = fidelity.task_report(imag_world, rewards, eps, task, args.group_size, args.device)
        per_task[task].update(fidelity.grpo_path(imag_world, policy, rewards["reward"], eps, task, args.group_size,
                                                 args.rollout_temperature, args.grpo_path_states))
        fidelity.side_by_side_gif(gif, os.path.join(args.run_dir, "videos", f"wm_{envs.task_name(task)}{sfx}.gif"))
    rep = fidelity.mean_over_tasks(per_task)
    rep["trajectories"] = sum(r["trajectories"] for r in per_task.values())
    rep["real_budget"] = budget  # what P paid for (budget.json)
    rep["data"] = fidelity.data_census(sets)  # per set and task: episodes, frames, success share
    rep["imagined_frames_per_s"] = fidelity.imagined_fps(imag_world)
    rep["real_env_steps_per_s"] = fidelity.real_env_steps_per_s(args.tasks[0])
    rep["wall_time_s"] = time.time() - t_start
    rep["per_task"] = per_task
    data = json.dumps(rep, indent=1)
    envs.atomic_write(os.path.join(args.run_dir, f"wm_report{sfx}.json"), lambda tmp: open(tmp, "w").write(data))
    md = fidelity.report_markdown(rep)
    envs.atomic_write(os.path.join(args.run_dir, f"wm_report{sfx}.md"), lambda tmp: open(tmp, "w").write(md))
    fidelity.print_report(rep, args.tasks)


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # one clear line, non-zero exit
        raise SystemExit(f"error: {e}")
