"""Collect real data, train the frame codec, the world model and the reward model, and measure their fidelity.

    python train_wm.py --check                        # <= 5 min: does the world model follow its actions? (no policy)
    python train_wm.py --preset tiny                  # needs policy_sft.safetensors (python train_policy.py sft)
    python train_wm.py --budget 1280                  # P real rollouts of the base policy for behaviour alignment

Data (all real, in DIR/data): expert demos (from SFT), exploratory noisy-expert episodes at several noise levels
(contact-rich; they are not policy rollouts, so they do not count against P), P rollouts of the base policy
("policy behaviour alignment"), validation rollouts (the reward threshold) and held-out groups of G rollouts from
shared initial states (the fidelity report; never trained on). Validation and held-out episodes run the task's
full horizon (success = at any step), exactly as imagined rollouts do.

The world model is trained teacher-forced, then unrolled on its own predictions with a curriculum (H = 2 -> 4 -> 8:
jumping straight to 8 fell back to copying the last frame). The reward model learns from real clips and from
imagined replays of training episodes labelled with what really happened, so it learns the world model's bias.
Writes codec / wm / reward (+ reward_real, the real-frames-only baseline) .safetensors, wm_report.json (keys in
../shared/INTERFACE.md) and videos/wm_<task>.gif (real | imagined).
"""

import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import envs
import wmpo


@dataclass
class Args:
    # run
    run_dir: str = "runs/demo"
    """run folder: reads policy_sft.safetensors and data/, writes models, report and videos"""
    preset: Literal["tiny", "small", "gpu"] = "tiny"
    """tiny: 2 CPU cores, ~30 min | small | gpu: fills in every field left at -1"""
    seed: int = 0
    """seed of data order, noise and initialisation"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """task ids to collect and train on"""
    check: bool = False
    """the <= 5-minute diagnostic (PushCube, noisy-expert data only): pusher error at h=8 with true vs shuffled
    actions after a short training; run it before every long run"""
    # data
    budget: int = 128
    """P: every real trajectory drawn with the policy that trains or chooses anything (alignment rollouts plus
    validation rollouts), split evenly over tasks; held-out report trajectories only measure and are not counted"""
    rollout_temperature: float = 1.0
    """temperature of the base policy's rollouts (the same as WMPO's)"""
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
    motion_windows: float = 0.5
    """fraction of world-model windows whose future holds block motion (contact is rare in uniform windows)"""
    reward_imagined: float = 0.5
    """fraction of reward clips cut from imagined replays of training episodes, labelled with the real outcome"""
    reward_replays: int = 96
    """training episodes per task replayed in the world model for the reward model"""
    eval_every: int = 250
    """checkpoint interval in steps"""
    codec: wmpo.CodecConfig = field(default_factory=wmpo.CodecConfig)
    wm: wmpo.WorldModelConfig = field(default_factory=wmpo.WorldModelConfig)
    reward: wmpo.RewardConfig = field(default_factory=wmpo.RewardConfig)


PRESETS = {
    "tiny": dict(explore_per_level=100, codec_steps=1500, wm_steps=1800, wm_finetune_steps=200, reward_steps=1000),
    "small": dict(explore_per_level=200, codec_steps=3000, wm_steps=5000, wm_finetune_steps=500, reward_steps=2000),
    "gpu": dict(explore_per_level=600, codec_steps=20000, wm_steps=40000, wm_finetune_steps=4000, reward_steps=8000),
}


def task_name(task: str) -> str:
    return task.split("/")[1].lower()


def collect_cached(path: str, task: str, act, seeds: list[int], desc: str, full_horizon=False, **meta) -> list[dict]:
    """Episodes from `path` if a previous run wrote it (same task, policy and seeds), else collect and save."""
    if os.path.exists(path):
        return envs.load_episodes(path)
    eps = envs.collect(task, act, seeds, desc=desc, full_horizon=full_horizon)
    envs.save_episodes(path, eps, full_horizon=full_horizon, **meta)
    return eps


def budget_split(args: Args) -> tuple[int, int]:
    """Per task: (alignment rollouts, validation rollouts), together at most budget / tasks real trajectories."""
    per_task = args.budget // len(args.tasks)
    n_val = max(1, round(per_task * args.val_share))
    if per_task - n_val < 1:
        raise SystemExit(f"error: --budget {args.budget} leaves no alignment rollout on {len(args.tasks)} tasks "
                         f"after {n_val} validation rollouts each (--val-share {args.val_share})")
    return per_task - n_val, n_val


def collect_all(args: Args, policy) -> dict[str, list[dict]]:
    data_dir = os.path.join(args.run_dir, "data")
    sets = {"demos": [], "explore": [], "rollouts": [], "val": [], "heldout": []}
    n_roll, n_val = budget_split(args)
    act = wmpo.policy_fn(policy, args.rollout_temperature, args.device) if policy is not None else None
    for task in args.tasks:
        name = task_name(task)
        if policy is not None:
            sets["demos"] += envs.load_dir(data_dir, f"demos-{name}")
        for i, noise in enumerate(args.explore_noise):
            n = args.explore_per_level
            sets["explore"] += collect_cached(os.path.join(data_dir, f"explore-{name}-{noise:g}-{n}.safetensors"), task,
                                              envs.expert_policy(noise, seed=i), envs.seeds("explore", task, n, start=i * 2000),
                                              f"explore {name} σ={noise}", policy=f"expert+noise {noise}")
        if policy is None:  # --check: noisy-expert data only
            continue
        sets["rollouts"] += collect_cached(os.path.join(data_dir, f"rollouts-{name}-{n_roll}.safetensors"), task, act,
                                           envs.seeds("rollouts", task, n_roll), f"rollouts {name}",
                                           policy="policy_sft", temperature=args.rollout_temperature)
        sets["val"] += collect_cached(os.path.join(data_dir, f"val-{name}-{n_val}.safetensors"), task, act,
                                      envs.seeds("val", task, n_val), f"val {name}", full_horizon=True,
                                      policy="policy_sft", temperature=args.rollout_temperature)
        # held-out groups: each initial state rolled out G times (consecutive episodes form a group)
        seeds = [s for s in envs.seeds("heldout", task, args.heldout_groups) for _ in range(args.group_size)]
        sets["heldout"] += collect_cached(os.path.join(data_dir, f"heldout-{name}-{args.heldout_groups}x{args.group_size}.safetensors"),
                                          task, act, seeds, f"heldout {name}", full_horizon=True,
                                          policy="policy_sft", temperature=args.rollout_temperature)
    for k, v in sets.items():
        print(f"{k:9s}: {len(v):5d} episodes, {sum(len(e['frames']) for e in v):6d} frames, "
              f"success {np.mean([e['success'].any() for e in v]) if v else 0:.0%}")
    if policy is not None and not sets["demos"]:
        raise SystemExit(f"error: no demos in {data_dir}; make them first with: python train_policy.py sft --run-dir {args.run_dir}")
    return sets


def train_loop(model, name: str, args: Args, num_steps: int, loss_fn, lr: float, desc: str, log_name="train_wm",
               lr_mult=lambda step: 1.0):
    """The one flat loop every model here trains with: AdamW, warmup + cosine, clip 1, atomic checkpoints, resume.
    loss_fn(net, step) draws this rank's share of a batch and returns net(...)'s (loss, logs); under torchrun net
    is the DistributedDataParallel wrapper (gradients averaged over ranks). Only rank 0 writes files."""
    rank, world = wmpo.dist_init()
    path = os.path.join(args.run_dir, f"{name}.safetensors")
    state_path = path.replace(".safetensors", ".train.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    state = wmpo.load_train_state(state_path)
    if state is not None and os.path.exists(path) and state.get("stage") == desc:
        model.load_state_dict(wmpo.load_same(path, model.cfg).state_dict())
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        print(f"resuming {desc} from step {start}")
    elif os.path.exists(path) and state is not None and state.get("stage") == f"{desc}:done":
        print(f"{desc}: already trained ({path})")
        return wmpo.load(path, args.device)
    net = wmpo.wrap_ddp(model)
    bar = tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:  # a python float: a numpy one would not load with weights_only
            g["lr"] = float(lr * lr_mult(step) * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / num_steps))))
        loss, logs = loss_fn(net, step)
        loss_all = wmpo.all_sum(loss.detach()) / world
        if not torch.isfinite(loss_all):
            raise SystemExit(f"error: {desc} loss is {loss_all.item()} at step {step}; kept the last checkpoint {path}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.update(step=step, stage=desc, dt=time.time() - t0)
        if rank == 0:
            wmpo.log_metrics(args.run_dir, log_name, logs)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items() if "/" in k})
            if (step + 1) % args.eval_every == 0 or step + 1 == num_steps:
                wmpo.save(model, path, step + 1)
                done = step + 1 == num_steps
                wmpo.save_train_state(state_path, opt, step + 1, stage=f"{desc}:done" if done else desc)
    wmpo.barrier()
    return model


# ----------------------------------------------------------------------------------------------------------
# batches


def block_motion(ep: dict) -> np.ndarray:
    """Frame indices t where some block moves between frames t and t+1 by > 1 mm (contact happens there)."""
    names = envs.object_layout(ep["task"])[0]
    rows = [i for i, n in enumerate(names) if n.startswith("block_")]
    if not rows:
        return np.zeros(0, np.int64)
    step = np.linalg.norm(np.diff(ep["object_pos"][:, rows], axis=0), axis=-1).max(-1)
    return np.flatnonzero(step > 1e-3)


class Windows:
    """Random (C context + K future) latent windows of real episodes, with the action taken at every frame.

    A window is placed by its target frame: uniform over all frames of all episodes (not over episodes: short
    episodes would be mostly padding), or, for a `motion` fraction, a frame right after a block moved. Before an
    episode starts the window repeats frame 0 under zero actions (how a rollout starts); past its end the last
    frame repeats under zero actions (what the simulator shows when the pusher holds still)."""

    def __init__(self, latents, actions, episodes, C, K, motion=0.0):
        self.z, self.a, self.C, self.K, self.motion = latents, actions, C, K, motion
        self.frames = np.concatenate([np.stack([np.full(len(z) - 1, i), np.arange(1, len(z))], 1) for i, z in enumerate(latents)])
        moving = [np.stack([np.full(len(m), i), m + 1], 1) for i, e in enumerate(episodes) if len(m := block_motion(e))]
        self.moving = np.concatenate(moving) if moving else self.frames

    def sample(self, B: int):
        zs, acts = [], []
        n_motion = int(round(B * self.motion))
        for j in range(B):
            pool = self.moving if j < n_motion else self.frames
            i, f = pool[np.random.randint(len(pool))]
            z, a = self.z[i], self.a[i]  # (T+1, c, h, w), (T+1, a) with a zero last row
            T = len(z)
            s = f - self.C - np.random.randint(self.K)  # the target lands anywhere in the future part
            pos = np.arange(s, s + self.C + self.K)
            idx = np.clip(pos, 0, T - 1)
            act = torch.where(torch.from_numpy((pos >= 0) & (pos < T - 1))[:, None].to(a.device), a[idx], 0.0)
            zs.append(z[idx])
            acts.append(act)
        return torch.stack(zs), torch.stack(acts)


def clip_batch(real_eps, imag_eps, codec, L: int, B: int, device, imag_frac: float, vocab: list[str]):
    """Balanced success clips: positives end at a success frame, negatives anywhere else. imag_frac of them are cut
    from imagined replays (same index, the *real* label); of the real ones half are autoencoded, so the classifier
    accepts what the codec draws. real_eps and imag_eps are parallel lists (imag_eps[i] replays real_eps[i]).
    Instructions become word ids in `vocab`, the reward model's own word list."""
    n_imag = int(round(B * imag_frac)) if imag_eps else 0
    frames, words, labels, coded = [], [], [], []
    succ = [i for i, e in enumerate(real_eps) if e["success"][-1]]
    succ_imag = [i for i in succ if i < len(imag_eps)]
    for j in range(B):
        imagined = j < n_imag
        positive = j % 2 == 0 and (succ_imag if imagined else succ)
        pool = (succ_imag if imagined else succ) if positive else range(len(imag_eps) if imagined else len(real_eps))
        i = pool[np.random.randint(len(pool))]
        ep = real_eps[i]
        T = len(ep["frames"])
        end = T - 1 if positive else np.random.randint(0, (T - 1 if ep["success"][-1] else T))
        idx = np.clip(np.arange(end - L + 1, end + 1), 0, T - 1)
        frames.append(torch.from_numpy((imag_eps[i] if imagined else ep["frames"])[idx]))
        words.append(wmpo.tokenize([ep["instruction"]], vocab)[0])
        labels.append(1 if positive else 0)
        coded.append(not imagined and j % 4 == 1)
    frames = torch.stack(frames).to(device)
    with torch.no_grad():
        m = torch.tensor(coded, device=device)
        frames[m] = codec.to_uint8(codec.decode(codec.encode(frames[m])))
    return frames, torch.stack(words).to(device), torch.tensor(labels, device=device)


# ----------------------------------------------------------------------------------------------------------
# fidelity measurements


def detect_objects(frames: np.ndarray) -> np.ndarray:
    """Colour-blob centroids (row, col) of the pusher (white), the red and the blue block; the same detector runs
    on real and imagined frames. frames (T, h, w, 3) -> (T, 3, 2), NaN when < 3 px of that colour are visible."""
    f = frames.astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    masks = [(r > 200) & (g > 200) & (b > 200), (r > 150) & (g < 100) & (b < 100), (b > 150) & (r < 100) & (g < 130)]
    rows, cols = np.mgrid[0:64, 0:64]
    out = np.full((len(frames), 3, 2), np.nan, np.float32)
    for k, m in enumerate(masks):
        n = m.sum((1, 2))
        ok = n >= 3
        out[ok, k, 0] = (m * rows).sum((1, 2))[ok] / n[ok]
        out[ok, k, 1] = (m * cols).sum((1, 2))[ok] / n[ok]
    return out


DETECTOR = {"pusher": 0, "block_red": 1, "block_blue": 2}


def judge(ep: dict, det: np.ndarray) -> np.ndarray:
    """The geometric judge: per frame, is every instructed object's blob within the success radius of its pad?
    Pads do not move; their pixel positions come from the real episode's first frame. det (T, 3, 2) -> (T,) bool."""
    names = envs.object_layout(ep["task"])[0]
    radius = envs.SUCCESS_R * envs.PX_PER_M
    ok = np.ones(len(det), bool)
    for obj, pad in envs.goal_pairs(ep["task"], ep["instruction"]):
        pad_px = envs.world_to_px(ep["object_pos"][0, names.index(pad)])
        d = np.linalg.norm(det[:, DETECTOR[obj]] - pad_px, axis=-1)
        ok &= np.nan_to_num(d, nan=99.0) < radius
    return ok


@torch.no_grad()
def imagine_replay(world, episodes, actions=None, batch=64):
    """Replay real actions (or the given ones) in the world model from each episode's first frame: (T+1, h, w, c)."""
    K = world.chunk
    out = []
    for start in tqdm(range(0, len(episodes), batch), desc="imagined replay", leave=False):
        eps = episodes[start : start + batch]
        acts_np = [e["actions"] for e in eps] if actions is None else actions[start : start + batch]
        Tmax = max(len(e["frames"]) for e in eps)
        n_chunks = (Tmax - 1 + K - 1) // K
        acts = torch.zeros(len(eps), n_chunks * K, 2)
        for i, a in enumerate(acts_np):
            acts[i, : len(a) - 1] = torch.from_numpy(a[:-1])
        first = torch.from_numpy(np.stack([e["frames"][0] for e in eps]))
        frames = [world.reset(first, [e["instruction"] for e in eps])[:, None].cpu()]
        for c in range(n_chunks):
            frames.append(world.step(acts[:, c * K : (c + 1) * K]).cpu())
        frames = torch.cat(frames, 1).numpy()
        out += [frames[i, : len(e["frames"])] for i, e in enumerate(eps)]
    return out


@torch.no_grad()
def reward_probs(reward, frames_list, instructions, device, batch=64):
    """Per-frame clip success probabilities for variable-length trajectories."""
    out = []
    for s in range(0, len(frames_list), batch):
        fl = frames_list[s : s + batch]
        T = max(len(f) for f in fl)
        pad = np.stack([np.concatenate([f, np.repeat(f[-1:], T - len(f), 0)]) for f in fl])
        p = reward(torch.from_numpy(pad).to(device), reward.text.tokenize(instructions[s : s + batch])).cpu()
        out += [p[i, : len(f)].numpy() for i, f in enumerate(fl)]
    return out


def choose_threshold(probs_list, real_success) -> float:
    """Trajectory-level balanced accuracy (verdict: any frame over the threshold), 20 thresholds in [0.3, 0.97]."""
    best, best_t = -1.0, 0.5
    for t in np.linspace(0.3, 0.97, 20):
        v = np.array([bool((p >= t).any()) for p in probs_list])
        tpr = (v & real_success).sum() / max(real_success.sum(), 1)
        tnr = (~v & ~real_success).sum() / max((~real_success).sum(), 1)
        if (tpr + tnr) / 2 > best:
            best, best_t = (tpr + tnr) / 2, float(t)
    return best_t


def outcome_stats(real: np.ndarray, imag: np.ndarray, G: int) -> dict:
    """Agreement, precision / recall of imagined success and the correlation of group-normalised advantages."""
    from kernels.grpo import group_advantages

    ar = group_advantages(torch.tensor(real, dtype=torch.float32), G).numpy()
    ai = group_advantages(torch.tensor(imag, dtype=torch.float32), G).numpy()
    mixed = np.repeat(rearrange(real.astype(np.float32), "(b g) -> b g", g=G).std(1) > 0, G)  # real outcomes differ
    corr = float(np.corrcoef(ar[mixed], ai[mixed])[0, 1]) if mixed.any() and ai[mixed].std() > 0 else 0.0
    return {"agreement": float((real == imag).mean()), "advantage_correlation": corr,
            "precision": float((real & imag).sum() / max(imag.sum(), 1)), "recall": float((real & imag).sum() / max(real.sum(), 1)),
            "imagined_success_rate": float(imag.mean()), "mixed_groups": int(mixed.sum() // G)}


def error_curves(d_ref: np.ndarray, d_hat: np.ndarray) -> np.ndarray:
    """Per-object centroid error (px) against horizon. d_ref, d_hat (N, T, 3, 2) -> (T-1, 3): mean over episodes
    where the object is visible in the reference; an object the model lost counts as 32 px (half the image)."""
    dist = np.where(np.isnan(d_hat[..., 0]), 32.0, np.linalg.norm(d_hat - d_ref, axis=-1))  # (N, T, 3)
    dist = np.where(np.isnan(d_ref[..., 0]), np.nan, dist)
    with np.errstate(all="ignore"):
        return np.nanmean(dist, 0)[1:]


def task_report(args, world, rewards, eps, task) -> tuple[dict, list]:
    """Fidelity of the world model (+ reward models) on one task's held-out full-horizon groups."""
    G = args.group_size
    names = envs.object_layout(task)[0]
    objs = [o for o in ["pusher", "block_red", "block_blue"] if o in names]
    k_obj = [DETECTOR[o] for o in objs]
    imag = imagine_replay(world, eps)
    n_sh = min(64, len(eps))  # shuffled: each episode replays the actions of one from another group
    shuf = imagine_replay(world, eps[:n_sh], [eps[(i + G) % len(eps)]["actions"] for i in range(n_sh)])
    d_r = np.stack([detect_objects(e["frames"]) for e in eps])  # (N, T, 3, 2)
    d_i, d_s = np.stack([detect_objects(f) for f in imag]), np.stack([detect_objects(f) for f in shuf])
    err, err_s = error_curves(d_r, d_i), error_curves(d_r[:n_sh], d_s)
    err_c = error_curves(d_r, np.repeat(d_r[:, :1], d_r.shape[1], 1))  # copy the first frame
    rep = {"objects": objs, "trajectories": len(eps), "success_radius_px": envs.SUCCESS_R * envs.PX_PER_M}
    for o, k in zip(objs, k_obj):
        rep[f"{o}_err_px_by_horizon"] = err[:, k].tolist()
        rep[f"{o}_err_px_shuffled_by_horizon"] = err_s[:, k].tolist()
        rep[f"{o}_err_px_copy_by_horizon"] = err_c[:, k].tolist()
    rep["object_err_px_by_horizon"] = np.nanmax(err[:, k_obj], 1).tolist()
    rep["object_err_px_copy_baseline_by_horizon"] = np.nanmax(err_c[:, k_obj], 1).tolist()
    # pushed blocks: error on contact frames, lost at h=40, within the success radius of the real block at h=24
    radius = envs.SUCCESS_R * envs.PX_PER_M
    for o in objs[1:]:
        k = DETECTOR[o]
        contact = [(n, t + 1) for n, e in enumerate(eps) for t in block_motion(e)
                   if np.linalg.norm(e["object_pos"][t + 1, names.index(o)] - e["object_pos"][t, names.index(o)]) > 1e-3]
        if contact:
            n, t = np.array(contact).T
            dist = np.where(np.isnan(d_i[n, t, k, 0]), 32.0, np.linalg.norm(d_i[n, t, k] - d_r[n, t, k], axis=-1))
            rep[f"{o}_contact_err_px"] = float(np.nanmean(np.where(np.isnan(d_r[n, t, k, 0]), np.nan, dist)))
        for h, key in [(40, "lost_h40"), (24, "within_radius_h24")]:
            if h >= d_r.shape[1]:
                continue
            pushed = (np.linalg.norm(d_r[:, h, k] - d_r[:, 0, k], axis=-1) > 1.0) & ~np.isnan(d_r[:, h, k, 0])
            if not pushed.any():
                continue
            lost = np.isnan(d_i[pushed, h, k, 0])
            within = np.linalg.norm(d_i[pushed, h, k] - d_r[pushed, h, k], axis=-1) < radius  # NaN -> False
            rep[f"{o}_{key}"] = float(lost.mean() if key == "lost_h40" else within.mean())
            rep[f"{o}_pushed_h{h}"] = int(pushed.sum())
    # outcomes: real = success at any step; stop-at-success = imagined verdict only up to the real first success
    real = np.array([bool(e["success"].any()) for e in eps])
    first = np.array([int(np.argmax(e["success"])) if e["success"].any() else len(e["success"]) - 1 for e in eps])
    j_real = [judge(e, d) for e, d in zip(eps, d_r)]
    j_imag = [judge(e, d) for e, d in zip(eps, d_i)]
    rep["median_success_len"] = float(np.median(first[real])) if real.any() else None
    rep["judge_on_real_agreement"] = float((np.array([j.any() for j in j_real]) == real).mean())
    judges = {"judge": j_imag}
    instr = [e["instruction"] for e in eps]
    for name, rm in rewards.items():
        judges[name] = [p >= rm.cfg.threshold for p in reward_probs(rm, imag, instr, args.device)]
        p_real = reward_probs(rm, [e["frames"] for e in eps], instr, args.device)
        pred, lab = np.concatenate([p >= rm.cfg.threshold for p in p_real]), np.concatenate([e["success"] for e in eps])
        tp = (pred & lab).sum()
        prec, rec = tp / max(pred.sum(), 1), tp / max(lab.sum(), 1)
        rep[f"{name}_frame_f1_real"] = float(2 * prec * rec / max(prec + rec, 1e-9))
        rep[f"{name}_threshold"] = rm.cfg.threshold
    for name, hits in judges.items():
        full = outcome_stats(real, np.array([h.any() for h in hits]), G)
        stop = outcome_stats(real, np.array([h[: f + 1].any() for h, f in zip(hits, first)]), G)
        rep.update({f"{name}_{k}": v for k, v in full.items()})
        rep.update({f"{name}_stop_at_success_{k}": v for k, v in stop.items()})
    # the INTERFACE keys: the reward model on imagined replays is what WMPO sees
    rep.update(outcome_agreement=rep["reward_agreement"], advantage_correlation=rep["reward_advantage_correlation"],
               imagined_recall=rep["reward_recall"], imagined_precision=rep["reward_precision"],
               judge_agreement=rep["judge_agreement"], real_success_rate=float(real.mean()),
               imagined_success_rate=rep["reward_imagined_success_rate"], reward_threshold=rewards["reward"].cfg.threshold,
               reward_f1=rep["reward_frame_f1_real"])
    psnr = lambda a, b: 10 * np.log10(255**2 / np.maximum(((a.astype(np.float32) - b) ** 2).mean((-3, -2, -1)), 1e-3))  # noqa: E731
    rep["psnr_by_horizon"] = np.mean([psnr(e["frames"], f) for e, f in zip(eps, imag)], 0)[1:].tolist()
    rep["psnr_copy_baseline_by_horizon"] = np.mean([psnr(e["frames"], e["frames"][:1]) for e in eps], 0)[1:].tolist()
    picks = [i for i in range(len(eps)) if real[i]][:3] + [i for i in range(len(eps)) if not real[i]][:3]
    gif = [(eps[i]["frames"], imag[i], bool(real[i]), bool(judges["reward"][i].any())) for i in picks]
    return rep, gif


def side_by_side_gif(pairs, path):
    """Rows of (real | imagined) episodes; a green or red bar under each shows the real / imagined verdict."""
    import imageio

    T = max(len(r) for r, _, _, _ in pairs)
    rows = []
    for real, imag, rs, iv in pairs:
        pad = lambda f: np.concatenate([f, np.repeat(f[-1:], T - len(f), 0)])  # noqa: E731
        bar = lambda ok: np.broadcast_to(np.array([40, 220, 40] if ok else [230, 40, 40], np.uint8), (T, 4, 64, 3))  # noqa: E731
        left = np.concatenate([pad(real), bar(rs)], 1)
        right = np.concatenate([pad(imag), bar(iv)], 1)
        rows.append(np.concatenate([left, np.zeros((T, 68, 2, 3), np.uint8), right], 2))
    grid = np.concatenate(rows, 1).repeat(2, 1).repeat(2, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, list(grid), duration=0.1, loop=0)


def imagined_fps(world, batch=64) -> float:
    world.reset(torch.zeros(batch, 64, 64, 3, dtype=torch.uint8), [""] * batch)
    world.step(torch.zeros(batch, world.chunk, 2))  # warm-up
    t0 = time.time()
    world.step(torch.zeros(batch, world.chunk, 2))
    return batch * world.chunk / (time.time() - t0)


def mean_over_tasks(per_task: dict) -> dict:
    """Top-level keys: the mean over tasks (per horizon for curves, over the tasks that have a value)."""
    out = {}
    keys = {k for r in per_task.values() for k in r}
    for k in sorted(keys):
        vals = [r[k] for r in per_task.values() if k in r and r[k] is not None]
        if not vals:  # e.g. the median success length when no task has a success: the key stays, as null
            out[k] = None
            continue
        if isinstance(vals[0], str) or (isinstance(vals[0], list) and vals[0] and isinstance(vals[0][0], str)):
            continue
        if isinstance(vals[0], list):
            H = max(len(v) for v in vals)
            out[k] = [float(np.nanmean([v[h] for v in vals if h < len(v)])) for h in range(H)]
        else:
            out[k] = float(np.mean(vals))
    return out


def report_markdown(rep: dict) -> str:
    """The README's world-model table, built from wm_report.json (no number typed by hand)."""
    tasks = list(rep["per_task"])
    f = lambda v, d=2: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    def at(r, key, h):
        v = r.get(key, [])
        return v[h - 1] if h - 1 < len(v) else None
    def blocks(r, key):
        return " / ".join(f(r[f"{b}_{key}"]) for b in ["block_red", "block_blue"] if f"{b}_{key}" in r) or "–"
    rows = [
        ("pusher error px at h=8: true / shuffled actions / copy-first-frame", lambda r: " / ".join(
            f(at(r, f"pusher_err_px{k}_by_horizon", 8), 1) for k in ["", "_shuffled", "_copy"])),
        ("pusher error px at h=16 / 24 / 40 (success radius 3.84)", lambda r: " / ".join(
            f(at(r, "pusher_err_px_by_horizon", h), 1) for h in (16, 24, 40))),
        ("pushed blocks (red / blue): within the success radius of the real block at h=24", lambda r: blocks(r, "within_radius_h24")),
        ("pushed blocks (red / blue): lost (< 3 px of their colour) at h=40", lambda r: blocks(r, "lost_h40")),
        ("blocks (red / blue): error px on frames where they move", lambda r: blocks(r, "contact_err_px")),
        ("geometric judge on imagined frames: agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r[f"judge_{k}"]) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("reward model (real + imagined clips): agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r[f"reward_{k}"]) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("reward model, real clips only (paper): agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r.get(f"reward_real_{k}")) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("stop-at-success variant, judge / reward model: agreement", lambda r: f"{f(r['judge_stop_at_success_agreement'])} / "
                                                                  f"{f(r['reward_stop_at_success_agreement'])}"),
        ("real / imagined (reward model) success rate; groups with mixed real outcomes", lambda r: f"{f(r['real_success_rate'])} / "
                                                   f"{f(r['reward_imagined_success_rate'])}; {r['reward_mixed_groups']}"),
        ("judge on real frames vs the simulator: agreement", lambda r: f(r["judge_on_real_agreement"])),
    ]
    lines = ["| held-out base-policy trajectories, full horizon | " + " | ".join(
        f"{t.split('/')[1][:-3]} ({rep['per_task'][t]['trajectories']})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks)]
    lines += [f"| {name} | " + " | ".join(fn(rep["per_task"][t]) for t in tasks) + " |" for name, fn in rows]
    return "\n".join(lines) + "\n"


def print_report(rep, tasks):
    print(f"\n{'task':18s} {'pusher h8 true/shuf/copy':>25s} {'target h24 in-r':>15s} {'lost h40':>9s} "
          f"{'judge agr':>9s} {'RM agr':>7s} {'adv corr':>8s} {'recall':>6s} {'RM-real agr':>11s}")
    for t in tasks:
        r = rep["per_task"][t]
        p = f"{r['pusher_err_px_by_horizon'][7]:.1f}/{r['pusher_err_px_shuffled_by_horizon'][7]:.1f}/{r['pusher_err_px_copy_by_horizon'][7]:.1f}"
        within = [v for k, v in r.items() if k.endswith("within_radius_h24")]
        lost = [v for k, v in r.items() if k.endswith("lost_h40")]
        print(f"{t:18s} {p:>25s} {(f'{min(within):.2f}' if within else '-'):>15s} {(f'{max(lost):.2f}' if lost else '-'):>9s} "
              f"{r['judge_agreement']:9.2f} {r['reward_agreement']:7.2f} {r['reward_advantage_correlation']:8.2f} "
              f"{r['reward_recall']:6.2f} {r.get('reward_real_agreement', float('nan')):11.2f}")
    print(f"trajectories {rep['trajectories']:.0f}, imagined {rep['imagined_frames_per_s']:.0f} frames/s, wall {rep.get('wall_time_s', 0) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------------------


def train_world_model(args, codec, train_eps, policy_eps, B):
    """Teacher forcing, then the unroll curriculum on all real data; then unrolled alignment to the policy's data."""
    def encode(eps):
        with torch.no_grad():
            return ([codec.encode(torch.from_numpy(e["frames"]).to(args.device)) for e in eps],
                    [torch.from_numpy(e["actions"]).to(args.device) for e in eps])

    C, K = args.wm.context, args.wm.chunk
    w_all = Windows(*encode(train_eps), train_eps, C, K, args.motion_windows)
    bounds = [int(f * args.wm_steps) for f in args.curriculum]
    unroll_at = lambda step: [0, 2, 4, 8][sum(step >= b for b in bounds)]  # noqa: E731
    wm = wmpo.WorldModel(args.wm).to(args.device)
    wm = train_loop(wm, "wm_pretrain", args, args.wm_steps, lambda net, step: net(*w_all.sample(B), unroll_at(step)),
                    args.lr, "wm", lr_mult=lambda step: 1.0 if unroll_at(step) == 0 else 0.4)
    if policy_eps and args.wm_finetune_steps > 0:
        w_pol = Windows(*encode(policy_eps), policy_eps, C, K, args.motion_windows)

        def aligned(net, step):  # 3/4 base-policy rollouts, 1/4 everything else (no forgetting of rarer contacts)
            zp, ap = w_pol.sample(3 * B // 4)
            za, aa = w_all.sample(B - len(zp))
            return net(torch.cat([zp, za]), torch.cat([ap, aa]), 8)

        wm = train_loop(wm, "wm", args, args.wm_finetune_steps, aligned, args.lr * 0.3, "wm-align")
    else:
        wmpo.save(wm, os.path.join(args.run_dir, "wm.safetensors"), args.wm_steps)
    return wm.eval().requires_grad_(False)


def train_codec(args, frames, world):
    args.codec.table_rgb = tuple((frames[:2000].reshape(-1, 3).float().median(0).values / 127.5 - 1).tolist())
    codec = wmpo.FrameCodec(args.codec).to(args.device)
    codec = train_loop(codec, "codec", args, args.codec_steps,
                       lambda net, step: net(frames[torch.randint(len(frames), (8 * args.batch_size // world,))].to(args.device)),
                       args.lr, "codec")
    return codec.eval().requires_grad_(False)


def check(args):
    """The <= 5-minute diagnostic: PushCube, noisy-expert data only; pusher error at h=8, true vs shuffled actions."""
    t0 = time.time()
    # its own folder (it must never resume from, or overwrite, a full run's models) and a fixed small budget
    args.run_dir = os.path.join(args.run_dir, "check")
    args.tasks, args.wm_finetune_steps = ("wmpo/PushCube-v0",), 0
    for k, v in [("explore_per_level", 60), ("codec_steps", 400), ("wm_steps", 600)]:
        if getattr(args, k) < 0:  # explicit flags win (the test runs it with a few steps, to see it fail)
            setattr(args, k, v)
    sets = collect_all(args, None)
    held = envs.collect(args.tasks[0], envs.expert_policy(0.5, seed=9), envs.seeds("heldout", args.tasks[0], 32, start=8000),
                        desc="check held-out", full_horizon=True)
    frames = torch.from_numpy(np.concatenate([e["frames"] for e in sets["explore"]]))
    codec = train_codec(args, frames, 1)
    wm = train_world_model(args, codec, sets["explore"], [], args.batch_size)
    world = wmpo.WorldModelEnv(wm, codec, args.device)
    G = 8
    held = [{**e, "frames": e["frames"][:9], "actions": e["actions"][:9]} for e in held]  # one chunk: h = 1..8 only
    d_r = np.stack([detect_objects(e["frames"]) for e in held])
    d_i = np.stack([detect_objects(f) for f in imagine_replay(world, held)])
    shuffled = [held[(i + G) % len(held)]["actions"] for i in range(len(held))]  # another group's actions
    d_s = np.stack([detect_objects(f) for f in imagine_replay(world, held, shuffled)])
    true, shuf = error_curves(d_r, d_i)[7, 0], error_curves(d_r, d_s)[7, 0]
    copy = error_curves(d_r, np.repeat(d_r[:, :1], 9, 1))[7, 0]
    ok = true < shuf / 3
    res = {"pusher_err_px_h8": float(true), "shuffled": float(shuf), "copy": float(copy), "pass": bool(ok),
           "wm_steps": args.wm_steps, "wall_s": time.time() - t0}
    wmpo.atomic_write(os.path.join(args.run_dir, "check.json"), lambda tmp: open(tmp, "w").write(json.dumps(res, indent=1)))
    print(f"check: pusher error at h=8 {true:.2f} px with true actions, {shuf:.2f} px shuffled, {copy:.2f} px copy-last-frame "
          f"-> {'PASS' if ok else 'FAIL'} (true < shuffled / 3), {res['wall_s']:.0f} s")
    if not ok:
        raise SystemExit(1)


def main(args: Args):
    if args.check:
        return check(args)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) < 0:
            setattr(args, k, v)
    for t in args.tasks:
        envs.make(t).close()
    for k in ["budget", "batch_size", "lr", "eval_every", "group_size", "heldout_groups", "val_share"]:
        if not getattr(args, k) > 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    budget_split(args)  # a budget too small for the tasks fails here, before any work
    if args.group_size < 2:
        raise SystemExit(f"error: --group-size must be >= 2 (advantages are within groups), got {args.group_size}")
    rank, world = wmpo.dist_init()
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must divide over {world} processes")
    B = args.batch_size // world  # this rank's share of every batch
    torch.manual_seed(args.seed + rank)  # ranks draw different windows and noise: together, one global batch
    np.random.seed(args.seed + rank)
    print(f"train_wm: preset {args.preset}: codec {args.codec_steps}, wm {args.wm_steps} + {args.wm_finetune_steps}, "
          f"reward {args.reward_steps} steps; {args.explore_per_level} exploratory episodes per task and noise level")
    t_start = time.time()
    policy_path = wmpo.require(os.path.join(args.run_dir, "policy_sft.safetensors"), f"python train_policy.py sft --run-dir {args.run_dir}")
    policy = wmpo.load(policy_path, args.device, expect="VLA").eval()
    if rank == 0:  # rank 0 collects every data set and writes every file; the others read what it saved
        wmpo.write_args(args.run_dir, "train_wm", args)
        collect_all(args, policy)
    wmpo.barrier()
    sets = collect_all(args, policy)
    train_eps = sets["demos"] + sets["explore"] + sets["rollouts"]
    # the real budget, counted: every trajectory drawn with the policy that trains or chooses anything
    used = {"rollouts": len(sets["rollouts"]), "val": len(sets["val"])}
    budget = {"budget": args.budget, "real_trajectories": sum(used.values()), **used,
              "heldout_not_counted": len(sets["heldout"])}  # measurement only: the fidelity report, like eval.py
    assert budget["real_trajectories"] <= args.budget, budget
    if rank == 0:
        data = json.dumps(budget, indent=1)
        wmpo.atomic_write(os.path.join(args.run_dir, "budget.json"), lambda tmp: open(tmp, "w").write(data))

    # -- 1. frame codec, 2. world model --
    codec = train_codec(args, torch.from_numpy(np.concatenate([e["frames"] for e in train_eps])), world)
    wm = train_world_model(args, codec, train_eps, sets["rollouts"], B)
    imag_world = wmpo.WorldModelEnv(wm, codec, args.device)

    # -- 3. reward models: ours (real clips + imagined replays with real labels, threshold on imagined validation
    #       replays) and the paper's (real clips only, threshold on real validation episodes) as a baseline --
    rng = np.random.default_rng(args.seed)  # the same replay subset on every rank
    replay_eps = [e for t in args.tasks for e in (lambda es: [es[i] for i in rng.permutation(len(es))[: args.reward_replays]])(
        [e for e in train_eps if e["task"] == t])]
    replay_imag = imagine_replay(imag_world, replay_eps)
    replayed = {id(e) for e in replay_eps}
    rest = [e for e in train_eps if id(e) not in replayed]
    val_real, val_imag = [e["frames"] for e in sets["val"]], imagine_replay(imag_world, sets["val"])
    val_succ = np.array([bool(e["success"].any()) for e in sets["val"]])
    rewards = {}
    for name, frac, val_frames in [("reward", args.reward_imagined, val_imag), ("reward_real", 0.0, val_real)]:
        rm = wmpo.RewardModel(args.reward).to(args.device)
        rm = train_loop(rm, name, args, args.reward_steps,
                        lambda net, step: net(*clip_batch(replay_eps + rest, replay_imag, codec, args.reward.clip,
                                                          4 * B, args.device, frac, rm.text.words)), args.lr, name)
        rm.eval().requires_grad_(False)
        if rank == 0:
            rm.cfg.threshold = choose_threshold(reward_probs(rm, val_frames, [e["instruction"] for e in sets["val"]], args.device), val_succ)
            wmpo.save(rm, os.path.join(args.run_dir, f"{name}.safetensors"), args.reward_steps)
            print(f"{name} threshold {rm.cfg.threshold:.3f} (validation episodes, {'imagined' if frac > 0 else 'real'} replays)")
        rewards[name] = rm
    if rank > 0:  # the report and every file are rank 0's
        return

    # -- 4. fidelity report on held-out groups --
    per_task = {}
    for task in args.tasks:
        per_task[task], gif = task_report(args, imag_world, rewards, [e for e in sets["heldout"] if e["task"] == task], task)
        side_by_side_gif(gif, os.path.join(args.run_dir, "videos", f"wm_{task_name(task)}.gif"))
    rep = mean_over_tasks(per_task)
    rep["trajectories"] = sum(r["trajectories"] for r in per_task.values())
    rep["real_budget"] = budget  # what P paid for (budget.json)
    rep["imagined_frames_per_s"] = imagined_fps(imag_world)
    env = envs.make(args.tasks[0])
    env.reset(seed=0)
    t0 = time.time()
    for _ in range(200):
        env.step(env.action_space.sample())
    rep["real_env_steps_per_s"] = 200 / (time.time() - t0)
    env.close()
    rep["wall_time_s"] = time.time() - t_start
    rep["per_task"] = per_task
    data = json.dumps(rep, indent=1)
    wmpo.atomic_write(os.path.join(args.run_dir, "wm_report.json"), lambda tmp: open(tmp, "w").write(data))
    md = report_markdown(rep)
    wmpo.atomic_write(os.path.join(args.run_dir, "wm_report.md"), lambda tmp: open(tmp, "w").write(md))
    print_report(rep, args.tasks)


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # one clear line, non-zero exit
        raise SystemExit(f"error: {e}")
