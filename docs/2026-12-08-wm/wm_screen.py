# The world-model screen of 2026-12-08 (experiments.md): run `python train_wm.py --check --run-dir runs/check-b` first
# (its data and codec), then: python docs/2026-12-08-wm/wm_screen.py WIDTH D HEADS STEPS WINDOW_CHUNKS [frames|latents] [SEED]
"""Screen world-model sizes on the check's data (PushCube noisy-expert, 40/level) with the check's codec: train
s/step, imagination frames/s on GRPO's path (E=2 step calls, decode every frame), pusher/red-block error at h=8/24/40."""
import os, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import envs, wmpo, fidelity  # noqa: E402
torch.manual_seed(int(sys.argv[7]) if len(sys.argv) > 7 else 0)
width, d, heads, steps, chunks = (int(x) for x in sys.argv[1:6])
ctx_from = sys.argv[6] if len(sys.argv) > 6 else "frames"
eps = sum([envs.load_episodes(f"runs/check-b/check/data/explore-pushcube-v0-{n}-40.safetensors") for n in ("0.3", "0.7", "1.2")], [])
codec = wmpo.load("runs/check-b/check/codec.safetensors", "cpu", expect="FrameCodec").eval().requires_grad_(False)
with torch.no_grad():
    z = [codec.encode(torch.from_numpy(e["frames"])) for e in eps]
w = wmpo.Windows(z, [torch.from_numpy(e["actions"]) for e in eps], eps, 4, 8, 0.5)
cfg = wmpo.WorldModelConfig(width=width, d=d, n_head=heads, context_from=ctx_from)
wm = wmpo.WorldModel(cfg)
npar = sum(p.numel() for p in wm.parameters())
opt = torch.optim.AdamW(wm.parameters(), lr=2e-3, weight_decay=1e-4)
t0 = time.time()
for s in range(steps):
    u = 0 if s < int(0.7 * steps) else 8
    for g in opt.param_groups: g["lr"] = wmpo.lr_at(s, steps, 2e-3 * (1 if u == 0 else 0.4), warmup=20, floor=0.1)
    loss, logs = wm(*w.sample(8, 1 if u == 0 else chunks), u, codec); loss.backward()
    torch.nn.utils.clip_grad_norm_(wm.parameters(), 1.0); opt.step(); opt.zero_grad()
dt = (time.time() - t0) / steps
wm.eval().requires_grad_(False)
world = wmpo.WorldModelEnv(wm, codec)
first = torch.from_numpy(np.stack([e["frames"][0] for e in eps[:64]]))
t = time.time()
world.reset(first, [e["instruction"] for e in eps[:64]])
for _ in range(20):
    world.step(torch.rand(64, 2, 2) * 2 - 1)
fps = 64 * 40 / (time.time() - t)
held = envs.collect("wmpo/PushCube-v0", envs.expert_policy(0.5, seed=9), envs.seeds("heldout", "wmpo/PushCube-v0", 32, start=8000), desc="held", full_horizon=True)
held = [{**e, "frames": e["frames"][:41], "actions": e["actions"][:41]} for e in held]
d_r = np.stack([fidelity.detect_objects(e["frames"]) for e in held])
d_i = np.stack([fidelity.detect_objects(f) for f in fidelity.imagine_replay(world, held)])
sh = [held[(i + 8) % len(held)]["actions"] for i in range(len(held))]
d_s = np.stack([fidelity.detect_objects(f) for f in fidelity.imagine_replay(world, held, sh)])
e, es = fidelity.error_curves(d_r, d_i), fidelity.error_curves(d_r, d_s)
print(f"w{width} d{d} h{heads} {ctx_from} chunks{chunks} {npar/1e6:.2f}M, {steps} steps: {dt:.2f} s/step, imagine {fps:.0f} frames/s | "
      f"pusher h8/24/40 {e[7,0]:.1f}/{e[23,0]:.1f}/{e[39,0]:.1f} (shuffled {es[7,0]:.1f}/{es[39,0]:.1f}) red {e[7,1]:.1f}/{e[23,1]:.1f}/{e[39,1]:.1f}", flush=True)
