"""Is imagination faithful? The measurements behind train_wm.py's fidelity report (wm_report.json / .md).

The same colour-blob detector runs on real and imagined frames: per-object error against the horizon (true,
shuffled and copy-the-first-frame baselines), pushed blocks kept or lost, the geometric judge, and how often the
reward model's verdict on an imagined rollout agrees with what really happened (outcome agreement, advantage
correlation within GRPO groups, precision and recall). A library for train_wm.py, not an entry script.
"""

import os
import time

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import envs
import wmpo


@torch.no_grad()
def imagine_replay(world: wmpo.WorldModelEnv, episodes, actions=None, batch=64):
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
def reward_probs(reward: wmpo.RewardModel, frames_list, instructions, device, batch=64):
    """Per-frame clip success probabilities for variable-length trajectories."""
    out = []
    for s in range(0, len(frames_list), batch):
        fl = frames_list[s : s + batch]
        T = max(len(f) for f in fl)
        pad = np.stack([np.concatenate([f, np.repeat(f[-1:], T - len(f), 0)]) for f in fl])
        p = reward(torch.from_numpy(pad).to(device), reward.text.tokenize(instructions[s : s + batch])).cpu()
        out += [p[i, : len(f)].numpy() for i, f in enumerate(fl)]
    return out


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


def outcome_stats(real: np.ndarray, imag: np.ndarray, G: int) -> dict:
    """Agreement, precision / recall of imagined success and the correlation of group-normalised advantages."""
    from kernels.grpo import group_advantages

    ar = group_advantages(torch.tensor(real, dtype=torch.float32), G).numpy()
    ai = group_advantages(torch.tensor(imag, dtype=torch.float32), G).numpy()
    mixed = np.repeat(rearrange(real.astype(np.float32), "(b g) -> b g", g=G).std(1) > 0, G)  # real outcomes differ
    corr = float(np.corrcoef(ar[mixed], ai[mixed])[0, 1]) if mixed.any() and ai[mixed].std() > 0 else 0.0
    return {"agreement": float((real == imag).mean()), "advantage_correlation": corr,
            "precision": float((real & imag).sum() / max(imag.sum(), 1)),
            "recall": float((real & imag).sum() / max(real.sum(), 1)),
            "imagined_success_rate": float(imag.mean()), "mixed_groups": int(mixed.sum() // G)}


def error_curves(d_ref: np.ndarray, d_hat: np.ndarray) -> np.ndarray:
    """Per-object centroid error (px) against horizon. d_ref, d_hat (N, T, 3, 2) -> (T-1, 3): mean over episodes
    where the object is visible in the reference; an object the model lost counts as 32 px (half the image)."""
    dist = np.where(np.isnan(d_hat[..., 0]), 32.0, np.linalg.norm(d_hat - d_ref, axis=-1))  # (N, T, 3)
    dist = np.where(np.isnan(d_ref[..., 0]), np.nan, dist)
    with np.errstate(all="ignore"):
        return np.nanmean(dist, 0)[1:]


def task_report(world, rewards, eps, task, G: int, device) -> tuple[dict, list]:
    """Fidelity of the world model (+ reward models) on one task's held-out full-horizon groups."""
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
        contact = [(n, t + 1) for n, e in enumerate(eps) for t in envs.block_motion(e)
                   if np.linalg.norm(e["object_pos"][t + 1, names.index(o)] - e["object_pos"][t,
                       names.index(o)]) > 1e-3]
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
        judges[name] = [p >= rm.cfg.threshold for p in reward_probs(rm, imag, instr, device)]
        p_real = reward_probs(rm, [e["frames"] for e in eps], instr, device)
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
               imagined_success_rate=rep["reward_imagined_success_rate"],
               reward_threshold=rewards["reward"].cfg.threshold,
               reward_f1=rep["reward_frame_f1_real"])
    def psnr(a, b):
        return 10 * np.log10(255**2 / np.maximum(((a.astype(np.float32) - b) ** 2).mean((-3, -2, -1)), 1e-3))

    rep["psnr_by_horizon"] = np.mean([psnr(e["frames"], f) for e, f in zip(eps, imag)], 0)[1:].tolist()
    rep["psnr_copy_baseline_by_horizon"] = np.mean([psnr(e["frames"], e["frames"][:1]) for e in eps], 0)[1:].tolist()
    # zero actions: the real scene stands still (the pusher at rest holds its place), so any change is drift. One
    # episode per group: a group's G episodes share their first frame, and the world model is deterministic
    starts = eps[::G][:64]
    still = imagine_replay(world, starts, [np.zeros_like(e["actions"]) for e in starts])
    d_z = np.stack([detect_objects(f) for f in still])[:, :, DETECTOR["pusher"]]
    drift = np.linalg.norm(d_z - d_r[::G][: len(starts), :1, DETECTOR["pusher"]], axis=-1)
    rep["zero_action_pusher_drift_px_by_horizon"] = np.nanmean(np.where(np.isnan(drift), 32.0, drift), 0)[1:].tolist()
    rep["zero_action_psnr_by_horizon"] = np.mean([psnr(e["frames"][:1], f) for e, f in zip(starts, still)],
                                                 0)[1:].tolist()
    picks = [i for i in range(len(eps)) if real[i]][:3] + [i for i in range(len(eps)) if not real[i]][:3]
    gif = [(eps[i]["frames"], imag[i], bool(real[i]), bool(judges["reward"][i].any())) for i in picks]
    return rep, gif


def group_census(success: np.ndarray, G: int) -> dict:
    """Shares of GRPO groups (G consecutive outcomes) that all fail, all succeed (no signal) or are mixed."""
    k = rearrange(success.astype(np.int64), "(b g) -> b g", g=G).sum(1)
    return {"all_fail": float((k == 0).mean()), "all_success": float((k == G).mean()),
            "mixed": float(((k > 0) & (k < G)).mean())}


def data_census(sets: dict) -> dict:
    """What each data set holds per task: episodes, frames and the share that succeeded (a world model learns an
    outcome only from data that shows it; each task's training data should mix successes and failures)."""
    census = {}
    for name, eps in sets.items():
        census[name] = {}
        for t in dict.fromkeys(e["task"] for e in eps):
            es = [e for e in eps if e["task"] == t]
            census[name][t] = {"episodes": len(es), "frames": sum(len(e["frames"]) for e in es),
                               "success": float(np.mean([e["success"].any() for e in es]))}
    return census


def print_census(census: dict) -> None:
    for name, per_task in census.items():
        for t, c in per_task.items():
            print(f"{name:9s} {t:22s}: {c['episodes']:5d} episodes, {c['frames']:6d} frames, "
                  f"success {c['success']:.0%}")


@torch.no_grad()
def grpo_path(world, policy, reward, eps, task: str, G: int, temperature: float, states: int) -> dict:
    """Imagination exactly as GRPO runs it (wmpo.rollout): `states` initial states drawn from the held-out groups'
    first frames, G samples each at the rollout temperature, E = policy.cfg.execute actions per step, the task's full
    horizon, judged by the reward model at its threshold. Beside it the real held-out groups (the same policy,
    temperature and pool of initial states in the simulator): success rate and the group census."""
    starts = (torch.from_numpy(np.stack([e["frames"][0] for e in eps[::G]])), [e["instruction"] for e in eps[::G]])
    imagined = wmpo.WorldModelEnv(world.wm, world.codec, world.device, reward, starts)
    imag = wmpo.rollout(policy, imagined, envs.horizon(task), states, G, temperature)["success"].numpy()
    real = np.array([bool(e["success"].any()) for e in eps])
    rep = {"grpo_path_trajectories": len(imag), "grpo_path_imagined_success": float(imag.mean()),
           "grpo_path_real_success": float(real.mean())}
    for name, s in [("imagined", imag), ("real", real)]:
        rep.update({f"grpo_path_{name}_{k}": v for k, v in group_census(s, G).items()})
    return rep


def side_by_side_gif(pairs, path):
    """Rows of (real | imagined) episodes; a green or red bar under each shows the real / imagined verdict."""
    import imageio

    T = max(len(r) for r, _, _, _ in pairs)
    rows = []
    for real, imag, rs, iv in pairs:
        pad = lambda f: np.concatenate([f, np.repeat(f[-1:], T - len(f), 0)])  # noqa: E731
        bar = lambda ok: np.broadcast_to(  # noqa: E731
            np.array([40, 220, 40] if ok else [230, 40, 40], np.uint8), (T, 4, 64, 3))
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


def real_env_steps_per_s(task: str, steps: int = 200) -> float:
    """The simulator's single-env speed on the same machine, the baseline beside imagined_fps."""
    env = envs.make(task)
    env.reset(seed=0)
    t0 = time.time()
    for _ in range(steps):
        env.step(env.action_space.sample())
    env.close()
    return steps / (time.time() - t0)


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
    def at(r, key, h, or_last=False):
        v = r.get(key, [])
        return v[min(h, len(v)) - 1] if v and (or_last or h <= len(v)) else None
    def blocks(r, key):
        return " / ".join(f(r[f"{b}_{key}"]) for b in ["block_red", "block_blue"] if f"{b}_{key}" in r) or "–"
    rows = [
        ("pusher error px at h=8: true / shuffled actions / copy-first-frame", lambda r: " / ".join(
            f(at(r, f"pusher_err_px{k}_by_horizon", 8), 1) for k in ["", "_shuffled", "_copy"])),
        ("pusher error px at h=16 / 24 / 40 (success radius 3.84)", lambda r: " / ".join(
            f(at(r, "pusher_err_px_by_horizon", h), 1) for h in (16, 24, 40))),
        ("pushed blocks (red / blue): within the success radius of the real block at h=24",
         lambda r: blocks(r, "within_radius_h24")),
        ("pushed blocks (red / blue): lost (< 3 px of their colour) at h=40", lambda r: blocks(r, "lost_h40")),
        ("blocks (red / blue): error px on frames where they move", lambda r: blocks(r, "contact_err_px")),
        ("geometric judge on imagined frames: agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r[f"judge_{k}"]) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("reward model (real + imagined clips): agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r[f"reward_{k}"]) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("reward model, real clips only (paper): agreement / adv. corr. / precision / recall", lambda r: " / ".join(
            f(r.get(f"reward_real_{k}")) for k in ["agreement", "advantage_correlation", "precision", "recall"])),
        ("stop-at-success variant, judge / reward model: agreement",
         lambda r: f"{f(r['judge_stop_at_success_agreement'])} / {f(r['reward_stop_at_success_agreement'])}"),
        ("real / imagined (reward model) success rate; groups with mixed real outcomes",
         lambda r: f"{f(r['real_success_rate'])} / {f(r['reward_imagined_success_rate'])}; "
                   f"{r['reward_mixed_groups']}"),
        ("judge on real frames vs the simulator: agreement", lambda r: f(r["judge_on_real_agreement"])),
        ("zero actions, at h=40 (or the horizon): pusher drift px / PSNR dB vs the still first frame",
         lambda r: f"{f(at(r, 'zero_action_pusher_drift_px_by_horizon', 40, True), 1)} / "
                   f"{f(at(r, 'zero_action_psnr_by_horizon', 40, True), 1)}"),
        ("GRPO's path (policy at its temperature, E per step, full horizon): real / imagined success; mixed groups",
         lambda r: f"{f(r.get('grpo_path_real_success'))} / {f(r.get('grpo_path_imagined_success'))}; "
                   f"{f(r.get('grpo_path_real_mixed'))} / {f(r.get('grpo_path_imagined_mixed'))}"),
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
        p = "/".join(f"{r[f'pusher_err_px{k}_by_horizon'][7]:.1f}" for k in ["", "_shuffled", "_copy"])
        within = [v for k, v in r.items() if k.endswith("within_radius_h24")]
        lost = [v for k, v in r.items() if k.endswith("lost_h40")]
        within, lost = f"{min(within):.2f}" if within else "-", f"{max(lost):.2f}" if lost else "-"
        print(f"{t:18s} {p:>25s} {within:>15s} {lost:>9s} "
              f"{r['judge_agreement']:9.2f} {r['reward_agreement']:7.2f} {r['reward_advantage_correlation']:8.2f} "
              f"{r['reward_recall']:6.2f} {r.get('reward_real_agreement', float('nan')):11.2f}")
    print(f"trajectories {rep['trajectories']:.0f}, imagined {rep['imagined_frames_per_s']:.0f} frames/s, "
          f"wall {rep.get('wall_time_s', 0) / 60:.1f} min")
