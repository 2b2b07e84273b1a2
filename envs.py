"""MuJoCo tabletop tasks for wmpo: pixel observations, language instructions, scripted experts, episode storage,
run folders (atomic writes, <step>.args.json, <step>.metrics.jsonl, flag checks).

    import envs, gymnasium as gym
    env = gym.make("wmpo/PushCube-v0")
    obs, info = env.reset(seed=0)              # obs: (64, 64, 3) uint8, top-down camera
    env.unwrapped.instruction                  # "push the red block onto the green pad"
    obs, r, term, trunc, info = env.step(env.unwrapped.expert_action())

Three tasks of graded difficulty, all on one 0.5 m x 0.5 m table seen from above (7.8 mm per pixel):
    wmpo/Reach-v0     easy     move the white pusher onto the named one of three coloured pads
    wmpo/PushCube-v0  medium   push the named one of two blocks (red, blue) onto the green pad
    wmpo/PushTwo-v0   multi    push one named block onto its pad, then the other block onto the other pad
and their v1 versions (envs.TASKS_V1, not yet the default): Reach-v1 has four pads, PushCube-v1 two blocks and two
pads (the instruction names both), and on the v1 pushing tasks a block is on its pad when its centre is over it
(4.5 cm, not 3 cm) with more time to retry (60 / 100 steps).
The pusher is a disc on planar slide joints; an action in [-1, 1]^2 moves its set-point by up to 4 cm per 0.1 s
step (10 Hz control). Blocks slide on the table (no yaw: fewer degrees of freedom for the world model to learn).
The image alone never says what to do: the instruction names the target, and colours are the only cue.

Speed (../shared/notes/mujoco.md): EGL, shadows and MSAA off, LP_NUM_THREADS=0 (llvmpipe renders inline).
Run `python envs.py` for expert success rates and env steps/s per task.
"""

import functools
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict

os.environ.setdefault("MUJOCO_GL", "egl")  # read once at `import mujoco`: must be set before it
os.environ.setdefault("LP_NUM_THREADS", "0")  # llvmpipe renders inline: 1.7-2.6x faster at 64x64

# Importing torch._dynamo before the first EGL renderer exists avoids a segfault: creating the first torch
# optimizer after MuJoCo's EGL context loads Mesa's LLVM, then Triton's, and the two clash (prototype.md, #9).
import torch._dynamo  # noqa: F401, E402

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ddp  # noqa: E402

IMG = 64  # observation side in pixels
TABLE = 0.25  # table half-size in metres
PX_PER_M = IMG / (2 * TABLE)  # 128 px per metre, 7.8 mm per pixel
PUSHER_R = 0.02  # pusher radius
BLOCK_H = 0.025  # block half-size (5 cm cubes)
PAD_R = 0.045  # pad radius
BLOCK_LIM = 0.155  # blocks stop 9.5 cm inside the edge (a joint limit): the pusher can always get behind them
SUCCESS_R = 0.03  # a block (or the pusher) counts as on a pad within 3 cm of its centre
MAX_DELTA = 0.04  # set-point displacement per step at |a| = 1
SUBSTEPS = 20  # 20 x 5 ms physics steps = 10 Hz control

COLORS = {  # flat colours (emissive materials) so a pixel's colour names its object in every frame
    "red": (0.9, 0.1, 0.1),
    "blue": (0.1, 0.25, 0.95),
    "green": (0.1, 0.8, 0.15),
    "yellow": (0.95, 0.85, 0.1),
    "white": (1.0, 1.0, 1.0),
    "table": (0.3, 0.3, 0.3),
}

# ----------------------------------------------------------------------------------------------------------
# instructions: a tiny template grammar with paraphrases, so the policy must read words, not one fixed string

REACH_TEMPLATES = [
    "move to the {pad} pad",
    "go to the {pad} pad",
    "put the pusher on the {pad} pad",
    "reach the {pad} target",
]
PUSH_TEMPLATES = [
    "push the {block} block onto the {pad} pad",
    "move the {block} block to the {pad} pad",
    "slide the {block} cube onto the {pad} target",
    "put the {block} block on the {pad} pad",
]
PUSH_TWO_TEMPLATES = [
    "push the {block} block onto the {pad} pad, then the {block2} block onto the {pad2} pad",
    "first move the {block} block to the {pad} pad and then the {block2} block to the {pad2} pad",
    "put the {block} block on the {pad} pad and after that the {block2} block on the {pad2} pad",
]


SHIFTS = ("Position", "Background", "Texture")  # evaluation-only perturbations (the paper's generalisation table)
SHIFT_TABLE_RGB = (0.45, 0.33, 0.2)  # Background: a brown table instead of the grey one every training frame shows
SHIFT_CORNER = (0.20, 0.23)  # Position: the pusher starts with |x|, |y| in this range; training layouts use <= 0.19


def scene_xml(blocks: list[str], pads: list[str], shift: str | None = None) -> str:
    """MJCF of the table, the pusher, sliding blocks and flat (collision-free, mocap) pads.

    shift="Background" paints the table brown; shift="Texture" gives every block and pad a checkerboard of its
    colour and a darker shade of it (still the only object of that hue, so the instruction stays unambiguous)."""
    colors = dict(COLORS, table=SHIFT_TABLE_RGB) if shift == "Background" else COLORS
    mats, texs = "", ""
    for n, (r, g, b) in colors.items():
        tex = ""
        if shift == "Texture" and n in blocks + pads:
            texs += (f'<texture name="tex_{n}" type="2d" builtin="checker" width="32" height="32" '
                     f'rgb1="{r} {g} {b}" rgb2="{0.45 * r} {0.45 * g} {0.45 * b}"/>')
            tex = f' texture="tex_{n}" texrepeat="2 2"'
        mats += f'<material name="{n}" rgba="{"1 1 1" if tex else f"{r} {g} {b}"} 1" emission="1" specular="0"{tex}/>'
    mats = texs + mats
    pad_bodies = "".join(
        f'<body name="pad_{c}" mocap="true" pos="0 0 0.001"><geom type="cylinder" size="{PAD_R} 0.001" '
        f'material="{c}" contype="0" conaffinity="0"/></body>'
        for c in pads
    )
    lim = BLOCK_LIM
    block_bodies = "".join(
        f'<body name="block_{c}" pos="0 0 {BLOCK_H + 0.003}">'
        f'<joint name="block_{c}_x" type="slide" axis="1 0 0" range="{-lim} {lim}" damping="8" frictionloss="0.4"/>'
        f'<joint name="block_{c}_y" type="slide" axis="0 1 0" range="{-lim} {lim}" damping="8" frictionloss="0.4"/>'
        f'<geom type="box" size="{BLOCK_H} {BLOCK_H} {BLOCK_H}" material="{c}" mass="0.3"/></body>'
        for c in blocks
    )
    plim = TABLE - PUSHER_R
    return f"""
<mujoco model="wmpo_table">
  <option timestep="0.005" integrator="implicitfast" gravity="0 0 0"/>
  <visual><quality shadowsize="0" offsamples="0"/><global offwidth="{IMG}" offheight="{IMG}"/>
    <headlight ambient="0.3 0.3 0.3" diffuse="0.2 0.2 0.2" specular="0 0 0"/></visual>
  <asset>{mats}</asset>
  <worldbody>
    <camera name="top" pos="0 0 1" xyaxes="1 0 0 0 1 0" fovy="{2 * np.degrees(np.arctan(TABLE / 1.0)):.6f}"/>
    <geom name="table" type="box" size="{TABLE} {TABLE} 0.001" pos="0 0 -0.001" material="table"
          contype="0" conaffinity="0"/>
    {pad_bodies}
    {block_bodies}
    <body name="pusher" pos="0 0 {BLOCK_H + 0.003}">
      <joint name="pusher_x" type="slide" axis="1 0 0" range="{-plim} {plim}" damping="20"/>
      <joint name="pusher_y" type="slide" axis="0 1 0" range="{-plim} {plim}" damping="20"/>
      <geom type="cylinder" size="{PUSHER_R} {BLOCK_H}" material="white" mass="0.5"/>
    </body>
  </worldbody>
  <actuator>
    <position joint="pusher_x" kp="400" ctrlrange="{-plim} {plim}"/>
    <position joint="pusher_y" kp="400" ctrlrange="{-plim} {plim}"/>
  </actuator>
</mujoco>"""


def world_to_px(xy: np.ndarray) -> np.ndarray:
    """Metres on the table -> (row, col) pixel coordinates in the 64x64 top-down image. xy: (..., 2)."""
    xy = np.asarray(xy, dtype=np.float32)
    col = (xy[..., 0] + TABLE) * PX_PER_M - 0.5
    row = (TABLE - xy[..., 1]) * PX_PER_M - 0.5  # image rows grow downwards, y grows upwards
    return np.stack([row, col], axis=-1)


class TabletopEnv(gym.Env):
    """One task family on the shared table. Subclasses set the objects, reset layout, success test and expert."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    blocks: list[str] = []
    pads: list[str] = []
    horizon = 50
    success_r = SUCCESS_R  # a block counts as on its pad within this distance of the pad's centre
    shift: str | None = None  # one of SHIFTS in the perturbed variants (wmpo/<Task>-<Shift>-v0), never in training

    def __init__(self, render_mode: str | None = "rgb_array", full_horizon: bool = False):
        self.render_mode = render_mode
        # full_horizon: never terminate on success, run to the horizon (success = at any step). Imagined rollouts
        # run that way, so the held-out episodes that measure the world model do too.
        self.full_horizon = full_horizon
        self.model = mujoco.MjModel.from_xml_string(scene_xml(self.blocks, self.pads, self.shift))
        self.data = mujoco.MjData(self.model)
        self.renderer = None  # created lazily: a vector env's parent process never renders
        self.observation_space = gym.spaces.Box(0, 255, (IMG, IMG, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pusher_qpos = [self.model.joint(f"pusher_{a}").qposadr[0] for a in "xy"]
        self.block_qpos = {c: [self.model.joint(f"block_{c}_{a}").qposadr[0] for a in "xy"] for c in self.blocks}
        self.pad_mocap = {c: self.model.body(f"pad_{c}").mocapid[0] for c in self.pads}
        self.instruction = ""
        self.object_names = ["pusher"] + [f"block_{c}" for c in self.blocks] + [f"pad_{c}" for c in self.pads]

    # -- state access -------------------------------------------------------------------------------------
    def pusher(self) -> np.ndarray:
        return self.data.qpos[self.pusher_qpos].copy()

    def block(self, c: str) -> np.ndarray:
        return self.data.qpos[self.block_qpos[c]].copy()

    def pad(self, c: str) -> np.ndarray:
        return self.data.mocap_pos[self.pad_mocap[c], :2].copy()

    def object_pos(self) -> np.ndarray:
        """(1 + blocks + pads, 2) ground-truth xy in metres, rows in the order of `self.object_names`."""
        rows = [self.pusher()] + [self.block(c) for c in self.blocks] + [self.pad(c) for c in self.pads]
        return np.stack(rows).astype(np.float32)

    # -- gymnasium API --------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        pusher, blocks, pads, self.instruction = self.sample_layout(self.np_random)
        if self.shift == "Position":  # same layout, but the pusher starts in a corner no training layout reaches
            pusher = self.corner_start(self.np_random, list(blocks.values()) + list(pads.values()))
        self.data.qpos[self.pusher_qpos] = pusher
        self.data.ctrl[:] = pusher
        for c, xy in blocks.items():
            self.data.qpos[self.block_qpos[c]] = xy
        for c, xy in pads.items():
            self.data.mocap_pos[self.pad_mocap[c], :2] = xy
        mujoco.mj_forward(self.model, self.data)
        self.t = 0
        self.waypoint, self.waypoint_steps = None, 0  # the pushing experts' detour memory (see follow_push)
        return self.render(), self.info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        lim = TABLE - PUSHER_R
        # the set-point moves from where the pusher is, not from the last set-point: no wind-up against blocks
        self.data.ctrl[:] = np.clip(self.pusher() + MAX_DELTA * a, -lim, lim)
        mujoco.mj_step(self.model, self.data, nstep=SUBSTEPS)
        self.t += 1
        info = self.info()
        terminated = bool(info["success"]) and not self.full_horizon
        truncated = self.t >= self.horizon and not terminated
        return self.render(), float(terminated), terminated, truncated, info

    def render(self):
        if self.renderer is None:
            self.renderer = mujoco.Renderer(self.model, IMG, IMG)
        self.renderer.update_scene(self.data, camera="top")
        return self.renderer.render()

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None

    def info(self) -> dict:
        return {"success": bool(self.success()), "object_pos": self.object_pos()}

    def follow_push(self, block: str, pad: str, obstacles: list[str]) -> np.ndarray:
        """push_action, but a detour waypoint, once chosen, is kept until reached (or for 8 steps): recomputing it
        every step lets the pusher cycle between two detours forever."""
        p = self.pusher()
        # touching another block (e.g. the one just delivered, when the stage changes): back straight off it first;
        # a detour planned from inside an obstacle's clearance runs through it and knocks it off its pad
        touch = BLOCK_H * np.sqrt(2) + PUSHER_R  # block circumradius + pusher
        for o in [self.block(o) for o in obstacles]:
            dist = np.linalg.norm(p - o)
            if dist < touch:
                self.waypoint = None
                return toward(p, o + (p - o) / max(dist, 1e-6) * (touch + 0.02))
        if self.waypoint is not None and np.linalg.norm(self.waypoint - p) > 0.01 and self.waypoint_steps < 8:
            self.waypoint_steps += 1
            return toward(p, self.waypoint)
        action, self.waypoint = push_action(p, self.block(block), self.pad(pad), [self.block(o) for o in obstacles])
        self.waypoint_steps = 0
        return action

    @staticmethod
    def corner_start(rng, objects: list[np.ndarray]) -> np.ndarray:
        """A pusher start with |x|, |y| in SHIFT_CORNER, at least 8 cm from every block and pad."""
        for _ in range(1000):
            p = rng.uniform(*SHIFT_CORNER, size=2) * rng.choice([-1.0, 1.0], size=2)
            if all(np.linalg.norm(p - o) >= 0.08 for o in objects):
                return p
        raise RuntimeError("no free corner for the pusher")

    # -- per-task pieces --------------------------------------------------------------------------------------
    def sample_layout(self, rng):
        raise NotImplementedError

    def success(self) -> bool:
        raise NotImplementedError

    def expert_action(self) -> np.ndarray:
        raise NotImplementedError


def sample_points(rng, n: int, half: float, min_dist: list[list[float]]) -> np.ndarray:
    """n points uniform in [-half, half]^2 with pairwise distance >= min_dist[i][j] (rejection sampling)."""
    for _ in range(10_000):
        p = rng.uniform(-half, half, size=(n, 2))
        ok = all(np.linalg.norm(p[i] - p[j]) >= min_dist[i][j] for i in range(n) for j in range(i))
        if ok:
            return p
    raise RuntimeError("could not place objects; loosen the layout constraints")


def toward(p: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Action that moves the pusher straight at `goal`, saturating at full speed beyond 4 cm."""
    return np.clip((goal - p) / MAX_DELTA, -1.0, 1.0).astype(np.float32)


def detour(p: np.ndarray, goal: np.ndarray, obstacles: list[np.ndarray]) -> np.ndarray:
    """Waypoint that keeps the pusher's straight path to `goal` clear of other blocks (it would knock them away)."""
    clear = BLOCK_H * np.sqrt(2) + PUSHER_R + 0.015
    seg = goal - p
    dist = np.linalg.norm(seg)
    if dist < 1e-6:
        return goal
    fwd = seg / dist
    for o in obstacles:
        s = float((o - p) @ fwd)
        off = p + s * fwd - o  # from the obstacle to the closest point of the path
        if 0 < s < dist and np.linalg.norm(off) < clear:
            side = off / np.linalg.norm(off) if np.linalg.norm(off) > 1e-6 else np.array([-fwd[1], fwd[0]])
            return o + side * (clear + 0.01) + fwd * clear  # beside and past the obstacle, on the near side
    return goal


def push_lane_dist(block: np.ndarray, pad: np.ndarray, point: np.ndarray) -> float:
    """Distance from `point` to the lane the expert sweeps when it pushes `block` onto `pad` (pre-push point -> pad)."""
    u = (pad - block) / max(np.linalg.norm(pad - block), 1e-6)
    start = block - u * (BLOCK_H * np.sqrt(2) + PUSHER_R + 0.015)
    seg = pad - start
    s = np.clip((point - start) @ seg / (seg @ seg), 0.0, 1.0)
    return float(np.linalg.norm(start + s * seg - point))


LANE_CLEAR = 0.10  # layouts keep other blocks (and the first pad) this far from a push lane: no collisions en route


def push_action(p: np.ndarray, c: np.ndarray, g: np.ndarray, obstacles: list[np.ndarray] = ()) -> tuple:
    """Stateless pushing expert (../shared/notes/mujoco.md §2): get behind the block, then push it through the goal.

    u: unit vector block -> goal; along/lat: the pusher's offset from the block along u and across it.
    Moves that are not pushes go round `obstacles` (the other blocks). Returns (action, detour waypoint or None).
    """
    d = np.linalg.norm(g - c)
    u = (g - c) / max(d, 1e-6)
    perp = np.array([-u[1], u[0]])
    along, lat = float((p - c) @ u), float((p - c) @ perp)
    r = BLOCK_H * np.sqrt(2) + PUSHER_R  # block circumradius + pusher: clear of any corner
    side = 1.0 if lat >= 0 else -1.0
    if abs(lat) < 0.015 and along < -(BLOCK_H + PUSHER_R) + 0.005:  # lined up behind: push, correcting drift
        return toward(p, c + u * min(d + 0.01, 0.05) - perp * lat), None
    if along < -r:  # behind but off the line: go to the pre-push point
        goal = c - u * (r + 0.015)
    elif abs(lat) < r + 0.01:  # beside or in front and close: step sideways, away from the push line
        goal = c + u * along + perp * side * (r + 0.025)
    else:  # clear to the side: slide back behind the block
        goal = c - u * (r + 0.025) + perp * side * (r + 0.025)
    lim = TABLE - PUSHER_R
    way = np.clip(detour(p, goal, list(obstacles)), -lim, lim)
    return toward(p, way), (way if np.linalg.norm(way - goal) > 1e-6 else None)


class Reach(TabletopEnv):
    """Easy: move the pusher onto the named one of three pads."""

    pads = ["red", "green", "blue"]
    horizon = 30

    def sample_layout(self, rng):
        n = len(self.pads)
        pts = sample_points(rng, n + 1, 0.19, [[0.12] * i + [0] for i in range(n + 1)])
        self.target = self.pads[rng.integers(n)]
        text = REACH_TEMPLATES[rng.integers(len(REACH_TEMPLATES))].format(pad=self.target)
        return pts[0], {}, dict(zip(self.pads, pts[1:])), text

    def success(self):
        return np.linalg.norm(self.pusher() - self.pad(self.target)) < SUCCESS_R

    def expert_action(self):
        return toward(self.pusher(), self.pad(self.target))


class PushCube(TabletopEnv):
    """Medium: two blocks, one pad; push the named block onto the pad (the other block is a distractor)."""

    blocks = ["red", "blue"]
    pads = ["green"]
    horizon = 50

    def sample_layout(self, rng):
        # pusher, block 1, block 2, pad. Blocks and pads stay 11 cm inside the edge: the expert can get behind a block.
        while True:
            pts = sample_points(rng, 4, 0.19, [[0], [0.09, 0], [0.09, 0.12, 0], [0.06, 0.12, 0.1, 0]])
            k = rng.integers(2)  # index of the target block
            if np.abs(pts[1:4]).max() < 0.14 and push_lane_dist(pts[1 + k], pts[3], pts[2 - k]) > LANE_CLEAR:
                break
        self.target = self.blocks[k]
        text = PUSH_TEMPLATES[rng.integers(len(PUSH_TEMPLATES))].format(block=self.target, pad="green")
        return pts[0], dict(zip(self.blocks, pts[1:3])), {"green": pts[3]}, text

    def success(self):
        return np.linalg.norm(self.block(self.target) - self.pad("green")) < self.success_r

    def expert_action(self):
        return self.follow_push(self.target, "green", [c for c in self.blocks if c != self.target])


class PushTwo(TabletopEnv):
    """Multi-stage: push block A onto pad A, then block B onto pad B; success when both are on at once."""

    blocks = ["red", "blue"]
    pads = ["green", "yellow"]
    horizon = 80

    def sample_layout(self, rng):
        # Each block starts in its own half of the table with the pad it goes to, both >= 4.5 cm from the midline:
        # the two push lanes can never cross and a push never drives one block into the other (the old layouts let
        # lanes meet and the expert jammed the blocks together on 4-12% of seeds, issue 15). Pads stay 12 cm inside
        # the edge so a block that overshoots its pad does not reach the rim.
        axis, sign = rng.integers(2), rng.choice([-1.0, 1.0])  # split left|right or top|bottom; red's side
        pts = np.zeros((5, 2))  # pusher, red block, blue block, the pad in red's half, the pad in blue's half
        for k, s in [(0, sign), (1, -sign)]:
            while True:  # a block and its pad in half s, at least 9 cm apart
                bp = np.stack([rng.uniform(-0.14, 0.14, 2), rng.uniform(-0.12, 0.12, 2)])  # block, pad
                bp[:, axis] = s * np.array([rng.uniform(0.045, 0.14), rng.uniform(0.045, 0.12)])
                if np.linalg.norm(bp[0] - bp[1]) >= 0.09:
                    break
            pts[1 + k], pts[3 + k] = bp
        while True:  # the pusher anywhere clear of the blocks and pads
            pts[0] = rng.uniform(-0.19, 0.19, 2)
            gaps = np.linalg.norm(pts[1:5] - pts[0], axis=1)  # to the blocks, then the pads
            if gaps[:2].min() >= 0.09 and gaps[2:].min() >= 0.06:
                break
        swap = int(rng.integers(2))  # which pad colour lies in red's half: the instruction, not the layout, pairs them
        if swap:
            pts[[3, 4]] = pts[[4, 3]]
        i = int(rng.integers(2))  # which block goes first
        j = i ^ swap  # its pad: the one in its own half
        self.order = [(self.blocks[i], self.pads[j]), (self.blocks[1 - i], self.pads[1 - j])]
        (b1, p1), (b2, p2) = self.order
        text = PUSH_TWO_TEMPLATES[rng.integers(len(PUSH_TWO_TEMPLATES))].format(block=b1, pad=p1, block2=b2, pad2=p2)
        return pts[0], dict(zip(self.blocks, pts[1:3])), dict(zip(self.pads, pts[3:5])), text

    def on_pad(self, b, p, tol=None):
        return np.linalg.norm(self.block(b) - self.pad(p)) < (tol or self.success_r)

    def success(self):
        return all(self.on_pad(b, p) for b, p in self.order)

    def expert_action(self):
        # stage 1 until the first block is well inside its pad (hysteresis: a block at the rim would be knocked off)
        (b1, p1), (b2, p2) = self.order
        if not self.on_pad(b1, p1, tol=SUCCESS_R * 0.7):
            return self.follow_push(b1, p1, [b2])
        return self.follow_push(b2, p2, [b1])


# ----------------------------------------------------------------------------------------------------------
# v1: the same scenes made so that a base policy's failures are decisions RL can learn away (issue 33), not luck
# at the policy's precision. On v0, a critic that sees every object's true position explains 20% of PushCube's
# outcome: a quarter of its failures pass the block within the pad's own radius but never within the 3 cm rule, and
# a failed push has no time left to be retried. v1 counts a block as on its pad when its centre is over the pad
# (PAD_R, 5.8 px: a rule the 64x64 image resolves), gives time to retry, and makes the instruction choose among
# more objects (Reach: four pads; PushCube: two blocks x two pads), so grounding is a choice sampling can get right.


class ReachV1(Reach):
    """Move the pusher onto the named one of four pads (v0: three)."""

    pads = ["red", "green", "blue", "yellow"]


class PushCubeV1(PushCube):
    """Push the named one of two blocks onto the named one of two pads; on the pad = centre over it; 60 steps."""

    pads = ["green", "yellow"]
    horizon = 60
    success_r = PAD_R

    def sample_layout(self, rng):
        # pusher, block 1, block 2, pad 1, pad 2: the target block's push lane clear of the other block
        d = [[0], [0.09, 0], [0.09, 0.12, 0], [0.06, 0.1, 0.1, 0], [0.06, 0.1, 0.1, 0.12, 0]]
        while True:
            pts = sample_points(rng, 5, 0.19, d)
            k, j = rng.integers(2), rng.integers(2)  # target block, target pad
            if np.abs(pts[1:5]).max() < 0.14 and push_lane_dist(pts[1 + k], pts[3 + j], pts[2 - k]) > LANE_CLEAR:
                break
        self.target, self.target_pad = self.blocks[k], self.pads[j]
        text = PUSH_TEMPLATES[rng.integers(len(PUSH_TEMPLATES))].format(block=self.target, pad=self.target_pad)
        return pts[0], dict(zip(self.blocks, pts[1:3])), dict(zip(self.pads, pts[3:5])), text

    def success(self):
        return np.linalg.norm(self.block(self.target) - self.pad(self.target_pad)) < self.success_r

    def expert_action(self):
        return self.follow_push(self.target, self.target_pad, [c for c in self.blocks if c != self.target])


class PushTwoV1(PushTwo):
    """PushTwo with on the pad = centre over it, and 100 steps."""

    horizon = 100
    success_r = PAD_R


TASKS = ["wmpo/Reach-v0", "wmpo/PushCube-v0", "wmpo/PushTwo-v0"]  # the default suite
# gymnasium calls a -v0 "out of date" once a -v1 exists; here both are kept tasks with their own numbers
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading")
TASKS_V1 = ["wmpo/Reach-v1", "wmpo/PushCube-v1", "wmpo/PushTwo-v1"]
REGISTERED = TASKS + TASKS_V1  # the seed ranges follow this order: v0's seeds never move


def variant(task: str, shift: str) -> str:
    """wmpo/PushCube-v1, "Texture" -> wmpo/PushCube-Texture-v1."""
    name, version = task.rsplit("-", 1)
    return f"{name}-{shift}-{version}"


def base_task(task: str) -> str:
    """wmpo/PushCube-Texture-v0 -> wmpo/PushCube-v0 (a task is its own base)."""
    for shift in SHIFTS:
        task = task.replace(f"-{shift}-", "-")
    return task


# perturbed variants for evaluation only: wmpo/PushCube-v0 -> wmpo/PushCube-Position-v0, -Background-v0, -Texture-v0
VARIANTS = [variant(t, shift) for t in REGISTERED for shift in SHIFTS]


# Disjoint reset-seed ranges per purpose (and per task inside each): evaluation never sees a training layout.
SEED_BASE = {"demos": 0, "explore": 100_000, "rollouts": 200_000, "heldout": 300_000,
             "grpo_real": 500_000, "val": 600_000, "expert": 700_000, "eval": 1_000_000}


def seeds(purpose: str, task: str, n: int, start: int = 0) -> list[int]:
    """n reset seeds for `purpose` on `task`: 10,000 per task inside a purpose's 100,000 block."""
    base = SEED_BASE[purpose] + REGISTERED.index(base_task(task)) * 10_000 + start  # a variant shares its task's
    assert start + n <= 10_000, "seed range exhausted"
    return list(range(base, base + n))


for _name, _cls, _v in [("Reach", Reach, "v0"), ("PushCube", PushCube, "v0"), ("PushTwo", PushTwo, "v0"),
                        ("Reach", ReachV1, "v1"), ("PushCube", PushCubeV1, "v1"), ("PushTwo", PushTwoV1, "v1")]:
    if f"wmpo/{_name}-{_v}" not in gym.registry:
        gym.register(f"wmpo/{_name}-{_v}", entry_point=_cls, max_episode_steps=None)
    for _shift in SHIFTS:  # a subclass per shift, at module level so spawned vector-env workers can import it
        _var = type(f"{_cls.__name__}{_shift}", (_cls,), {"shift": _shift})
        globals()[_var.__name__] = _var
        if f"wmpo/{_name}-{_shift}-{_v}" not in gym.registry:
            gym.register(f"wmpo/{_name}-{_shift}-{_v}", entry_point=_var, max_episode_steps=None)


@functools.lru_cache(maxsize=None)
def object_layout(task: str) -> tuple[list[str], bool]:
    """(object_pos row names, whether the task has blocks), built once per task: an env compiles its MuJoCo model."""
    env = make(task).unwrapped
    out = (list(env.object_names), bool(env.blocks))
    env.close()
    return out


def goal_pairs(task: str, instruction: str) -> list[tuple[str, str]]:
    """The (object, pad) names the instruction asks for, as object_pos row names: [("block_red", "pad_green")].

    Every template names colours in the order object, pad (, object, pad): Reach (pusher, pad), PushCube (block,
    pad), PushTwo (block, pad, block, pad). Success is every pair within SUCCESS_R at once."""
    _, has_blocks = object_layout(task)
    cols = [w for w in instruction.replace(",", " ").split() if w in COLORS]
    if not has_blocks:  # Reach: the pusher is the object
        cols = ["white"] + cols
    return [("pusher" if o == "white" else f"block_{o}", f"pad_{p}") for o, p in zip(cols[::2], cols[1::2])]


def goal_distance(task: str, instruction: str, object_pos: np.ndarray) -> np.ndarray:
    """Summed distance (m) of each object the instruction names to its goal pad, per step: (T, objects, 2) -> (T,).
    Used to find setbacks (an object moving away from its goal) in episodes."""
    names, _ = object_layout(task)
    pairs = [(names.index(o), names.index(p)) for o, p in goal_pairs(task, instruction)]
    return sum(np.linalg.norm(object_pos[:, i] - object_pos[:, j], axis=-1) for i, j in pairs)


def make(task: str, **kwargs) -> gym.Env:
    """gym.make with a clear error for an unknown task id."""
    if task not in REGISTERED + VARIANTS:
        raise ValueError(f"unknown task id {task!r}; known tasks: {', '.join(REGISTERED)} (and their variants "
                         f"<task>-{{{','.join(SHIFTS)}}}-v<n>)")
    return gym.make(task, **kwargs)


@functools.lru_cache(maxsize=None)
def task_attr(task: str, name: str):
    """An attribute of a task's env (built once per task and closed; an unknown id fails here, before any work)."""
    env = make(task)
    out = getattr(env.unwrapped, name)
    env.close()
    return out


def horizon(task: str) -> int:
    """The task's episode length in actions."""
    return task_attr(task, "horizon")


def success_radius(task: str) -> float:
    """How near its pad's centre an object counts as on it (m): SUCCESS_R on v0, the pad's radius on v1."""
    return task_attr(task, "success_r")


# ----------------------------------------------------------------------------------------------------------
# episode storage: safetensors shards, one task per shard (object_pos rows differ between tasks)
#
# An episode of T actions has T + 1 frames. Every per-step array has T + 1 rows: frames[t] is the observation
# on which actions[t] was taken; success[t] says whether frames[t] shows success; the last action row is zeros.

FORMAT = "wmpo-episodes-v1"


def save_episodes(path: str, episodes: list[dict], **meta) -> None:
    """Write episodes (dicts from `collect`) to one shard, atomically (temp file + fsync + rename)."""
    from safetensors.numpy import save_file

    assert episodes, "no episodes to save"
    tasks = {ep["task"] for ep in episodes}
    assert len(tasks) == 1, f"one task per shard, got {sorted(tasks)}"
    lengths = [len(ep["frames"]) for ep in episodes]
    tensors = {
        "frames": np.concatenate([ep["frames"] for ep in episodes]).astype(np.uint8),
        "actions": np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32),
        "success": np.concatenate([ep["success"] for ep in episodes]).astype(np.uint8),
        "object_pos": np.concatenate([ep["object_pos"] for ep in episodes]).astype(np.float32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    if all("labels" in ep for ep in episodes):  # teacher labels (DART demos), optional
        tensors["labels"] = np.concatenate([ep["labels"] for ep in episodes]).astype(np.float32)
    header = {
        "format": FORMAT,
        "task": episodes[0]["task"],
        "episodes": [{"instruction": ep["instruction"], "seed": int(ep["seed"])} for ep in episodes],
        **meta,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"wmpo": json.dumps(header)}))


def load_episodes(path: str) -> list[dict]:
    """Read and validate one shard; any corrupt, truncated or mismatched file raises ValueError naming it."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"episode shard {path} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            header = json.loads((f.metadata() or {}).get("wmpo", "null"))
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise ValueError(f"episode shard {path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"episode shard {path} has no '{FORMAT}' metadata: not written by envs.save_episodes")
    expect = {"frames": np.uint8, "actions": np.float32, "success": np.uint8, "object_pos": np.float32}
    for k, dt in [*expect.items(), ("offsets", np.int64)]:
        if k not in arrays:
            raise ValueError(f"episode shard {path} lacks tensor {k!r}")
        if arrays[k].dtype != dt:
            raise ValueError(f"episode shard {path}: {k} has dtype {arrays[k].dtype}, expected {np.dtype(dt)}")
    n = len(arrays["frames"])
    if arrays["frames"].shape[1:] != (IMG, IMG, 3):
        raise ValueError(f"episode shard {path}: frames have shape {arrays['frames'].shape}, expected [N, 64, 64, 3]")
    for k in ["actions", "success", "object_pos", "labels"]:
        if k in arrays and len(arrays[k]) != n:
            raise ValueError(f"episode shard {path}: {k} has {len(arrays[k])} rows but frames have {n}")
    off = arrays["offsets"]
    if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 2) or len(off) != len(header["episodes"]) + 1:
        raise ValueError(f"episode shard {path}: offsets do not match {n} frames "
                         f"and {len(header['episodes'])} episodes")
    episodes = []
    for i, ep_meta in enumerate(header["episodes"]):
        s, e = off[i], off[i + 1]
        episodes.append(
            {
                "frames": arrays["frames"][s:e],
                "actions": arrays["actions"][s:e],
                "success": arrays["success"][s:e].astype(bool),
                "object_pos": arrays["object_pos"][s:e],
                "task": header["task"],
                "instruction": ep_meta["instruction"],
                "seed": ep_meta["seed"],
                "full_horizon": bool(header.get("full_horizon", False)),  # success did not end it
                **({"labels": arrays["labels"][s:e]} if "labels" in arrays else {}),
            }
        )
    return episodes


def load_dir(folder: str, prefix: str) -> list[dict]:
    """All episodes of the shards `folder/<prefix>-*.safetensors`, in sorted file order."""
    import glob

    paths = sorted(glob.glob(os.path.join(folder, f"{prefix}-*.safetensors")))
    return [ep for p in paths for ep in load_episodes(p)]


# ----------------------------------------------------------------------------------------------------------
# run folders: files written atomically; every step writes <step>.args.json and appends to <step>.metrics.jsonl


def atomic_write(path: str, write_fn) -> None:
    """write_fn(tmp_path), fsync, rename: a kill at any moment leaves either the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write_fn(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_flags(args, positive=(), non_negative=(), at_least: dict | None = None) -> None:
    """Out-of-range flags stop a run before any work, with one line naming the flag (nested: --grpo.lr)."""
    rules = [(n, ">", 0) for n in positive] + [(n, ">=", 0) for n in non_negative]
    for name, op, low in rules + [(n, ">=", low) for n, low in (at_least or {}).items()]:
        value = args
        for part in name.split("."):
            value = getattr(value, part)
        if not (value > low if op == ">" else value >= low):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be {op} {low}, got {value}")


WANDB = {}  # step name -> an open wandb run, when a script was started with --wandb


def write_args(run_dir: str, step_name: str, args) -> None:
    """DIR/<step>.args.json; with --wandb also opens a Weights & Biases run (imported only then; WANDB_MODE=offline
    logs without a network) that log_metrics mirrors to."""
    os.makedirs(run_dir, exist_ok=True)
    data = json.dumps(asdict(args), indent=2, default=str)
    atomic_write(os.path.join(run_dir, f"{step_name}.args.json"), lambda tmp: open(tmp, "w").write(data))
    if getattr(args, "wandb", False):
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --wandb needs the wandb package (pip install wandb), "
                             "which is not in requirements.txt") from None
        WANDB[step_name] = wandb.init(project="wmpo", name=f"{os.path.basename(os.path.abspath(run_dir))}/{step_name}",
                                      dir=run_dir, config=json.loads(data), reinit=True)


def log_metrics(run_dir: str, step_name: str, metrics: dict) -> None:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{step_name}: metric {k} is {v} at step {metrics.get('step')}; stopping, "
                                     f"the last good checkpoint in {run_dir} is kept")
    with open(os.path.join(run_dir, f"{step_name}.metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if step_name in WANDB:
        WANDB[step_name].log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def require(path: str, command: str) -> str:
    """Stop with a message naming the command that makes a missing run-folder input."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; make it first with: {command}")
    return path


# ----------------------------------------------------------------------------------------------------------
# collection: any policy, vectorised envs, a progress bar
#
# A policy is a callable (obs uint8 [n, 64, 64, 3], instructions list[str], venv) -> actions [n, k, 2]: it returns
# a chunk of k actions per env, executed open-loop (k = 1 for the experts, k = 8 for the VLA's action chunks).
# It may return (actions, labels): the episode then also stores "labels", the actions a teacher would have taken.


def expert_policy(noise: float = 0.0, seed: int = 0, dart: bool = False):
    """The scripted expert, optionally with Gaussian action noise of std `noise` (a tunable worse policy).

    dart=True executes the noisy action but labels the step with the clean expert action (DART, Laskey et al.
    2017): the demonstrations then show how to recover from the small errors a cloned policy makes."""
    rng = np.random.default_rng(seed)

    def policy(obs, instructions, venv):
        clean = np.stack(venv.call("expert_action")).astype(np.float32)
        a = np.clip(clean + noise * rng.standard_normal(clean.shape).astype(np.float32), -1, 1)
        return (a[:, None], clean[:, None]) if dart else a[:, None]  # (n, 1, 2)

    return policy


def collect_takeovers(task: str, act, seeds: list[int], noise: float = 0.3, seed: int = 0, path: str = "",
                      **meta) -> list[dict]:
    """Recovery demonstrations: `act` (the base policy) runs one episode per seed; in each failed one the expert takes
    over at a random step k (leaving at least a third of the horizon), after the env replayed the base's own actions
    up to k (the simulator is deterministic), and acts with DART noise, labelled with its clean action. Only the
    part from k on is kept: demonstrations that start in the states the base itself gets lost in. With `path`, read
    from there when a run saved them (as collect_cached), else saved there (with `meta`) unless there were none."""
    if path and os.path.exists(path):
        return load_episodes(path)
    rng = np.random.default_rng(seed)
    H = horizon(task)
    switch = {}  # seed -> (the base's actions before the takeover, k)
    for ep in collect(task, act, seeds, desc=f"base rollouts {task}"):
        if not ep["success"][-1]:
            k = int(rng.integers(1, max(2, H - H // 3)))
            switch[ep["seed"]] = (ep["actions"][:k], k)
    expert = expert_policy(noise, seed=seed, dart=True)

    def takeover(obs, instructions, venv):
        a, clean = expert(obs, instructions, venv)
        for i, (t, s) in enumerate(zip(venv.get_attr("t"), venv.get_attr("np_random_seed"))):
            replay, k = switch.get(s, (None, 0))
            if t < k:
                a[i, 0] = replay[t]
        return a, clean

    out = []
    for ep in collect(task, takeover, list(switch), desc=f"takeovers {task}"):
        k = switch[ep["seed"]][1]
        out.append({**{f: ep[f][k:] for f in ["frames", "actions", "labels", "success", "object_pos"]},
                    **{f: ep[f] for f in ["task", "instruction", "seed"]}})
    if path and out:
        save_episodes(path, out, policy="takeover", **meta)
        return load_episodes(path)  # the episodes exactly as a later run reads them
    return out


def collect_demos(data_dir: str, tasks, budgets, noise: float, seed: int, base=None, recovery=(), base_name: str = ""):
    """SFT's demonstrations: `budgets[i]` expert episodes of tasks[i] (DART: the expert's action plus Gaussian `noise`
    runs, labelled with its clean action), then, with a `base` policy callable, recovery demos from `recovery[i]` of
    its rollouts (collect_takeovers, on seeds the demos never use: 5,000 on). Each shard is saved in data_dir and
    reused by a later run with the same task, budget, noise and base (named by `base_name`, its checkpoint path)."""
    episodes = []
    for task, n in zip(tasks, budgets):
        path = os.path.join(data_dir, f"demos-{task_name(task)}-{n}-dart{noise:g}.safetensors")
        expert = expert_policy(noise, seed=seed, dart=noise > 0)
        eps = collect_cached(path, task, expert, seeds("demos", task, n), f"demos {task}", policy="expert",
                             dart_noise=noise)
        print(f"{task}: {len(eps)} demos, expert success {np.mean([e['success'][-1] for e in eps]):.0%}")
        episodes += eps
    src = hashlib.sha1(os.path.abspath(base_name).encode()).hexdigest()[:8]  # which policy failed
    for task, n in zip(tasks, recovery if base is not None else ()):
        path = os.path.join(data_dir, f"recovery-{task_name(task)}-{n}-{src}-dart{noise:g}.safetensors")
        eps = collect_takeovers(task, base, seeds("demos", task, n, start=5000), noise, seed, path,
                                recovery_from=base_name)
        print(f"{task}: {len(eps)} recovery demos" if eps else f"{task}: no failed rollouts of {base_name} to recover")
        episodes += eps
    return episodes


def make_env(task: str, **kwargs) -> gym.Env:
    # a module-level function pickles by reference: spawned workers import envs (registering ids)
    return gym.make(task, **kwargs)


def make_vec(task: str, n: int, asynchronous: bool = False, **kwargs) -> gym.vector.VectorEnv:
    make(task).close()  # validates the id before any worker starts
    fns = [functools.partial(make_env, task, **kwargs) for _ in range(n)]
    return gym.vector.AsyncVectorEnv(fns, context="spawn") if asynchronous else gym.vector.SyncVectorEnv(fns)


def collect(task: str, policy, seeds: list[int], num_envs: int = 16, asynchronous: bool = False, desc: str = "",
            full_horizon: bool = False):
    """Run `policy` for one episode per seed in `num_envs` vectorised envs; return the episodes (see storage).
    full_horizon: episodes run to the task's horizon even after a success (then success[t] may come and go)."""
    venv = make_vec(task, min(num_envs, len(seeds)), asynchronous, full_horizon=full_horizon)
    episodes = []
    bar = tqdm(total=len(seeds), desc=desc or f"collect {task}", leave=False)
    for start in range(0, len(seeds), venv.num_envs):
        batch = seeds[start : start + venv.num_envs]
        n = len(batch)
        # the last batch may be short: pad with repeats of its seeds and drop them afterwards
        obs, info = venv.reset(seed=[batch[i % n] for i in range(venv.num_envs)])
        instr = list(venv.get_attr("instruction"))
        rec = [
            {"frames": [obs[i]], "actions": [], "labels": [], "success": [bool(info["success"][i])],
             "object_pos": [info["object_pos"][i]]}
            for i in range(venv.num_envs)
        ]
        done = np.zeros(venv.num_envs, bool)
        while not done.all():
            out = policy(obs, instr, venv)
            chunk, labels = (out if isinstance(out, tuple) else (out, None))
            chunk = np.asarray(chunk, dtype=np.float32)
            for j in range(chunk.shape[1]):
                obs, _, term, trunc, info = venv.step(chunk[:, j])
                for i in np.flatnonzero(~done):
                    rec[i]["actions"].append(chunk[i, j])
                    if labels is not None:
                        rec[i]["labels"].append(labels[i, j])
                    rec[i]["frames"].append(obs[i])
                    rec[i]["success"].append(bool(info["success"][i]))
                    rec[i]["object_pos"].append(info["object_pos"][i])
                done |= term | trunc
                if done.all():
                    break
        for i in range(n):
            r = rec[i]
            ep = {
                "frames": np.stack(r["frames"]),
                "actions": np.concatenate([np.stack(r["actions"]), np.zeros((1, 2), np.float32)]),
                "success": np.array(r["success"]),
                "object_pos": np.stack(r["object_pos"]),
                "task": task,
                "instruction": instr[i],
                "seed": batch[i],
                "full_horizon": full_horizon,
            }
            if r["labels"]:
                ep["labels"] = np.concatenate([np.stack(r["labels"]), np.zeros((1, 2), np.float32)]).astype(np.float32)
            episodes.append(ep)
        bar.update(n)
    bar.close()
    venv.close()
    return episodes


def collect_cached(path: str, task: str, act, seeds: list[int], desc: str = "", full_horizon: bool = False,
                   **meta) -> list[dict]:
    """Episodes from `path` if a previous run wrote it (same task, policy and seeds), else collect and save them:
    a killed run re-collects nothing, and the real-trajectory budget is paid once."""
    if os.path.exists(path):
        eps = load_episodes(path)
        if eps[0]["full_horizon"] != full_horizon:
            kind = "run to the horizon" if eps[0]["full_horizon"] else "stop at success"
            raise ValueError(f"episode shard {path} holds episodes that {kind}; this run needs the other kind "
                             "(train_wm.py --full-horizon): move the file away to re-collect it")
        return eps
    eps = collect(task, act, seeds, desc=desc, full_horizon=full_horizon)
    save_episodes(path, eps, full_horizon=full_horizon, **meta)
    return eps


# ----------------------------------------------------------------------------------------------------------
# the real env as GRPO sees it: batched action chunks in, frames out, the simulator's success as the judge


class RealChunkEnv:
    """Real vectorised envs behind the world model's interface (wmpo.WorldModelEnv), so GRPO runs the same code in
    the simulator and in imagination: start / reset, step(action chunks) -> K frames each, judge() -> the
    simulator's per-frame success. Finished envs repeat their last frame (as the world model keeps imagining).
    Every reset is a real trajectory: `real_trajectories` counts them (the budget P)."""

    def __init__(self, task: str, num_envs: int):
        self.task = task
        self.venv = make_vec(task, num_envs)
        self.num_envs = num_envs
        self.real_trajectories = 0
        self.next_seed = 0  # start() draws fresh `grpo_real` seeds from here on: every trajectory is a new one

    def start(self, B: int, G: int):
        """B fresh initial states, each G times -> (frames, instructions). Under torchrun ranks take disjoint seeds."""
        rank, world = ddp.rank_world()  # (0, 1) in a plain run
        fresh = seeds("grpo_real", self.task, B, start=self.next_seed + rank * B)
        self.next_seed += world * B
        frames0 = self.reset([s for s in fresh for _ in range(G)])
        return frames0, self.instructions

    def reset(self, seeds: list[int]):
        obs, info = self.venv.reset(seed=seeds)
        self.real_trajectories += len(seeds)
        self.instructions = list(self.venv.get_attr("instruction"))
        self.done = torch.zeros(self.num_envs, dtype=torch.bool)
        self.last = torch.as_tensor(obs)
        self.success = torch.zeros(self.num_envs, 1, dtype=torch.bool)  # (b, frames so far): the simulator's verdict
        self.object_pos = [np.asarray(info["object_pos"])]  # per frame (b, objects, 2): analysis only, never shown
        return self.last.clone()

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """action chunks (b, K, a) -> K frames, uint8 (b, K, h, w, c); per-frame success appended to self.success."""
        frames, success = [], []
        for j in range(actions.shape[1]):
            obs, _, term, trunc, info = self.venv.step(actions[:, j].cpu().numpy())
            obs = torch.as_tensor(obs)
            self.last = torch.where(self.done[:, None, None, None], self.last, obs)
            succ = torch.as_tensor(info["success"]) & ~self.done
            self.object_pos.append(np.where(self.done[:, None, None].numpy(), self.object_pos[-1], info["object_pos"]))
            self.done |= torch.as_tensor(term | trunc)
            frames.append(self.last.clone())
            success.append(succ)
        self.success = torch.cat([self.success, torch.stack(success, 1)], 1)
        return torch.stack(frames, 1)

    def judge(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame success (b, t) bool since the last reset: what the simulator said (the frames are its own)."""
        return self.success[:, : frames.shape[1]]

    def close(self):
        self.venv.close()


def task_name(task: str) -> str:
    """'wmpo/PushCube-v0' -> 'pushcube-v0', the stem of its data files."""
    return task.split("/")[1].lower()


def block_motion(ep: dict) -> np.ndarray:
    """Frame indices t where some block moves between frames t and t+1 by > 1 mm (contact happens there)."""
    names = object_layout(ep["task"])[0]
    rows = [i for i, n in enumerate(names) if n.startswith("block_")]
    if not rows:
        return np.zeros(0, np.int64)
    step = np.linalg.norm(np.diff(ep["object_pos"][:, rows], axis=0), axis=-1).max(-1)
    return np.flatnonzero(step > 1e-3)


# ----------------------------------------------------------------------------------------------------------
# `python envs.py`: expert success per task and env steps/s (a benchmark, not a test)

if __name__ == "__main__":
    import time

    import tyro
    from dataclasses import dataclass

    @dataclass
    class Args:
        episodes: int = 100
        """expert episodes per task"""
        tasks: tuple[str, ...] = tuple(REGISTERED)
        """tasks to measure"""
        bench_steps: int = 2000
        """env steps for the speed measurement"""
        num_envs: int = 4
        """envs in the vectorised speed measurement"""

    args = tyro.cli(Args)
    print(f"{'task':20s} {'expert success':>15s} {'mean len':>9s} {'steps/s (1 env)':>16s} "
          f"{'steps/s sync x' + str(args.num_envs):>18s} {'steps/s async x' + str(args.num_envs):>19s}")
    for task in args.tasks:
        eps = collect(task, expert_policy(), list(range(10_000, 10_000 + args.episodes)))
        succ = np.array([ep["success"][-1] for ep in eps])
        lens = np.array([len(ep["actions"]) - 1 for ep in eps])
        env = make(task)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(args.bench_steps):
            _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 2))
            if term or trunc:
                env.reset()
        single = args.bench_steps / (time.perf_counter() - t0)
        env.close()
        rates = []
        for asyn in [False, True]:
            venv = make_vec(task, args.num_envs, asyn)
            venv.reset(seed=0)
            n = args.bench_steps // args.num_envs
            t0 = time.perf_counter()
            for _ in range(n):
                venv.step(rng.uniform(-1, 1, (args.num_envs, 2)))
            rates.append(n * args.num_envs / (time.perf_counter() - t0))
            venv.close()
        print(f"{task:20s} {succ.mean():>15.1%} {lens[succ].mean():>9.1f} {single:>16.0f} "
              f"{rates[0]:>18.0f} {rates[1]:>19.0f}")
