"""Collect real data, train the frame codec, the world model and the reward model, and measure their fidelity.

    python train_wm.py --preset tiny                  # needs policy_sft.safetensors (python train_policy.py sft)
    python train_wm.py --budget 1280                  # P real rollouts of the base policy for behaviour alignment

Data (all real, in DIR/data): expert demos (from SFT), exploratory noisy-expert episodes at several noise levels
(contact-rich), P rollouts of the base policy at the rollout temperature (failures included: "policy behaviour
alignment"), validation rollouts (reward threshold) and held-out groups of G rollouts from shared initial states
(the fidelity report; never trained on). Writes codec.safetensors, wm.safetensors, reward.safetensors and
wm_report.json (keys in ../shared/INTERFACE.md) plus videos/wm_real_vs_imagined.gif.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import envs
import wmpo


@dataclass
class Args:
    # run
    run_dir: str = "runs/demo"
    preset: str = "tiny"
    """tiny (2 CPU cores, <= 30 min) | small | gpu: step counts below when left at -1"""
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    # data
    budget: int = 128
    """P: real rollouts of the base policy for behaviour alignment (split evenly over tasks)"""
    rollout_temperature: float = 1.0
    """temperature of the base policy's rollouts (the same as WMPO's; see README for why not the paper's 1.6)"""
    explore_noise: tuple[float, ...] = (0.3, 0.7, 1.2)
    """action-noise levels of the exploratory noisy-expert episodes"""
    explore_per_level: int = -1
    """exploratory episodes per task and noise level (-1: preset)"""
    val_per_task: int = 48
    """validation rollouts per task: choose the reward threshold"""
    heldout_groups: int = 22
    """held-out initial states per task, each rolled out G times: the fidelity report (>= 500 trajectories)"""
    group_size: int = 8
    # optim
    codec_steps: int = -1
    wm_steps: int = -1
    """world-model pre-training steps on all real data (-1: preset)"""
    wm_finetune_steps: int = -1
    """then fine-tuning steps on the P base-policy rollouts (policy behaviour alignment; -1: preset)"""
    reward_steps: int = -1
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 500
    """checkpoint interval in steps"""
    codec: wmpo.CodecConfig = field(default_factory=wmpo.CodecConfig)
    wm: wmpo.WorldModelConfig = field(default_factory=wmpo.WorldModelConfig)
    reward: wmpo.RewardConfig = field(default_factory=wmpo.RewardConfig)


PRESETS = {
    "tiny": dict(explore_per_level=40, codec_steps=1500, wm_steps=2500, wm_finetune_steps=500, reward_steps=1500),
    "small": dict(explore_per_level=100, codec_steps=4000, wm_steps=10000, wm_finetune_steps=2000, reward_steps=3000),
    "gpu": dict(explore_per_level=300, codec_steps=20000, wm_steps=60000, wm_finetune_steps=10000, reward_steps=10000),
}


def task_name(task: str) -> str:
    return task.split("/")[1].lower()


def collect_cached(path: str, task: str, act, seeds: list[int], desc: str, **meta) -> list[dict]:
    """Episodes from `path` if a previous run wrote it (same task, policy and seeds), else collect and save."""
    if os.path.exists(path):
        return envs.load_episodes(path)
    eps = envs.collect(task, act, seeds, desc=desc)
    envs.save_episodes(path, eps, **meta)
    return eps


def collect_all(args: Args, policy: wmpo.VLA) -> dict[str, list[dict]]:
    data_dir = os.path.join(args.run_dir, "data")
    sets = {"demos": [], "explore": [], "rollouts": [], "val": [], "heldout": []}
    per_task = max(1, args.budget // len(args.tasks))
    act = wmpo.policy_fn(policy, args.rollout_temperature, args.device)
    for task in args.tasks:
        name = task_name(task)
        sets["demos"] += envs.load_dir(data_dir, f"demos-{name}")
        for i, noise in enumerate(args.explore_noise):
            n = args.explore_per_level
            seeds = envs.seeds("explore", task, n, start=i * 2000)
            sets["explore"] += collect_cached(os.path.join(data_dir, f"explore-{name}-{noise:g}-{n}.safetensors"), task,
                                              envs.expert_policy(noise, seed=i), seeds, f"explore {name} σ={noise}",
                                              policy=f"expert+noise {noise}")
        seeds = envs.seeds("rollouts", task, per_task)
        sets["rollouts"] += collect_cached(os.path.join(data_dir, f"rollouts-{name}-{per_task}.safetensors"), task, act,
                                           seeds, f"rollouts {name}", policy="policy_sft", temperature=args.rollout_temperature)
        seeds = envs.seeds("heldout", task, args.val_per_task, start=5000)
        sets["val"] += collect_cached(os.path.join(data_dir, f"val-{name}-{args.val_per_task}.safetensors"), task, act,
                                      seeds, f"val {name}", policy="policy_sft", temperature=args.rollout_temperature)
        # held-out groups: each initial state rolled out G times (consecutive episodes form a group)
        seeds = [s for s in envs.seeds("heldout", task, args.heldout_groups) for _ in range(args.group_size)]
        sets["heldout"] += collect_cached(os.path.join(data_dir, f"heldout-{name}-{args.heldout_groups}x{args.group_size}.safetensors"),
                                          task, act, seeds, f"heldout {name}", policy="policy_sft", temperature=args.rollout_temperature)
    for k, v in sets.items():
        print(f"{k:9s}: {len(v):5d} episodes, {sum(len(e['frames']) for e in v):6d} frames, "
              f"success {np.mean([e['success'][-1] for e in v]) if v else 0:.0%}")
    if not sets["demos"]:
        raise SystemExit(f"error: no demos in {data_dir}; make them first with: python train_policy.py sft --run-dir {args.run_dir}")
    return sets


def train_loop(model, name: str, args: Args, num_steps: int, loss_fn, lr: float, desc: str, log_name="train_wm"):
    """The one flat loop every model here trains with: AdamW, warmup + cosine, clip 1, atomic checkpoints, resume.
    loss_fn(net) draws this rank's share of a batch and returns net(...)'s (loss, logs); under torchrun net is the
    DistributedDataParallel wrapper (gradients averaged over ranks), else the model. Only rank 0 writes files."""
    rank, world = wmpo.dist_init()
    path = os.path.join(args.run_dir, f"{name}.safetensors")
    state_path = path.replace(".safetensors", ".train.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    state = wmpo.load_train_state(state_path)
    if state is not None and os.path.exists(path) and state.get("stage") == desc:
        model.load_state_dict(wmpo.load_same(path, model.cfg).state_dict())
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming {desc} from step {start}")
    elif os.path.exists(path) and state is not None and state.get("stage") == f"{desc}:done":
        print(f"{desc}: already trained ({path})")
        return wmpo.load(path, args.device)
    net = wmpo.wrap_ddp(model)
    bar = tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = float(lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / num_steps))))  # a numpy float would not load with weights_only
        loss, logs = loss_fn(net)
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


def window_batch(latents: list[torch.Tensor], actions: list[torch.Tensor], C: int, K: int, B: int):
    """Random (C context + K future) latent windows with the K actions between them.

    Before the first frame the context repeats frame 0 (as a rollout starts); past the episode's end the last
    frame repeats under zero actions, which is what the simulator does when the pusher holds still."""
    zs, acts = [], []
    for _ in range(B):
        i = np.random.randint(len(latents))
        z, a = latents[i], actions[i]  # (T+1, c, h, w), (T+1, a) with a zero last row
        T = len(z)
        s = np.random.randint(-C + 1, T - 1)  # first future frame index = s + C
        idx = np.clip(np.arange(s, s + C + K), 0, T - 1)
        aidx = np.arange(s + C - 1, s + C + K - 1)  # action taken on the frame before each future frame
        act = torch.where(torch.from_numpy((aidx >= 0) & (aidx < T - 1))[:, None], a[np.clip(aidx, 0, T - 1)], 0.0)
        zs.append(z[idx])
        acts.append(act)
    return torch.stack(zs), torch.stack(acts)


def clip_batch(episodes: list[dict], codec: wmpo.FrameCodec, L: int, B: int, device):
    """Balanced clips: positives end at a success frame, negatives anywhere else (earlier clips of successes, any
    clip of a failure). Half the clips are autoencoded, so the classifier accepts what the world model draws."""
    frames, words, labels = [], [], []
    succ = [e for e in episodes if e["success"][-1]]
    for j in range(B):
        positive = j % 2 == 0 and succ
        ep = succ[np.random.randint(len(succ))] if positive else episodes[np.random.randint(len(episodes))]
        T = len(ep["frames"])
        if positive:
            end = T - 1
        else:
            last = T - 2 if ep["success"][-1] else T - 1
            end = np.random.randint(0, last + 1)
        idx = np.clip(np.arange(end - L + 1, end + 1), 0, T - 1)
        frames.append(torch.from_numpy(ep["frames"][idx]))
        words.append(wmpo.tokenize([ep["instruction"]])[0])
        labels.append(1 if positive else 0)
    frames = torch.stack(frames).to(device)
    with torch.no_grad():
        half = frames[: B // 2]
        frames[: B // 2] = codec.to_uint8(codec.decode(codec.encode(half)))
    return frames, torch.stack(words).to(device), torch.tensor(labels, device=device)


# ----------------------------------------------------------------------------------------------------------
# fidelity measurements


def detect_objects(frames: np.ndarray, task: str) -> np.ndarray:
    """Colour-blob centroids (row, col) of the moving objects: pusher (white) and, for push tasks, the red and blue
    blocks. The same detector runs on real and imagined frames. frames (T, h, w, 3) -> (T, objects, 2), NaN when
    nothing of that colour is visible."""
    f = frames.astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    masks = [(r > 200) & (g > 200) & (b > 200)]
    if task != "wmpo/Reach-v0":
        masks += [(r > 150) & (g < 100) & (b < 100), (b > 150) & (r < 100) & (g < 130)]
    rows, cols = np.mgrid[0:64, 0:64]
    out = np.full((len(frames), len(masks), 2), np.nan, np.float32)
    for k, m in enumerate(masks):
        n = m.sum((1, 2))
        ok = n >= 3
        out[ok, k, 0] = (m * rows).sum((1, 2))[ok] / n[ok]
        out[ok, k, 1] = (m * cols).sum((1, 2))[ok] / n[ok]
    return out


@torch.no_grad()
def imagine_replay(wm, codec, episodes, device, batch=64, steps=None):
    """Replay each real episode's actions in the world model from its first frame: imagined frames (T+1, h, w, c)."""
    K = wm.cfg.chunk
    out = []
    for start in tqdm(range(0, len(episodes), batch), desc="imagined replay", leave=False):
        eps = episodes[start : start + batch]
        Tmax = max(len(e["frames"]) for e in eps)
        n_chunks = (Tmax - 1 + K - 1) // K
        acts = torch.zeros(len(eps), n_chunks * K, 2)
        for i, e in enumerate(eps):
            acts[i, : len(e["actions"]) - 1] = torch.from_numpy(e["actions"][:-1])
        env = wmpo.WorldModelEnv(wm, codec, device, steps)
        first = torch.from_numpy(np.stack([e["frames"][0] for e in eps]))
        frames = [env.reset(first, [e["instruction"] for e in eps])[:, None].cpu()]
        for c in range(n_chunks):
            frames.append(env.step(acts[:, c * K : (c + 1) * K]).cpu())
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
        p = reward(torch.from_numpy(pad).to(device), wmpo.tokenize(instructions[s : s + batch]).to(device)).cpu()
        out += [p[i, : len(f)] for i, f in enumerate(fl)]
    return out


def verdicts(probs_list, threshold):
    return np.array([bool((p >= threshold).any()) for p in probs_list])


def choose_threshold(probs_list, real_success) -> float:
    """Trajectory-level balanced accuracy on validation episodes, over 20 thresholds in [0.3, 0.97] (as the paper)."""
    best, best_t = -1.0, 0.5
    for t in np.linspace(0.3, 0.97, 20):
        v = verdicts(probs_list, t)
        tpr = (v & real_success).sum() / max(real_success.sum(), 1)
        tnr = (~v & ~real_success).sum() / max((~real_success).sum(), 1)
        if (tpr + tnr) / 2 > best:
            best, best_t = (tpr + tnr) / 2, float(t)
    return best_t


def clip_f1(probs_list, episodes, threshold):
    """Clip-level precision / recall / F1 on held-out real clips: positive = the clip ending at the success frame."""
    tp = fp = fn = 0
    for p, e in zip(probs_list, episodes):
        pred = (p >= threshold).numpy()
        label = np.zeros(len(pred), bool)
        if e["success"][-1]:
            label[-1] = True
        tp += (pred & label).sum()
        fp += (pred & ~label).sum()
        fn += (~pred & label).sum()
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return float(prec), float(rec), float(2 * prec * rec / max(prec + rec, 1e-9))


def report(args, wm, codec, reward, sets, real_steps_per_s) -> dict:
    from kernels.grpo import group_advantages

    G = args.group_size
    per_task = {}
    all_real, all_imag, all_adv_r, all_adv_i = [], [], [], []
    gif_pairs = []
    for task in args.tasks:
        eps = [e for e in sets["heldout"] if e["task"] == task]
        imagined = imagine_replay(wm, codec, eps, args.device)
        instr = [e["instruction"] for e in eps]
        p_real = reward_probs(reward, [e["frames"] for e in eps], instr, args.device)
        p_imag = reward_probs(reward, imagined, instr, args.device)
        thr = reward.cfg.threshold
        real_succ = np.array([bool(e["success"][-1]) for e in eps])
        imag_succ = verdicts(p_imag, thr)
        prec, rec, f1 = clip_f1(p_real, eps, thr)
        # drift: PSNR and object error against horizon (frames ahead of the first, real context frame)
        H = max(len(e["frames"]) for e in eps) - 1
        psnr, psnr_copy = [[] for _ in range(H)], [[] for _ in range(H)]
        err, err_copy = [[] for _ in range(H)], [[] for _ in range(H)]
        for e, im in zip(eps, imagined):
            real = e["frames"].astype(np.float32)
            det_r, det_i = detect_objects(e["frames"], task), detect_objects(im, task)
            for h in range(1, len(real)):
                mse = ((real[h] - im[h].astype(np.float32)) ** 2).mean()
                mse_c = ((real[h] - real[0]) ** 2).mean()
                psnr[h - 1].append(10 * np.log10(255**2 / max(mse, 1e-3)))
                psnr_copy[h - 1].append(10 * np.log10(255**2 / max(mse_c, 1e-3)))
                ok = ~np.isnan(det_r[h, :, 0])
                # an object the model lost counts as 32 px off (half the image): vanishing is the worst error
                d_i = np.where(np.isnan(det_i[h, :, 0]), 32.0, np.linalg.norm(det_i[h] - det_r[h], axis=-1))
                d_c = np.where(np.isnan(det_r[0, :, 0]), 32.0, np.linalg.norm(det_r[0] - det_r[h], axis=-1))
                if ok.any():
                    err[h - 1].append(float(d_i[ok].max()))
                    err_copy[h - 1].append(float(d_c[ok].max()))
        keep = [h for h in range(H) if len(psnr[h]) >= min(10, len(eps))]  # horizons with enough episodes left
        # advantage correlation: group-normalised advantages from real outcomes vs imagined verdicts
        adv_r = group_advantages(torch.tensor(real_succ, dtype=torch.float32), G)
        adv_i = group_advantages(torch.tensor(imag_succ, dtype=torch.float32), G)
        succ_lens = [len(e["frames"]) - 1 for e in eps if e["success"][-1]]
        per_task[task] = {
            "psnr_by_horizon": [float(np.mean(psnr[h])) for h in keep],
            "psnr_copy_baseline_by_horizon": [float(np.mean(psnr_copy[h])) for h in keep],
            "object_err_px_by_horizon": [float(np.mean(err[h])) for h in keep],
            "object_err_px_copy_baseline_by_horizon": [float(np.mean(err_copy[h])) for h in keep],
            "success_radius_px": envs.SUCCESS_R * envs.PX_PER_M,
            "median_success_len": float(np.median(succ_lens)) if succ_lens else None,
            "reward_f1": f1, "reward_precision": prec, "reward_recall": rec, "reward_threshold": thr,
            "real_success_rate": float(real_succ.mean()), "imagined_success_rate": float(imag_succ.mean()),
            "outcome_agreement": float((real_succ == imag_succ).mean()),
            "advantage_correlation": float(np.corrcoef(adv_r, adv_i)[0, 1]) if adv_r.std() > 0 and adv_i.std() > 0 else 0.0,
            "trajectories": len(eps),
        }
        all_real.append(real_succ), all_imag.append(imag_succ), all_adv_r.append(adv_r), all_adv_i.append(adv_i)
        gif_pairs += [(e["frames"], im, bool(s), bool(v)) for e, im, s, v in list(zip(eps, imagined, real_succ, imag_succ))[:G:2]]
    real, imag = np.concatenate(all_real), np.concatenate(all_imag)
    ar, ai = torch.cat(all_adv_r).numpy(), torch.cat(all_adv_i).numpy()
    rep = {}
    for k in per_task[args.tasks[0]]:
        vals = [per_task[t][k] for t in args.tasks]
        if isinstance(vals[0], list):  # mean over tasks at each horizon any task still has
            H = max(len(v) for v in vals)
            rep[k] = [float(np.mean([v[h] for v in vals if h < len(v)])) for h in range(H)]
        else:  # tasks with no value (no successful episode: no median length) are left out of the mean
            vals = [v for v in vals if v is not None]
            rep[k] = float(np.mean(vals)) if vals else None
    rep["outcome_agreement"] = float((real == imag).mean())
    rep["advantage_correlation"] = float(np.corrcoef(ar, ai)[0, 1]) if ar.std() > 0 and ai.std() > 0 else 0.0
    rep["trajectories"] = int(len(real))
    rep["imagined_frames_per_s"] = imagined_fps(wm, codec, args.device)
    rep["real_env_steps_per_s"] = real_steps_per_s
    rep["per_task"] = per_task
    side_by_side_gif(gif_pairs, os.path.join(args.run_dir, "videos", "wm_real_vs_imagined.gif"))
    return rep


def imagined_fps(wm, codec, device, batch=64) -> float:
    env = wmpo.WorldModelEnv(wm, codec, device)
    env.reset(torch.zeros(batch, 64, 64, 3, dtype=torch.uint8), [""] * batch)
    env.step(torch.zeros(batch, wm.cfg.chunk, 2))  # warm-up
    t0 = time.time()
    for _ in range(2):
        env.step(torch.zeros(batch, wm.cfg.chunk, 2))
    return 2 * batch * wm.cfg.chunk / (time.time() - t0)


def side_by_side_gif(pairs, path):
    """Rows of (real | imagined) episodes; a green or red bar under each shows the real / imagined verdict."""
    import imageio

    T = max(len(r) for r, _, _, _ in pairs)
    rows = []
    for real, imag, rs, iv in pairs[:6]:
        pad = lambda f: np.concatenate([f, np.repeat(f[-1:], T - len(f), 0)])  # noqa: E731
        bar = lambda ok: np.broadcast_to(np.array([40, 220, 40] if ok else [230, 40, 40], np.uint8), (T, 4, 64, 3))  # noqa: E731
        left = np.concatenate([pad(real), bar(rs)], 1)
        right = np.concatenate([pad(imag), bar(iv)], 1)
        rows.append(np.concatenate([left, np.zeros((T, 68, 2, 3), np.uint8), right], 2))
    grid = np.concatenate(rows, 1).repeat(2, 1).repeat(2, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, list(grid), duration=0.1, loop=0)


def real_env_speed(task: str, steps: int = 300) -> float:
    env = envs.make(task)
    env.reset(seed=0)
    t0 = time.time()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    env.close()
    return steps / (time.time() - t0)


# ----------------------------------------------------------------------------------------------------------


def main(args: Args):
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) < 0:
            setattr(args, k, v)
    for t in args.tasks:
        envs.make(t).close()
    for k in ["budget", "batch_size", "lr", "eval_every", "group_size", "heldout_groups", "val_per_task"]:
        if not getattr(args, k) > 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    rank, world = wmpo.dist_init()
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must divide over {world} processes")
    B = args.batch_size // world  # this rank's share of every batch
    torch.manual_seed(args.seed + rank)  # ranks draw different windows and noise: together, one global batch
    np.random.seed(args.seed + rank)
    t_start = time.time()
    policy_path = wmpo.require(os.path.join(args.run_dir, "policy_sft.safetensors"), f"python train_policy.py sft --run-dir {args.run_dir}")
    policy = wmpo.load(policy_path, args.device, expect="VLA").eval()
    if rank == 0:  # rank 0 collects every data set and writes every file; the others read what it saved
        wmpo.write_args(args.run_dir, "train_wm", args)
        collect_all(args, policy)
    wmpo.barrier()
    sets = collect_all(args, policy)
    train_eps = sets["demos"] + sets["explore"] + sets["rollouts"]

    # -- 1. frame codec --
    all_frames = torch.from_numpy(np.concatenate([e["frames"] for e in train_eps]))
    args.codec.table_rgb = tuple((all_frames[:2000].reshape(-1, 3).float().median(0).values / 127.5 - 1).tolist())
    codec = wmpo.FrameCodec(args.codec).to(args.device)
    codec = train_loop(codec, "codec", args, args.codec_steps,
                       lambda net: net(all_frames[torch.randint(len(all_frames), (64 // world,))].to(args.device)), args.lr, "codec")
    codec.eval().requires_grad_(False)

    # -- 2. world model: pre-train on all real data, then align to the base policy's own rollouts --
    def encode(eps):
        with torch.no_grad():
            return [codec.encode(torch.from_numpy(e["frames"]).to(args.device)) for e in eps], \
                   [torch.from_numpy(e["actions"]).to(args.device) for e in eps]

    z_all, a_all = encode(train_eps)
    z_pol, a_pol = encode(sets["rollouts"])
    C, K = args.wm.context, args.wm.chunk
    if args.wm.residual_scale == 1.0:  # measure it: 1 / std of 8-frame residuals against the last context frame
        zb, _ = window_batch(z_all, a_all, C, K, 256)
        scale = 1.0 / (zb[:, C:] - zb[:, C - 1 : C]).std().clamp(min=1e-3)
        args.wm.residual_scale = float(wmpo.all_sum(scale) / world)  # one value on every rank: it is in the config
        print(f"world-model residual scale {args.wm.residual_scale:.2f}")
    wm = wmpo.WorldModel(args.wm).to(args.device)
    wm = train_loop(wm, "wm_pretrain", args, args.wm_steps, lambda net: net(*window_batch(z_all, a_all, C, K, B)),
                    args.lr, "wm")

    def aligned_batch(net):  # 3/4 base-policy rollouts, 1/4 everything else (no forgetting of rarer contacts)
        zp, ap = window_batch(z_pol, a_pol, C, K, 3 * B // 4)
        za, aa = window_batch(z_all, a_all, C, K, B - len(zp))
        return net(torch.cat([zp, za]), torch.cat([ap, aa]))

    wm = train_loop(wm, "wm", args, args.wm_finetune_steps, aligned_batch, args.lr * 0.3, "wm-align")
    wm.eval().requires_grad_(False)

    # -- 3. reward model: clips of real and autoencoded frames, threshold on validation episodes --
    reward = wmpo.RewardModel(args.reward).to(args.device)
    reward = train_loop(reward, "reward", args, args.reward_steps,
                        lambda net: net(*clip_batch(train_eps, codec, args.reward.clip, B, args.device)), args.lr, "reward")
    reward.eval().requires_grad_(False)
    if rank > 0:  # the threshold, the report and every file are rank 0's
        return
    p_val = reward_probs(reward, [e["frames"] for e in sets["val"]], [e["instruction"] for e in sets["val"]], args.device)
    reward.cfg.threshold = choose_threshold(p_val, np.array([bool(e["success"][-1]) for e in sets["val"]]))
    wmpo.save(reward, os.path.join(args.run_dir, "reward.safetensors"), args.reward_steps)
    print(f"reward threshold {reward.cfg.threshold:.3f} (validation episodes)")

    # -- 4. fidelity report on held-out groups --
    rep = report(args, wm, codec, reward, sets, real_env_speed(args.tasks[0]))
    rep["wall_time_s"] = time.time() - t_start
    import json

    data = json.dumps(rep, indent=1)
    wmpo.atomic_write(os.path.join(args.run_dir, "wm_report.json"), lambda tmp: open(tmp, "w").write(data))
    print_report(rep, args.tasks)


def print_report(rep, tasks):
    print(f"\n{'task':20s} {'agree':>6s} {'adv corr':>8s} {'RM F1':>6s} {'real succ':>9s} {'imag succ':>9s} "
          f"{'obj err px h=4/8/16 (copy)':>30s}")
    for t in tasks:
        r = rep["per_task"][t]
        e, c = r["object_err_px_by_horizon"], r["object_err_px_copy_baseline_by_horizon"]
        hs = " ".join(f"{e[h - 1]:.1f}({c[h - 1]:.1f})" if h - 1 < len(e) else "-" for h in (4, 8, 16))
        print(f"{t:20s} {r['outcome_agreement']:6.2f} {r['advantage_correlation']:8.2f} {r['reward_f1']:6.2f} "
              f"{r['real_success_rate']:9.2f} {r['imagined_success_rate']:9.2f} {hs:>30s}")
    print(f"{'all':20s} {rep['outcome_agreement']:6.2f} {rep['advantage_correlation']:8.2f} {rep['reward_f1']:6.2f}   "
          f"trajectories {rep['trajectories']}, imagined {rep['imagined_frames_per_s']:.0f} frames/s, "
          f"real {rep['real_env_steps_per_s']:.0f} steps/s, wall {rep.get('wall_time_s', 0) / 60:.1f} min")


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # one clear line, non-zero exit
        raise SystemExit(f"error: {e}")
