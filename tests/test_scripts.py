"""Subprocess smoke tests of the three entry scripts on a tiny budget, in one run folder, plus their bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import envs
from conftest import SCRIPT_ENV  # the scripts' environment: no Triton interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, ok=True):
    env = {"OMP_NUM_THREADS": "2", **SCRIPT_ENV}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    run("train_policy.py", "sft", "--run-dir", d, "--demos", "3", "3", "3", "--num-steps", "2",
        "--policy.width", "8", "--policy.hidden", "32")
    return d


@pytest.mark.slow
def test_sft_resumes_from_its_checkpoint(run_dir):
    out = run("train_policy.py", "sft", "--run-dir", run_dir, "--demos", "3", "3", "3", "--num-steps", "3",
              "--policy.width", "8", "--policy.hidden", "32")
    assert "resuming SFT from step 2" in out.stdout
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "sft.metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_sft_never_retrains_over_weights_without_their_training_state(run_dir, tmp_path):
    # a checkpoint copied without its .train.pt (or left by an older version) used to be overwritten by a run
    # from scratch; now the run goes on from the checkpoint's own step and a finished one is left as it was
    import shutil

    import wmpo

    d = str(tmp_path / "copy")
    shutil.copytree(run_dir, d)
    os.remove(os.path.join(d, "policy_sft.train.pt"))
    ckpt = os.path.join(d, "policy_sft.safetensors")
    step = int(wmpo.read_meta(ckpt)["step"])
    before = open(ckpt, "rb").read()
    out = run("train_policy.py", "sft", "--run-dir", d, "--demos", "3", "3", "3", "--num-steps", str(step),
              "--policy.width", "8", "--policy.hidden", "32")
    assert f"going on from its step {step}" in out.stdout
    assert open(ckpt, "rb").read() == before


@pytest.mark.slow
def test_sft_writes_its_files(run_dir):
    for f in ["policy_sft.safetensors", "sft.args.json", "sft.metrics.jsonl"]:
        assert os.path.exists(os.path.join(run_dir, f)), f
    assert any(f.startswith("demos-") for f in os.listdir(os.path.join(run_dir, "data")))
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "sft.metrics.jsonl"))]
    assert len(rows) >= 2 and "sft/loss" in rows[0]


@pytest.mark.slow
def test_sft_recovery_demos_are_collected_once_and_reused(run_dir, tmp_path):
    # a 2-step policy fails every rollout: the expert takes each one over; the shard is saved and a second run reads it
    import shutil

    d = str(tmp_path / "rec")
    shutil.copytree(os.path.join(run_dir, "data"), os.path.join(d, "data"))
    args = ["train_policy.py", "sft", "--run-dir", d, "--demos", "3", "3", "3", "--num-steps", "1", "--policy.width",
            "8", "--policy.hidden", "32", "--recovery-from", os.path.join(run_dir, "policy_sft.safetensors"),
            "--recovery", "2", "2", "2"]
    import re

    out = run(*args)
    counts = {t: int(n) for t, n in re.findall(r"(\S+): (\d) recovery demos", out.stdout)}
    assert counts.get("wmpo/PushTwo-v0", 0) >= 1  # an untrained policy never pushes two blocks onto their pads
    shards = sorted(f for f in os.listdir(os.path.join(d, "data")) if f.startswith("recovery-"))
    assert len(shards) == len(counts) and all("-2-" in f for f in shards), (shards, counts)
    stamps = [os.path.getmtime(os.path.join(d, "data", f)) for f in shards]
    out = run(*args)
    assert "takeovers" not in out.stderr and "wmpo/PushTwo-v0: " in out.stdout
    assert stamps == [os.path.getmtime(os.path.join(d, "data", f)) for f in shards]  # read, not collected again
    bad = run(*args[:-3], "--recovery", "2", ok=False)
    assert bad.returncode != 0 and "--recovery needs one number per task (3), got 1" in bad.stderr


@pytest.mark.slow
def test_eval_writes_valid_json(run_dir):
    run("eval.py", "--run-dir", run_dir, "--episodes", "2", "--temperatures", "0", "1.6", "--videos", "1")
    res = json.load(open(os.path.join(run_dir, "eval.json")))
    for key in ["policy_sft", "policy_sft@T1.6"]:
        for task in ["wmpo/Reach-v0", "wmpo/PushCube-v0", "wmpo/PushTwo-v0"]:
            r = res[key][task]
            assert r["episodes"] == 2 and 0 <= r["success_rate"] <= 1 and r["ci95"][0] <= r["success_rate"] <= r["ci95"][1]
        assert "mean" in res[key]
    assert os.path.exists(os.path.join(run_dir, "eval.md"))
    assert os.path.exists(os.path.join(run_dir, "videos", "policy_sft-PushCube-v0.gif"))


@pytest.mark.slow
def test_train_wm_then_wmpo_then_grpo_real(run_dir):
    run("train_wm.py", "--run-dir", run_dir, "--budget", "6", "--explore-per-level", "1", "--explore-noise", "0.5",
        "--heldout-groups", "1", "--group-size", "2", "--codec-steps", "2", "--wm-steps", "2",
        "--wm-finetune-steps", "1", "--reward-steps", "2", "--batch-size", "4",
        "--wm.width", "16", "--wm.d", "32", "--wm.n-head", "1", "--codec.width", "8", "--reward.width", "8",
        "--reward-replays", "2", "--grpo-path-states", "1",
        "--window-chunks", "2")  # unrolled windows cross a chunk boundary (re-encoded)
    rep = json.load(open(os.path.join(run_dir, "wm_report.json")))
    for k in ["psnr_by_horizon", "psnr_copy_baseline_by_horizon", "object_err_px_by_horizon",
              "object_err_px_copy_baseline_by_horizon", "success_radius_px", "median_success_len", "reward_f1",
              "reward_precision", "reward_recall", "reward_threshold", "outcome_agreement", "advantage_correlation",
              "trajectories", "imagined_frames_per_s", "real_env_steps_per_s", "per_task"]:
        assert k in rep, k
    for t in ["wmpo/Reach-v0", "wmpo/PushCube-v0", "wmpo/PushTwo-v0"]:
        for k in ["outcome_agreement", "advantage_correlation", "trajectories", "imagined_recall", "imagined_precision",
                  "judge_agreement", "pusher_err_px_by_horizon", "pusher_err_px_shuffled_by_horizon",
                  "grpo_path_imagined_success", "grpo_path_real_mixed", "zero_action_psnr_by_horizon",
                  "zero_action_pusher_drift_px_by_horizon"]:
            assert k in rep["per_task"][t], (t, k)
    assert "block_red_err_px_by_horizon" in rep["per_task"]["wmpo/PushCube-v0"]
    for t, r in rep["per_task"].items():  # zero actions over the full horizon: drift in px, PSNR in dB
        assert len(r["zero_action_psnr_by_horizon"]) == len(r["zero_action_pusher_drift_px_by_horizon"]) == envs.horizon(t)
        assert min(r["zero_action_pusher_drift_px_by_horizon"]) >= 0 and min(r["zero_action_psnr_by_horizon"]) > 0
    assert rep["trajectories"] == 6 and rep["per_task"]["wmpo/Reach-v0"]["trajectories"] == 2
    assert rep["data"]["explore"]["wmpo/PushTwo-v0"]["episodes"] == 1  # --explore-per-level 1, one noise level
    assert set(rep["data"]["rollouts"]) == set(envs.TASKS)
    assert os.path.exists(os.path.join(run_dir, "videos", "wm_pushcube-v0.gif"))
    for f in ["wm.safetensors", "reward.safetensors", "codec.safetensors"]:
        assert os.path.exists(os.path.join(run_dir, f))
    # the real budget P = 6 (2 per task) pays for every policy trajectory that trains or chooses: 1 alignment + 1
    # validation rollout per task, counted in the files the real env wrote, not only in budget.json
    budget = json.load(open(os.path.join(run_dir, "budget.json")))
    paid = [e for p in ("rollouts", "val") for t in ("reach", "pushcube", "pushtwo")
            for e in envs.load_dir(os.path.join(run_dir, "data"), f"{p}-{t}-v0")]
    assert budget["real_trajectories"] == len(paid) == 6 and budget["rollouts"] == budget["val"] == 3
    assert {e["seed"] for e in paid} <= {s for t in envs.TASKS for p in ("rollouts", "val") for s in envs.seeds(p, t, 10)}
    for t in envs.TASKS:  # the world model's data runs as imagination does: to the task's horizon, past success
        n = envs.task_name(t)
        for e in envs.load_dir(os.path.join(run_dir, "data"), f"rollouts-{n}") + envs.load_dir(
                os.path.join(run_dir, "data"), f"explore-{n}"):
            assert len(e["frames"]) == envs.horizon(t) + 1 and e["full_horizon"], (t, len(e["frames"]))
    run("train_policy.py", "wmpo", "--run-dir", run_dir, "--iterations", "1",
        "--grpo.states-per-task", "1", "--grpo.group-size", "2", "--val-episodes", "1")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "wmpo.metrics.jsonl"))]
    assert "wmpo/imagined_success" in rows[-1] and "wmpo/kept_group_frac" in rows[-1]
    assert [r["step"] for r in rows if "val/real_success" in r] == [-1, 0]  # real check before and after
    # WMPO drew no new real trajectory: its initial states are the alignment rollouts' first frames
    assert len([e for p in ("rollouts", "val") for t in ("reach", "pushcube", "pushtwo")
                for e in envs.load_dir(os.path.join(run_dir, "data"), f"{p}-{t}-v0")]) == 6
    assert os.path.exists(os.path.join(run_dir, "policy_wmpo.safetensors"))
    run("train_policy.py", "grpo-real", "--run-dir", run_dir, "--budget", "12", "--states-per-task-real", "1",
        "--grpo.group-size", "2", "--iterations", "5", "--val-every", "0")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "grpo_real.metrics.jsonl"))]
    assert rows[-1]["real_trajectories"] <= 12 and len(rows) == 2  # 2 iterations x 3 tasks x 1 state x 2 samples


@pytest.mark.parametrize("context_from", ["frames", "latents"])
def test_imagination_benchmark_times_both_worlds_on_one_batch(context_from):
    out = run("scripts/bench_imagine.py", "--task", "wmpo/Reach-v0", "--states", "1", "--group", "2", "--threads", "1",
              "--context-from", context_from)
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| real env", "| world model"))]
    assert len(rows) == 2 and "dynamics" in rows[1] and "codec encode" in rows[1], out.stdout
    assert "imagined / real trajectories per second" in out.stdout


@pytest.mark.slow
def test_lifelong_rounds_refresh_with_train_wm_and_keep_round_0(run_dir, tmp_path):
    import shutil

    d = str(tmp_path / "life")
    shutil.copytree(run_dir, d)
    wm0 = open(os.path.join(d, "wm.safetensors"), "rb").read()
    report0 = open(os.path.join(d, "wm_report.json")).read()
    run("train_policy.py", "wmpo", "--run-dir", d, "--rounds", "2", "--iterations", "1", "--budget", "6",
        "--grpo.states-per-task", "1", "--grpo.group-size", "2", "--val-episodes", "1", "--val-every", "0")
    # round 1 ran train_wm.py --round 1: its own models and report; round 0's files untouched
    for f in ["wm.round1.safetensors", "reward.round1.safetensors", "wm_report.round1.json", "policy_wmpo_r1.safetensors"]:
        assert os.path.exists(os.path.join(d, f)), f
    assert open(os.path.join(d, "wm.safetensors"), "rb").read() == wm0
    assert open(os.path.join(d, "wm_report.json")).read() == report0
    # P = 6 new real trajectories of the round-0 WMPO policy, counted from the files the real env wrote
    new = [e for p in ("rollouts", "val") for t in ("reach", "pushcube", "pushtwo")
           for e in envs.load_episodes(os.path.join(d, "data", f"{p}-{t}-v0-1-round1.safetensors"))]
    assert len(new) == json.load(open(os.path.join(d, "budget.round1.json")))["real_trajectories"] == 6
    meta = json.load(open(os.path.join(d, "train_wm.round1.args.json")))
    assert meta["policy"] == "policy_wmpo" and meta["round"] == 1
    rows = [json.loads(l) for l in open(os.path.join(d, "lifelong.metrics.jsonl"))]
    assert [(r["round"], r["world_model"], r["real_trajectories"]) for r in rows] == [(0, "wm", 6), (1, "wm.round1", 12)]


def test_wandb_flag_without_wandb_is_one_clear_line(tmp_path):
    if _has_wandb():
        pytest.skip("wandb is installed here: the missing-package message cannot be checked")
    out = run("train_policy.py", "sft", "--run-dir", str(tmp_path), "--wandb", "--num-steps", "1", ok=False)
    assert out.returncode != 0 and "pip install wandb" in out.stderr and "Traceback" not in out.stderr


def _has_wandb():
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.mark.slow
def test_train_wm_check_can_fail(tmp_path):
    # the 5-minute diagnostic, with two training steps: an untrained world model must FAIL it (exit 1)
    d = str(tmp_path / "chk")
    out = run("train_wm.py", "--check", "--run-dir", d, "--explore-per-level", "2", "--codec-steps", "2", "--wm-steps", "2",
              "--wm.width", "16", "--wm.d", "32", "--wm.n-head", "1", "--codec.width", "8", ok=False)
    assert out.returncode == 1 and "FAIL" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.load(open(os.path.join(d, "check", "check.json")))
    assert res["pass"] is False and res["shuffled"] > 0


@pytest.mark.slow
def test_bad_inputs_fail_clearly_and_touch_nothing(run_dir, tmp_path):
    out = run("eval.py", "--run-dir", run_dir, "--tasks", "wmpo/Nope-v0", ok=False)
    assert out.returncode != 0 and "unknown task id 'wmpo/Nope-v0'" in out.stderr
    empty = str(tmp_path / "empty")
    out = run("train_policy.py", "wmpo", "--run-dir", empty, ok=False)
    assert out.returncode != 0 and "python train_policy.py sft" in out.stderr
    out = run("train_wm.py", "--run-dir", empty, ok=False)
    assert out.returncode != 0 and "python train_policy.py sft" in out.stderr
    # a truncated checkpoint: a clear error naming it, and the file is left as it was
    bad = os.path.join(run_dir, "policy_bad.safetensors")
    data = open(os.path.join(run_dir, "policy_sft.safetensors"), "rb").read()[:1000]
    open(bad, "wb").write(data)
    before = {f: open(os.path.join(run_dir, f), "rb").read() for f in os.listdir(run_dir) if f.endswith(".safetensors")}
    out = run("eval.py", "--run-dir", run_dir, "--checkpoints", "policy_bad", "--episodes", "1", ok=False)
    assert out.returncode != 0 and "policy_bad.safetensors" in out.stderr and "corrupt" in out.stderr
    after = {f: open(os.path.join(run_dir, f), "rb").read() for f in os.listdir(run_dir) if f.endswith(".safetensors")}
    assert before == after


def flags_without_help(cmd: list[str]) -> list[str]:
    """The flags whose --help entry says nothing but its default (tyro's boxed layout, one column at 100 columns)."""
    out = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "100"}).stdout
    rows = [line[2:-1] for line in out.splitlines() if line.startswith("│ ")]  # inside the boxes
    col = next(r.index("show this help") for r in rows if "show this help" in r)  # where descriptions start
    blocks = []
    for r in rows:
        if r.lstrip().startswith("-"):
            blocks.append([r.strip().split()[0], r[col:] if len(r.rstrip()) > col and r[col - 1] == " " else ""])
        elif blocks:
            blocks[-1][1] += " " + r.strip()
    group_words = {"run", "data", "optim", "algorithm"}  # a `# run` comment above a field is not its help
    return [flag for flag, text in blocks if text.split("(default:")[0].strip() in {"", *group_words}]


@pytest.mark.parametrize("cmd", [["train_policy.py", "sft"], ["train_policy.py", "wmpo"], ["train_policy.py", "grpo-real"],
                                 ["train_wm.py"], ["eval.py"], ["scripts/results.py"], ["scripts/bench_imagine.py"]],
                         ids=" ".join)
def test_every_flag_has_help(cmd):
    assert flags_without_help(cmd) == [], f"{' '.join(cmd)}: flags with no help text"


def test_recovery_detector_on_hand_made_traces():
    import eval as ev

    assert ev.setback(np.array([0.2, 0.15, 0.1, 0.05, 0.02])) == 0.0  # straight to the goal: no setback
    assert abs(ev.setback(np.array([0.2, 0.1, 0.13, 0.04, 0.02])) - 0.03) < 1e-9  # knocked 3 cm back, recovered
    # a summary over episodes: reach tasks read the pusher's distance to the named pad from object_pos
    pos = lambda xs: np.array([[[x, 0.0], [0.0, 0.0], [0.1, 0.1], [-0.1, -0.1]] for x in xs], np.float32)  # noqa: E731
    eps = [
        {"task": "wmpo/Reach-v0", "instruction": "go to the red pad", "object_pos": pos([0.2, 0.1, 0.15, 0.01]),
         "success": np.array([0, 0, 0, 1], bool), "actions": np.zeros((4, 2))},  # overshoot-like setback, success
        {"task": "wmpo/Reach-v0", "instruction": "go to the red pad", "object_pos": pos([0.2, 0.1, 0.05, 0.01]),
         "success": np.array([0, 0, 0, 1], bool), "actions": np.zeros((4, 2))},  # clean success
        {"task": "wmpo/Reach-v0", "instruction": "go to the red pad", "object_pos": pos([0.2, 0.1, 0.2, 0.2]),
         "success": np.array([0, 0, 0, 0], bool), "actions": np.zeros((4, 2))},  # setback, failure
    ]
    s = ev.summarize(eps, setback_m=0.02)
    assert s["recovery_rate"] == 0.5 and abs(s["setback_rate"] - 2 / 3) < 1e-9


def test_sampled_evaluation_does_not_depend_on_what_ran_before():
    """Issue 15: at T > 0, B's episodes are the same whether A was evaluated first or not; val and eval differ."""
    import eval as ev
    import wmpo

    torch.manual_seed(0)
    a, b = (wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64)).eval() for _ in range(2))
    run = lambda pol, name, split="eval", seed=0: ev.evaluate(pol, "wmpo/Reach-v0", 4, 1.0, 4, split=split, seed=seed,  # noqa: E731
                                                              name=name)
    alone = run(b, "B")
    run(a, "A")
    after_a = run(b, "B")
    assert all(np.array_equal(x["actions"], y["actions"]) for x, y in zip(alone, after_a))
    assert not all(np.array_equal(x["actions"], y["actions"]) for x, y in zip(alone, run(b, "B", seed=1)))  # it samples
    assert [e["seed"] for e in run(b, "B", "val")] == envs.seeds("val", "wmpo/Reach-v0", 4)
    assert not set(envs.seeds("val", "wmpo/Reach-v0", 10_000)) & set(envs.seeds("eval", "wmpo/Reach-v0", 10_000))


def test_results_script_builds_tables_and_plots_from_two_run_folders(tmp_path):
    """Issue 16: the README's tables come from run folders, mean ± std over seeds, never typed by hand."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import results
    import wmpo

    runs = []
    for seed, (base, wm) in enumerate([(0.2, 0.5), (0.4, 0.7)]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        res = lambda r: {t: {"success_rate": r, "ci95": [r - 0.05, r + 0.05], "episodes": 500}  # noqa: E731
                         for t in envs.TASKS} | {"mean": {"success_rate": r, "episodes": 1500}}
        json.dump({"policy_sft": res(base), "policy_grpo_real": res(base + 0.05), "policy_wmpo": res(wm)},
                  open(d / "eval.json", "w"))
        json.dump({"budget": 128, "real_trajectories": 126, "rollouts": 93, "val": 33, "heldout_not_counted": 96},
                  open(d / "budget.json", "w"))
        with open(d / "wmpo.metrics.jsonl", "w") as f:
            for it in range(3):
                f.write(json.dumps({"step": it, "wmpo/imagined_success": 0.3 + 0.1 * it, "val/real_success": 0.2}) + "\n")
        wmpo.save(wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64)),
                  str(d / "policy_grpo_real.safetensors"), real_trajectories=120)
        runs.append(str(d))
    out = str(tmp_path / "docs" / "results")
    results.main(results.Args(runs=tuple(runs), out=out))
    md = open(out + ".md").read()
    assert "**30.0 ± 14.1**" in md  # base on every task: mean of 20 and 40, sample std 14.1
    assert "**60.0 ± 14.1**" in md  # WMPO
    assert "126 of P = 128" in md and "| GRPO-real | 120 |" in md
    assert os.path.getsize(out + "_training.png") > 1000 and os.path.getsize(out + "_budget.png") > 1000
    assert "Lifelong" not in md  # no run has lifelong rounds


def test_results_lifelong_table_pairs_each_round_with_grpo_real_at_its_cumulative_budget(tmp_path):
    """Issue 16.4: each lifelong round beside real-env GRPO with the same settings and the smallest P >= the round's
    cumulative real trajectories; a GRPO-real run with another temperature never stands in for it."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import results

    d = tmp_path / "s0"
    d.mkdir()
    res = lambda r: {t: {"success_rate": r, "ci95": [r, r], "episodes": 500} for t in envs.TASKS} | {  # noqa: E731
        "mean": {"success_rate": r, "episodes": 1500}}
    json.dump({"policy_sft": res(0.40), "policy_wmpo": res(0.41), "policy_grpo_real": res(0.42),
               "policy_grpo_real_p384@T0.5": res(0.43), "policy_grpo_real_p512": res(0.44),
               "policy_grpo_real_hot_p384": res(0.99)}, open(d / "eval.json", "w"))
    json.dump({"policy_wmpo_r1": res(0.45), "policy_wmpo_r2": res(0.46)}, open(d / "eval_lifelong.json", "w"))
    grpo = {"temperature": 0.5, "lr": 1e-4}
    json.dump({"val_episodes": 50, "grpo": grpo}, open(d / "wmpo.args.json", "w"))
    for name, P, temp in [("grpo_real", 128, 0.5), ("grpo_real_p384", 384, 0.5), ("grpo_real_p512", 512, 0.5),
                          ("grpo_real_hot_p384", 384, 1.0)]:
        json.dump({"budget": P, "grpo": {**grpo, "temperature": temp}}, open(d / f"{name}.args.json", "w"))
    with open(d / "lifelong.metrics.jsonl", "w") as f:
        for r, n in enumerate([126, 252, 378]):
            f.write(json.dumps({"round": r, "checkpoint": "policy_wmpo" + (f"_r{r}" if r else ""), "world_model":
                                "wm" + (f".round{r}" if r else ""), "real_trajectories": n, "val/real_success": 0.5}) + "\n")
    table = results.lifelong_table(results.Args(runs=(str(d),)))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0 | policy_wmpo | wm | 126 | 50.0 | 41.0 | - | policy_grpo_real (128) | 42.0 | - |" in rows["0"]
    # P = 384 was evaluated at T = 0.5 only: it still stands beside rounds 1 and 2, its greedy cell empty
    assert "policy_wmpo_r1 | wm.round1 | 252 | 50.0 | 45.0 | - | policy_grpo_real_p384 (384) | - | 43.0 |" in rows["1"]
    assert "policy_wmpo_r2 | wm.round2 | 378 | 50.0 | 46.0 | - | policy_grpo_real_p384 (384) | - | 43.0 |" in rows["2"]
    assert "99.0" not in table and "| base | policy_sft | - | 0 | - | 40.0 |" in table


def test_results_training_curves_put_lifelong_rounds_one_after_another(tmp_path):
    """Issue 16.3 + 16.4: the imagined-vs-real plot of a lifelong run shows every round, round r's iterations after
    round r-1's; a run without lifelong rounds gives its one WMPO run's curves."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import results

    def write(name, imagined, val):  # train_policy.py's rows: val at step -1 and after each 2nd iteration
        with open(tmp_path / f"{name}.metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": -1, "val/real_success": val[0]}) + "\n")
            for it, x in enumerate(imagined):
                f.write(json.dumps({"step": it, "wmpo/imagined_success": x}) + "\n")
                if it % 2 == 1:
                    f.write(json.dumps({"step": it, "val/real_success": val[1 + it // 2]}) + "\n")

    write("wmpo", [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7])
    im, va, starts = results.training_curves(str(tmp_path), "policy_wmpo")
    assert im == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)] and va == [(0, 0.5), (2, 0.6), (4, 0.7)] and starts == [0]
    write("wmpo_r1", [0.8, 0.9], [0.7, 0.65])
    with open(tmp_path / "lifelong.metrics.jsonl", "w") as f:
        for r, ck in enumerate(["policy_wmpo", "policy_wmpo_r1"]):
            f.write(json.dumps({"round": r, "checkpoint": ck, "real_trajectories": 126 * (r + 1)}) + "\n")
    im, va, starts = results.training_curves(str(tmp_path), "policy_wmpo")
    assert starts == [0, 4] and im[4:] == [(5, 0.8), (6, 0.9)] and va[3:] == [(4, 0.7), (6, 0.65)]
    # another WMPO checkpoint of the same folder is not the lifelong run's round 0: its own curve only
    write("wmpo_other", [0.3], [0.4])
    assert results.training_curves(str(tmp_path), "policy_wmpo_other") == ([(1, 0.3)], [(0, 0.4)], [0])


def test_results_oracle_curve_blocks_and_val_checks(tmp_path):
    """Issue 33: a long grpo-real run's learning curve: rollout success per block of iterations (written-out means
    here) and every val check against the real trajectories spent by then, the base at step -1."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import results

    rng = np.random.default_rng(0)
    succ = rng.random((5, 2))  # 5 iterations x 2 tasks
    rows = [{"step": -1, "val/real_success": 0.3, "val/real_success/wmpo/A-v1": 0.2, "val/real_success/wmpo/B-v1": 0.4}]
    for it in range(5):
        rows.append({"step": it, "grpo/real_success": succ[it].mean(), "wmpo/success/wmpo/A-v1": succ[it, 0],
                     "wmpo/success/wmpo/B-v1": succ[it, 1], "real_trajectories": 32 * (it + 1), "grpo/entropy": 1.0})
        if it == 3:
            rows[-1].update({"val/real_success": 0.5, "val/real_success/wmpo/A-v1": 0.6, "val/real_success/wmpo/B-v1": 0.4})
    blocks, vals = results.oracle_curve(rows, block=2)
    assert [b["iterations"] for b in blocks] == [(0, 1), (2, 3), (4, 4)]
    assert [b["real_trajectories"] for b in blocks] == [64, 128, 160]
    np.testing.assert_allclose([b["success"] for b in blocks], [succ[:2].mean(), succ[2:4].mean(), succ[4].mean()])
    np.testing.assert_allclose([b["wmpo/A-v1"] for b in blocks], [succ[:2, 0].mean(), succ[2:4, 0].mean(), succ[4, 0]])
    assert blocks[0]["grad_cos"] is None
    assert vals == [{"step": -1, "real_trajectories": 0, "mean": 0.3, "wmpo/A-v1": 0.2, "wmpo/B-v1": 0.4},
                    {"step": 3, "real_trajectories": 128, "mean": 0.5, "wmpo/A-v1": 0.6, "wmpo/B-v1": 0.4}]
    with open(tmp_path / "grpo_real_oracle.metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = str(tmp_path / "docs" / "oracle")
    results.main(results.Args(runs=(str(tmp_path),), out=out, oracle="grpo_real_oracle", block=2))
    assert os.path.getsize(out + ".png") > 0 and "| 2–3 | 128 |" in open(out + ".md").read()


@pytest.mark.slow
def test_torchrun_two_processes_train_wm_and_wmpo(run_dir, tmp_path):
    # the same scripts under torchrun (gloo on CPU): rank 0 alone writes files, the run ends cleanly on both ranks
    import shutil

    d = str(tmp_path / "ddp")
    shutil.copytree(run_dir, d)
    for f in os.listdir(d):
        if f.startswith(("codec", "wm", "reward", "train_wm", "policy_wmpo")):
            os.remove(os.path.join(d, f))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544"]
    env = {"OMP_NUM_THREADS": "1", **SCRIPT_ENV}
    wm_args = ["train_wm.py", "--run-dir", d, "--budget", "6", "--explore-per-level", "1", "--explore-noise", "0.5",
               "--heldout-groups", "1", "--group-size", "2", "--codec-steps", "2", "--wm-steps", "2",
               "--wm-finetune-steps", "1", "--reward-steps", "2", "--batch-size", "4",
               "--wm.width", "16", "--wm.d", "32", "--wm.n-head", "1", "--codec.width", "8", "--reward.width", "8",
               "--reward-replays", "2", "--grpo-path-states", "1"]
    for args in (wm_args, ["train_policy.py", "wmpo", "--run-dir", d, "--iterations", "2",
                           "--grpo.states-per-task", "1", "--grpo.group-size", "2", "--val-every", "0"]):
        out = subprocess.run(torchrun + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(l) for l in open(os.path.join(d, "wmpo.metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1]  # one row per iteration: only rank 0 logs
    assert os.path.exists(os.path.join(d, "wm_report.json")) and os.path.exists(os.path.join(d, "policy_wmpo.safetensors"))


@pytest.mark.slow
def test_eval_generalisation_suite_writes_the_table(run_dir):
    run("eval.py", "--run-dir", run_dir, "--suite", "generalisation", "--episodes", "2", "--tasks", "wmpo/Reach-v0",
        "--videos", "0")
    res = json.load(open(os.path.join(run_dir, "eval.json")))
    assert all(k.startswith("policy_sft") for k in res)  # every top-level key is a checkpoint (INTERFACE.md)
    ck = res["policy_sft"]
    for s in ["Position", "Background", "Texture"]:
        r = ck[f"wmpo/Reach-{s}-v0"]
        assert r["episodes"] == 2 and ck[f"generalisation/{s}"]["success_rate"] == r["success_rate"]
        assert 0 <= r["recovery_rate"] <= 1
    rates = [ck[f"wmpo/Reach-{s}-v0"]["success_rate"] for s in ["Position", "Background", "Texture"]]
    assert abs(ck["generalisation/mean"]["success_rate"] - np.mean(rates)) < 1e-9
    assert "wmpo/PushCube-v0" in res["policy_sft"]  # the earlier tasks-suite evaluation is kept
    assert os.path.exists(os.path.join(run_dir, "eval_generalisation.md"))


@pytest.mark.slow
def test_gpu_check_dry_run_starts_every_step(tmp_path):
    # the GPU script cannot rot unnoticed: without CUDA (or with --dry-run) every step must start and pass
    env = {**os.environ, "OUT": str(tmp_path / "gpu"), "PYTHON": sys.executable}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = open(tmp_path / "gpu" / "summary.md").read()
    for name in ["tests", "bench_frame_attention", "bench_grpo", "smoke_help"]:
        assert f"| {name} | ok |" in summary, summary


def test_failure_kinds_from_object_positions():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_signal", os.path.join(ROOT, "scripts", "rl_signal.py"))
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    names, _ = envs.object_layout("wmpo/Reach-v0")  # pusher, pad_red, pad_green, pad_blue
    first = np.zeros((len(names), 2))
    first[names.index("pad_red")], first[names.index("pad_green")] = [0.2, 0], [-0.2, 0]
    ins = "go to the red pad"
    last = first.copy()
    for end, kind in [([-0.2, 0.0], "wrong target"), ([0.15, 0.0], "near miss"), ([0.14, 0.05], "halfway"),
                      ([0.0, -0.2], "off course")]:
        last[0] = end
        assert rl.failure_kind("wmpo/Reach-v0", ins, first, last) == kind, end
    names, _ = envs.object_layout("wmpo/PushCube-v0")  # pusher, block_red, block_blue, pad_green
    first = np.zeros((len(names), 2))
    first[names.index("block_red")], first[names.index("block_blue")] = [0.1, 0], [-0.1, 0]
    first[names.index("pad_green")] = [0.1, 0.2]
    ins = "push the red block onto the green pad"
    last = first.copy()
    assert rl.failure_kind("wmpo/PushCube-v0", ins, first, last) == "untouched"
    last[names.index("block_blue")] = [-0.1, 0.1]  # the other block pushed 10 cm
    assert rl.failure_kind("wmpo/PushCube-v0", ins, first, last) == "wrong target"


def load_rl_signal():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_signal", os.path.join(ROOT, "scripts", "rl_signal.py"))
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    return rl


def test_group_census_and_outcome_stats_count_by_hand():
    import fidelity

    real = np.array([0, 0, 1, 1, 0, 1, 1, 0], bool)  # groups of G = 2: fail, success, mixed, mixed
    imag = np.array([0, 1, 1, 1, 0, 1, 0, 0], bool)
    assert fidelity.group_census(real, 2) == {"all_fail": 0.25, "all_success": 0.25, "mixed": 0.5}
    st = fidelity.outcome_stats(real, imag, 2)
    assert st["agreement"] == 6 / 8 and st["precision"] == 3 / 4 and st["recall"] == 3 / 4
    assert st["mixed_groups"] == 2 and st["imagined_success_rate"] == 4 / 8
    # within the two mixed real groups the imagined advantages are (-1, +1) then (0, 0): correlation with (-1, +1),
    # (+1, -1) is that of [-1, 1, 1, -1] with [-1, 1, 0, 0], 1 / sqrt(2)
    assert abs(st["advantage_correlation"] - 2 ** -0.5) < 1e-6
    def ep(task, n, succ):
        return {"task": task, "frames": np.zeros((n, 1)), "success": np.array([False, succ])}

    census = fidelity.data_census({"explore": [ep("a", 5, True), ep("b", 3, False), ep("a", 7, False)], "val": []})
    assert census == {"explore": {"a": {"episodes": 2, "frames": 12, "success": 0.5},
                                  "b": {"episodes": 1, "frames": 3, "success": 0.0}}, "val": {}}


def test_outcome_explained_tells_decisions_from_luck():
    # decided: the outcome is the sign of a state feature present from the first decision on; luck: a coin flip
    # independent of the state. The held-out score must be high for the first at every quarter and ~0 for the second.
    rl = load_rl_signal()
    rng = np.random.default_rng(0)

    def batches(decided):
        out = []
        for _ in range(4):
            x = rng.normal(size=(48, 21, 3))
            x[:, :, 0] = x[:, :1, 0]  # the deciding feature persists along the episode
            ok = x[:, 0, 0] > 0 if decided else rng.random(48) < 0.5
            out.append({"features": list(x), "success": torch.tensor(ok), "finish": torch.full((48,), 20)})
        return out

    d, luck = rl.outcome_explained(batches(True), 20, 2, 8), rl.outcome_explained(batches(False), 20, 2, 8)
    assert d["explained"] > 0.6 and min(d["explained_by_quarter"]) > 0.5, d
    assert luck["explained"] < 0.1, luck
    # features: the named block's distance to the named pad, to the other pad, and the pusher's to the block
    names, _ = envs.object_layout("wmpo/PushCube-v1")
    pos = np.random.default_rng(1).normal(size=(3, len(names), 2))
    f = rl.state_features("wmpo/PushCube-v1", "push the blue block onto the yellow pad", pos)
    at = lambda n: pos[:, names.index(n)]  # noqa: E731
    want = [np.linalg.norm(at(a) - at(b), axis=-1) for a, b in
            [("block_blue", "pad_yellow"), ("block_blue", "pad_green"), ("pusher", "block_blue")]]
    np.testing.assert_allclose(f, np.stack(want, 1), rtol=1e-6)


@pytest.mark.slow
def test_rl_signal_reports_census_and_cosines(run_dir):
    run("scripts/rl_signal.py", "--run-dir", run_dir, "--tasks", "wmpo/Reach-v0", "wmpo/PushCube-v0", "--groups", "2",
        "--batches", "2", "--envs-at-once", "4", "--grpo.group-size", "2", "--temperature", "1.0")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "rl_signal.jsonl"))]
    assert [r["task"] for r in rows] == ["wmpo/Reach-v0", "wmpo/PushCube-v0"]
    for r in rows:
        assert r["trajectories"] == 8 and r["batches"] == 2
        assert r["pairs"] <= 1 and (r["explained"] is None or r["explained"] <= 1)
        assert abs(r["groups_all_fail"] + r["groups_all_success"] + r["groups_mixed"] - 1) < 1e-6
        n_fail = round((1 - r["success"]) * 4)
        assert abs(sum(r["failures"].values()) - (1 if n_fail else 0)) < 1e-6


def test_base_fit_numbers_of_a_uniform_head_are_log_bins():
    # a head with a zero last layer is uniform over its bins: NLL = entropy = log(bins) at any target, and 90% of its
    # mass needs 15 of 16 bins
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import wmpo
    from base_fit import fit_numbers

    pol = wmpo.VLA(wmpo.PolicyConfig(bins=16, width=8, keypoints=8, text_dim=16, hidden=32))
    torch.nn.init.zeros_(pol.head[-1].weight)
    torch.nn.init.zeros_(pol.head[-1].bias)
    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(), [7, 8], num_envs=2)
    r = fit_numbers(pol, eps, 0.5)
    assert abs(r["nll"] - np.log(16)) < 1e-5 and abs(r["entropy"] - np.log(16)) < 1e-5
    assert abs(r["entropy_T0.5"] - np.log(16)) < 1e-5 and r["bins90_median"] == 15
    lengths = [len(e["actions"]) - 1 for e in eps]  # each step's chunk counts only actions before the episode's end
    assert r["tokens"] == sum(2 * min(8, T - t) for T in lengths for t in range(T))
