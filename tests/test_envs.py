"""Tests of the task suite, experts and episode storage (envs.py), checked against the simulator itself."""

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("task", envs.REGISTERED)
def test_check_env(task):
    env = gym.make(task)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert isinstance(info["success"], bool)
    assert info["object_pos"].shape == (len(env.unwrapped.object_names), 2)
    assert env.action_space.shape == (2,)
    env.close()


def test_unknown_task_id_is_named():
    with pytest.raises(ValueError, match="wmpo/Nope-v0"):
        envs.make("wmpo/Nope-v0")


# Issue 15: every expert succeeds on >= 97% of 200 seeds from the "expert" range, which nothing else uses (measured
# on 1,000 other seeds: Reach 100%, PushCube 98.9%, PushTwo 99.2%).
@pytest.mark.parametrize("task", envs.REGISTERED)
def test_expert_success(task):
    eps = envs.collect(task, envs.expert_policy(), envs.seeds("expert", task, 200), num_envs=8)
    rate = np.mean([ep["success"][-1] for ep in eps])
    assert rate >= 0.97, f"{task} expert success {rate:.3f} on 200 fresh seeds"
    # an episode ends at its first success (termination) or at the horizon (truncation)
    horizon = gym.make(task).unwrapped.horizon
    for ep in eps:
        assert not ep["success"][:-1].any()
        assert ep["success"][-1] or len(ep["actions"]) - 1 == horizon


def test_random_policy_rarely_succeeds():
    rng = np.random.default_rng(0)
    eps = envs.collect("wmpo/PushCube-v0", lambda o, i, v: rng.uniform(-1, 1, (len(o), 1, 2)), list(range(30)))
    assert np.mean([ep["success"][-1] for ep in eps]) < 0.2


@pytest.mark.parametrize("task", envs.REGISTERED)
def test_determinism(task):
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 2))
    runs = []
    for _ in range(2):
        env = gym.make(task)
        frames = [env.reset(seed=7)[0]]
        frames += [env.step(a)[0] for a in actions]
        runs.append(np.stack(frames))
        env.close()
    assert np.array_equal(runs[0], runs[1])
    env = gym.make(task)
    other = env.reset(seed=8)[0]
    assert not np.array_equal(runs[0][0], other), "different seeds must give different initial states"


def test_instruction_names_the_target_and_varies():
    env = gym.make("wmpo/PushCube-v0")
    texts = set()
    for seed in range(60):
        env.reset(seed=seed)
        u = env.unwrapped
        texts.add(u.instruction)
        assert f"{u.target} " in u.instruction  # the named block is the one success is measured on
    assert len(texts) >= 6
    # both blocks get to be the target: the image alone cannot say which one to push
    targets = set()
    for seed in range(20):
        env.reset(seed=seed)
        targets.add(env.unwrapped.target)
    assert targets == {"red", "blue"}


def test_success_matches_simulator_geometry():
    env = gym.make("wmpo/Reach-v0")
    env.reset(seed=3)
    u = env.unwrapped
    done = False
    while not done:
        _, _, term, trunc, info = env.step(u.expert_action())
        d = np.linalg.norm(info["object_pos"][0] - u.pad(u.target))
        assert info["success"] == (d < envs.SUCCESS_R)
        done = term or trunc
    assert term


def test_pixels_show_objects_where_the_simulator_puts_them():
    env = gym.make("wmpo/PushCube-v0")
    obs, info = env.reset(seed=5)
    red = (obs[..., 0] > 180) & (obs[..., 1] < 80) & (obs[..., 2] < 80)
    rc = np.argwhere(red).mean(0)
    expect = envs.world_to_px(info["object_pos"][env.unwrapped.object_names.index("block_red")])
    assert np.abs(rc - expect).max() < 1.0


@pytest.mark.parametrize("asynchronous", [False, True])
def test_vector_envs(asynchronous):
    venv = envs.make_vec("wmpo/PushTwo-v0", 2, asynchronous)
    obs, info = venv.reset(seed=[0, 1])
    assert obs.shape == (2, 64, 64, 3)
    obs, r, term, trunc, info = venv.step(np.zeros((2, 2), np.float32))
    assert obs.shape == (2, 64, 64, 3) and info["object_pos"].shape == (2, 5, 2)
    assert len(venv.call("expert_action")) == 2
    venv.close()


def test_storage_round_trip(tmp_path):
    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(noise=0.3), [1, 2, 3], num_envs=2)
    path = str(tmp_path / "demos-reach-0.safetensors")
    envs.save_episodes(path, eps, policy="noisy expert")
    back = envs.load_episodes(path)
    assert len(back) == 3
    for a, b in zip(eps, back):
        for k in ["frames", "actions", "success", "object_pos"]:
            assert np.array_equal(a[k], b[k]) and a[k].shape == b[k].shape
        assert (a["instruction"], a["seed"], a["task"]) == (b["instruction"], b["seed"], b["task"])
        assert len(b["frames"]) == len(b["actions"]) and not b["actions"][-1].any()
    assert len(envs.load_dir(str(tmp_path), "demos")) == 3


def test_cached_episodes_of_the_other_horizon_kind_are_refused_not_reused(tmp_path):
    path = str(tmp_path / "explore-reach-v0.safetensors")
    eps = envs.collect_cached(path, "wmpo/Reach-v0", envs.expert_policy(0.0), [1, 2])
    assert len(eps[0]["frames"]) < envs.horizon("wmpo/Reach-v0") + 1  # the expert reaches early: the episode stops
    before = open(path, "rb").read()
    with pytest.raises(ValueError, match="stop at success"):
        envs.collect_cached(path, "wmpo/Reach-v0", envs.expert_policy(0.0), [1, 2], full_horizon=True)
    assert open(path, "rb").read() == before
    full = envs.collect_cached(str(tmp_path / "full.safetensors"), "wmpo/Reach-v0", envs.expert_policy(0.0), [1, 2],
                               full_horizon=True)
    again = envs.collect_cached(str(tmp_path / "full.safetensors"), "wmpo/Reach-v0", None, [1, 2], full_horizon=True)
    H = envs.horizon("wmpo/Reach-v0")
    assert [len(e["frames"]) for e in full] == [len(e["frames"]) for e in again] == [H + 1, H + 1]
    assert again[0]["full_horizon"] and again[0]["success"].any()


def test_corrupt_shard_gives_clear_error_and_touches_nothing(tmp_path):
    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(), [1, 2], num_envs=2)
    good, bad = str(tmp_path / "demos-a-0.safetensors"), str(tmp_path / "demos-b-0.safetensors")
    envs.save_episodes(good, eps)
    envs.save_episodes(bad, eps)
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated, as a killed copy would leave it
    before = {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match="demos-b-0.safetensors"):
        envs.load_dir(str(tmp_path), "demos")
    assert {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)} == before
    # a file that is valid safetensors but not an episode shard is named too
    from safetensors.numpy import save_file

    save_file({"frames": np.zeros((2, 32, 32, 3), np.uint8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="x.safetensors"):
        envs.load_episodes(str(tmp_path / "x.safetensors"))


SEGV_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
order = {order!r}
import envs, gymnasium as gym, torch
if order == "render-first":
    env = gym.make("wmpo/Reach-v0"); env.reset(seed=0); env.step([0, 0])
opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
opt.zero_grad(); opt.step()
if order == "optim-first":
    env = gym.make("wmpo/Reach-v0"); env.reset(seed=0); env.step([0, 0])
print("ok")
"""


@pytest.mark.parametrize("order", ["render-first", "optim-first"])
def test_no_segfault_renderer_then_optimizer(order):
    # prototype.md #9: the first optimizer after the first EGL renderer segfaulted; envs.py imports torch._dynamo first
    out = subprocess.run([sys.executable, "-c", SEGV_SCRIPT.format(root=ROOT, order=order)], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# -- perturbed variants (evaluation only) -------------------------------------------------------------------------


@pytest.mark.parametrize("task", envs.REGISTERED)
def test_variants_register_and_pass_check_env(task):
    version = task.split("-")[-1]
    for shift in envs.SHIFTS:
        env = gym.make(task.replace(f"-{version}", f"-{shift}-{version}"))
        check_env(env.unwrapped, skip_render_check=True)
        env.close()
    assert not set(envs.VARIANTS) & set(envs.TASKS)  # variants are never part of the training task list


def test_variants_really_differ_from_their_task():
    task = "wmpo/PushCube-v0"
    seed = envs.seeds("eval", task, 1)[0]
    env = envs.make(task)
    obs, info = env.reset(seed=seed)
    instr = env.unwrapped.instruction
    env.close()
    table = obs[0, 0].astype(int)  # a corner pixel: bare table in every layout
    for shift in envs.SHIFTS:
        var = envs.make(task.replace("-v0", f"-{shift}-v0"))
        o, i = var.reset(seed=seed)
        assert var.unwrapped.instruction == instr  # same layout and words, one shift
        assert (o != obs).any(), shift
        if shift == "Position":  # the pusher starts outside the range every training layout uses (|x|,|y| <= 0.19)
            assert (np.abs(i["object_pos"][0]) >= envs.SHIFT_CORNER[0]).all()
            np.testing.assert_array_equal(i["object_pos"][1:], info["object_pos"][1:])
        if shift == "Background":  # the table changed colour, the objects did not move
            assert np.abs(o[0, 0].astype(int) - table).sum() > 60
            np.testing.assert_array_equal(i["object_pos"], info["object_pos"])
        if shift == "Texture":  # objects are checkered: the red block now shows two shades of red
            row, col = np.round(envs.world_to_px(i["object_pos"][1])).astype(int)
            patch = o[row - 2 : row + 3, col - 2 : col + 3].reshape(-1, 3).astype(int)
            assert (patch[:, 0] - patch[:, 0].min() > 60).any() and (patch[:, 1:] < 100).all()
            np.testing.assert_array_equal(i["object_pos"], info["object_pos"])
        var.close()


def test_goal_distance_follows_the_instruction():
    env = envs.make("wmpo/PushTwo-v0")
    _, info = env.reset(seed=3)
    u = env.unwrapped
    (b1, p1), (b2, p2) = u.order
    want = np.linalg.norm(u.block(b1) - u.pad(p1)) + np.linalg.norm(u.block(b2) - u.pad(p2))
    got = envs.goal_distance("wmpo/PushTwo-v0", u.instruction, info["object_pos"][None])
    env.close()
    np.testing.assert_allclose(got, [want], rtol=1e-5)


# -- v1 tasks (issue 33): the same scenes, failures made of decisions ------------------------------------------------


def test_v1_success_is_the_block_centre_over_its_pad():
    # a block 4 cm from its pad's centre is over the pad (radius 4.5 cm): success on v1, not under v0's 3 cm rule
    for task, ok in [("wmpo/PushCube-v0", False), ("wmpo/PushCube-v1", True)]:
        env = envs.make(task)
        env.reset(seed=5)
        u = env.unwrapped
        pad = u.pad(getattr(u, "target_pad", "green"))
        u.data.qpos[u.block_qpos[u.target]] = pad + np.array([0.04, 0.0])
        assert bool(u.success()) == ok, task
        u.data.qpos[u.block_qpos[u.target]] = pad + np.array([0.05, 0.0])  # off the pad: never
        assert not u.success()
        env.close()
    assert envs.success_radius("wmpo/PushTwo-v1") == envs.PAD_R
    assert envs.success_radius("wmpo/Reach-v1") == envs.SUCCESS_R


def test_v1_instruction_chooses_among_more_objects():
    env = envs.make("wmpo/PushCube-v1")
    pairs = set()
    for seed in range(60):
        _, info = env.reset(seed=seed)
        u = env.unwrapped
        assert f"{u.target} " in u.instruction and f"{u.target_pad} " in u.instruction
        assert envs.goal_pairs("wmpo/PushCube-v1", u.instruction) == [(f"block_{u.target}", f"pad_{u.target_pad}")]
        pairs.add((u.target, u.target_pad))
        p = info["object_pos"]
        assert np.linalg.norm(p[1] - p[2]) >= 0.09 and np.linalg.norm(p[3] - p[4]) >= 0.12  # blocks, pads apart
    assert len(pairs) == 4  # both blocks onto both pads
    env.close()
    env = envs.make("wmpo/Reach-v1")
    targets = {env.reset(seed=s)[0] is not None and env.unwrapped.target for s in range(40)}
    assert targets == {"red", "green", "blue", "yellow"}
    env.close()


def test_v0_seeds_and_layouts_unchanged_by_v1():
    # v1 registers after v0: v0's seed ranges stay where they were (the experiment record's runs used them)
    assert envs.seeds("val", "wmpo/PushTwo-v0", 2) == [620_000, 620_001]
    assert envs.seeds("val", "wmpo/Reach-v1", 1) == [630_000]
    assert envs.base_task("wmpo/PushCube-Texture-v1") == "wmpo/PushCube-v1"
    # Reach-v0's layout as the three-pad sampler drew it before Reach took any number of pads
    rng = np.random.default_rng(11)
    pts = envs.sample_points(rng, 4, 0.19, [[0], [0.12, 0], [0.12, 0.12, 0], [0.12, 0.12, 0.12, 0]])
    target = ["red", "green", "blue"][rng.integers(3)]
    env = envs.make("wmpo/Reach-v0")
    _, info = env.reset(seed=11)
    np.testing.assert_allclose(info["object_pos"], pts, atol=1e-6)
    assert env.unwrapped.target == target
    env.close()


def test_takeovers_start_where_the_base_got_lost():
    # a base that drifts right then up fails every episode; the expert takes over at step k of its replay, and each
    # recovery demo's first frame is the simulator's frame after those k base actions
    drift = lambda o, i, v: np.tile([[[0.6, 0.3]]], (len(o), 1, 1)).astype(np.float32)  # noqa: E731
    task, seeds = "wmpo/PushCube-v1", envs.seeds("demos", "wmpo/PushCube-v1", 4, start=5000)
    eps = envs.collect_takeovers(task, drift, seeds, noise=0.3, seed=0)
    assert sorted(ep["seed"] for ep in eps) == seeds
    for ep in eps:
        env = envs.make(task)
        env.reset(seed=ep["seed"])
        k = envs.horizon(task) + 1 - len(ep["frames"]) if not ep["success"][-1] else None
        frame = env.render()
        for t in range(60):  # find k: the replayed frame that matches the demo's first frame
            if np.array_equal(frame, ep["frames"][0]):
                break
            frame = env.step([0.6, 0.3])[0]
        assert np.array_equal(frame, ep["frames"][0]) and t >= 1 and (k is None or k == t)
        assert np.isfinite(ep["labels"]).all() and len(ep["labels"]) == len(ep["frames"])
        env.close()
    assert np.mean([ep["success"][-1] for ep in eps]) >= 0.75  # the expert recovers from where the base went
