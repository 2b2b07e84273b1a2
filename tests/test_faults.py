"""Multi-process training and fault tolerance (issue 9): DDP equals one process, kill -9 + resume, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import SCRIPT_ENV  # the scripts' environment: no Triton interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--demos", "3", "3", "3", "--policy.width", "8", "--policy.hidden", "32", "--batch-size", "8"]


def run(args, ok=True, prefix=(sys.executable,)):
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*prefix, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(d):
    return [json.loads(l)["sft/loss"] for l in open(os.path.join(d, "sft.metrics.jsonl"))]


def weights(path):
    from safetensors.numpy import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A run folder with demos collected once (the other tests copy its data/ and skip collection)."""
    d = str(tmp_path_factory.mktemp("demos"))
    run(["train_policy.py", "sft", "--run-dir", d, *TINY, "--num-steps", "1"])
    return d


def fresh(demo_dir, tmp_path, name):
    d = str(tmp_path / name)
    shutil.copytree(os.path.join(demo_dir, "data"), os.path.join(d, "data"))
    return d


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(demo_dir, tmp_path):
    one, two = fresh(demo_dir, tmp_path, "one"), fresh(demo_dir, tmp_path, "two")
    run(["train_policy.py", "sft", "--run-dir", one, *TINY, "--num-steps", "4"])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533")
    run(["train_policy.py", "sft", "--run-dir", two, *TINY, "--num-steps", "4"], prefix=torchrun)
    # same global batch of 8 (4 per rank): same loss curve and same final weights, within fp32 tolerance
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    w1, w2 = weights(os.path.join(one, "policy_sft.safetensors")), weights(os.path.join(two, "policy_sft.safetensors"))
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert len(losses(two)) == 4  # only rank 0 writes metrics


# Each rank of a torchrun GRPO update keeps its own groups, so ranks hold different numbers of trajectories. Every
# rank must still take the same optimizer steps (each one all-reduces every gradient): when one rank took fewer, the
# gloo collectives of the two ranks went out of step and a child aborted (SIGABRT) in about one test run in four.
RANK_UPDATE = """
import os, sys, torch, ddp, wmpo
rank, world = ddp.dist_init()
torch.manual_seed(0)
pol = wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64))
n = 2 if rank == 0 else 6  # trajectories this rank kept: 2 and 6 split into 2 and 3 mini-batches of torch.chunk
g = torch.Generator().manual_seed(rank)
f = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g)
w = wmpo.tokenize(["go to the red pad"] * n, wmpo.VOCAB)
_, tokens, _ = pol.act(f, w, 1.0)
batch = {"obs": f, "words": w, "tokens": tokens, "adv": torch.randn(n, generator=g), "mask": torch.ones(n, dtype=bool),
         "token_mask": torch.ones(n, 16, dtype=torch.bool)}
opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
wmpo.grpo_update(pol, opt, batch, wmpo.GRPOConfig(minibatches=4, epochs=2))
torch.save(torch.cat([p.detach().flatten() for p in pol.parameters()]), os.path.join(sys.argv[1], f"rank{rank}.pt"))
ddp.barrier()
"""


def test_ranks_with_different_trajectory_counts_update_in_step(tmp_path):
    script = tmp_path / "rank_update.py"
    script.write_text(RANK_UPDATE)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29555")
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([*torchrun, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import torch

    # one model on both ranks: the same averaged gradient at every step
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_end(demo_dir, tmp_path):
    ref, killed = fresh(demo_dir, tmp_path, "ref"), fresh(demo_dir, tmp_path, "killed")
    args = [*TINY, "--num-steps", "40", "--eval-every", "5"]
    run(["train_policy.py", "sft", "--run-dir", ref, *args])
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "train_policy.py", "sft", "--run-dir", killed, *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(killed, "policy_sft.train.pt")
    deadline = time.time() + 600
    while not os.path.exists(state) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    out = run(["train_policy.py", "sft", "--run-dir", killed, *args])
    assert "resuming SFT from step" in out.stdout
    from safetensors import safe_open

    with safe_open(os.path.join(killed, "policy_sft.safetensors"), "np") as f:
        assert f.metadata()["step"] == "40"
    # the batches are a function of (seed, step): the resumed run ends where the uninterrupted one did
    l_ref, l_kill = losses(ref), losses(killed)
    assert abs(l_kill[-1] - l_ref[-1]) < 1e-3 * max(1.0, abs(l_ref[-1]))
    w1, w2 = weights(os.path.join(ref, "policy_sft.safetensors")), weights(os.path.join(killed, "policy_sft.safetensors"))
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_same_seed_same_metrics(demo_dir, tmp_path):
    a, b = fresh(demo_dir, tmp_path, "a"), fresh(demo_dir, tmp_path, "b")
    for d in (a, b):
        run(["train_policy.py", "sft", "--run-dir", d, *TINY, "--num-steps", "3"])
    assert losses(a) == losses(b)


def snapshot(d):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(d) for f in fs}


@pytest.mark.slow
def test_diverging_loss_stops_and_keeps_the_last_checkpoint(demo_dir, tmp_path):
    d = fresh(demo_dir, tmp_path, "nan")
    run(["train_policy.py", "sft", "--run-dir", d, *TINY, "--num-steps", "2"])
    before = snapshot(d)
    # lr 1e30 blows the weights up after one update: the next loss is not finite
    out = run(["train_policy.py", "sft", "--run-dir", d, *TINY, "--num-steps", "10", "--lr", "1e30",
               "--eval-every", "100"], ok=False)
    assert out.returncode != 0 and "at step" in out.stderr and "kept the last checkpoint" in out.stderr
    after = snapshot(d)
    for f in before:
        if not f.endswith(".jsonl") and not f.endswith(".args.json"):  # the log and the config record the attempt
            assert after[f] == before[f], f


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--lr", "-1"), ("--dart-noise", "-0.5"), ("--preset", "huge")])
def test_out_of_range_flags(demo_dir, tmp_path, flag, value):
    d = fresh(demo_dir, tmp_path, "flags")
    before = snapshot(d)
    out = run(["train_policy.py", "sft", "--run-dir", d, *TINY, flag, value], ok=False)
    assert out.returncode != 0 and flag in out.stderr
    assert snapshot(d) == before


@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused(demo_dir, tmp_path):
    d = fresh(demo_dir, tmp_path, "cfg")
    run(["train_policy.py", "sft", "--run-dir", d, *TINY, "--num-steps", "2"])
    before = snapshot(d)
    out = run(["train_policy.py", "sft", "--run-dir", d, *TINY[:-4], "--policy.width", "16", "--policy.hidden", "32",
               "--batch-size", "8", "--num-steps", "4"], ok=False)
    assert out.returncode != 0 and "policy_sft.safetensors" in out.stderr and "width" in out.stderr
    assert {f: v for f, v in snapshot(d).items() if not f.endswith(("jsonl", "args.json"))} == \
           {f: v for f, v in before.items() if not f.endswith(("jsonl", "args.json"))}


def test_data_shard_of_the_wrong_shape_is_named(tmp_path):
    import envs

    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(), [0, 1], num_envs=2)
    path = str(tmp_path / "shard.safetensors")
    envs.save_episodes(path, eps)
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata()
    t = load_file(path)
    t["frames"] = t["frames"][:, :32]  # 32x64 frames
    save_file(t, path, metadata=meta)
    with pytest.raises(ValueError, match="shard.safetensors: frames have shape"):
        envs.load_episodes(path)


WM_TINY = ["--budget", "6", "--explore-per-level", "1", "--explore-noise", "0.5", "--heldout-groups", "1",
           "--group-size", "2", "--codec-steps", "8", "--wm-steps", "24", "--wm-finetune-steps", "8",
           "--reward-steps", "8", "--batch-size", "4", "--eval-every", "2", "--wm.width", "16", "--wm.d", "32",
           "--wm.n-head", "1", "--codec.width", "8", "--reward.width", "8", "--reward-replays", "2",
           "--grpo-path-states", "1"]


def kill_when(args, path, cwd_dir):
    """Start a run, SIGKILL it as soon as `path` exists (a checkpoint was written mid-run), then run it again."""
    env = {**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(cwd_dir, path)) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    return run(args)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=f"{b}: {k}")


@pytest.fixture(scope="module")
def wm_ref(demo_dir, tmp_path_factory):
    """A run folder with SFT (1 step) and an uninterrupted tiny train_wm.py."""
    d = str(tmp_path_factory.mktemp("wm_ref"))
    shutil.copytree(demo_dir, d, dirs_exist_ok=True)
    run(["train_wm.py", "--run-dir", d, *WM_TINY])
    return d


@pytest.mark.slow
def test_train_wm_kill_9_then_resume_reaches_the_same_end(demo_dir, wm_ref, tmp_path):
    # killed inside the world-model stage (after its first checkpoint): the resumed run restores weights, optimizer,
    # torch and numpy RNG (the windows are drawn with numpy), and skips finished stages with their RNG state
    d = str(tmp_path / "killed")
    shutil.copytree(demo_dir, d)
    out = kill_when(["train_wm.py", "--run-dir", d, *WM_TINY], "wm_pretrain.train.pt", d)
    assert "resuming wm from step" in out.stdout or "wm: already trained" in out.stdout
    for f in ["codec", "wm_pretrain", "wm", "reward", "reward_real"]:
        assert_same_weights(os.path.join(wm_ref, f"{f}.safetensors"), os.path.join(d, f"{f}.safetensors"))
    thresholds = [json.load(open(os.path.join(x, "wm_report.json")))["reward_threshold"] for x in (wm_ref, d)]
    assert thresholds[0] == thresholds[1]


@pytest.mark.slow
def test_wmpo_kill_9_then_resume_reaches_the_same_end(wm_ref, tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    shutil.copytree(wm_ref, ref)
    shutil.copytree(ref, killed)
    args = ["--iterations", "4", "--grpo.states-per-task", "1", "--grpo.group-size", "4", "--val-every", "0",
            "--tasks", "wmpo/PushCube-v0"]
    run(["train_policy.py", "wmpo", "--run-dir", ref, *args])
    out = kill_when(["train_policy.py", "wmpo", "--run-dir", killed, *args], "policy_wmpo.train.pt", killed)
    assert "resuming wmpo from iteration" in out.stdout
    assert_same_weights(os.path.join(ref, "policy_wmpo.safetensors"), os.path.join(killed, "policy_wmpo.safetensors"))
    # the iterations after the kill sample exactly what the uninterrupted run sampled (RNG restored): initial
    # states and action tokens, seen through the sampled actions' mean magnitude
    key = "wmpo/mean_abs_action/wmpo/PushCube-v0"
    ref_rows = {r["step"]: r[key] for r in map(json.loads, open(os.path.join(ref, "wmpo.metrics.jsonl")))}
    kill_rows = [json.loads(l) for l in open(os.path.join(killed, "wmpo.metrics.jsonl"))]
    assert len({r[key] for r in kill_rows}) > 1  # the samples differ from iteration to iteration
    assert all(r[key] == ref_rows[r["step"]] for r in kill_rows), (kill_rows, ref_rows)
