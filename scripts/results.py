"""The README's results, built from run folders so that no number in it is typed by hand.

    python scripts/results.py runs/seed0 runs/seed1 runs/seed2 --out docs/results

Reads, in each run folder: eval.json (eval.py), budget.json and wm_report.json (train_wm.py), the WMPO
checkpoint's metrics (wmpo.metrics.jsonl for policy_wmpo, wmpo_t0.5.metrics.jsonl for policy_wmpo_t0.5) and the
checkpoints' metadata (real trajectories a GRPO-real checkpoint used). Writes:
    <out>.md              headline table (per task and checkpoint: every seed's success [Wilson 95%], mean ± std
                          over seeds), the real budget each method used, the world-model fidelity of each run
    <out>_training.png    imagined success (world model + reward model) vs real success on `val` seeds during WMPO
                          (all lifelong rounds one after another when the run has lifelong.metrics.jsonl)
    <out>_budget.png      success over the base policy against real trajectories used (sample efficiency):
                          the headline's GRPO-real / WMPO checkpoints and their variants <name>_p<P>, every
                          temperature, each point the mean over the runs that have it
Checkpoints are the eval.json keys: greedy ones as they are, "<name>@T0.5" / "<name>@T1" for T = 0.5 / 1
(0.5: GRPO's rollout temperature, the one to deploy at).
"""

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import tyro


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders, one per training seed (each with eval.json from eval.py)"""
    out: str = "docs/results"
    """output prefix: <out>.md, <out>_training.png, <out>_budget.png"""
    checkpoints: tuple[str, ...] = ("policy_sft", "policy_grpo_real", "policy_wmpo")
    """columns of the headline table, in order (with their @T0.5 / @T1 variants when evaluated)"""
    oracle: str = ""
    """instead of the headline: the learning curve of a long grpo-real run (the oracle) from
    <run>/<oracle>.metrics.jsonl (e.g. grpo_real_oracle) -> <out>.md and <out>.png: rollout success per block of
    iterations and `val` success at its checks, against real trajectories, beside the base (the first `val` check)
    and the base + 20 gate"""
    block: int = 20
    """iterations per block of the oracle curve"""


LABELS = {"policy_sft": "base (SFT)", "policy_grpo_real": "GRPO-real", "policy_wmpo": "WMPO"}
TEMPS = {"": "greedy", "@T0.5": "T=0.5", "@T1": "T=1"}  # eval.json key suffix -> label


def label(ckpt: str) -> str:
    """policy_wmpo -> WMPO; a variant keeps its suffix: policy_wmpo_t0.5 -> WMPO t0.5."""
    for name, lab in LABELS.items():
        if ckpt == name or ckpt.startswith(name + "_"):
            return lab + ckpt[len(name):].replace("_", " ")
    return ckpt


def read_json(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def real_trajectories(run: str, ckpt: str) -> int | None:
    """Real trajectories a checkpoint paid for: GRPO-real records it in its metadata; WMPO's are train_wm's budget.json
    (its lifelong rounds add their own P each, recorded per round in lifelong.metrics.jsonl)."""
    if ckpt.startswith("policy_wmpo"):
        b = read_json(os.path.join(run, "budget.json"))
        return b["real_trajectories"] if b else None
    path = os.path.join(run, f"{ckpt}.safetensors")
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return int(json.loads(meta["real_trajectories"])) if "real_trajectories" in meta else None


def cell(rates: list[float]) -> str:
    """mean ± std over seeds (std only with two or more)."""
    m = 100 * np.mean(rates)
    return f"{m:.1f} ± {100 * np.std(rates, ddof=1):.1f}" if len(rates) > 1 else f"{m:.1f}"


def headline(args: Args, evals: dict) -> str:
    cols = [c + t for t in TEMPS for c in args.checkpoints if all(c + t in e for e in evals.values())]
    if not cols:
        return "(no run has eval.json entries for the requested checkpoints)\n"
    tasks = [t for t in next(iter(evals.values()))[cols[0]] if t != "mean" and not t.startswith("generalisation")]
    names = [label(c.split("@")[0]) + (f" T={c.split('@T')[1]}" if "@" in c else "") for c in cols]
    lines = ["| task | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(cols)]
    for task in tasks + ["mean"]:
        row = []
        for c in cols:
            rates = [e[c][task]["success_rate"] for e in evals.values()]
            seeds = ", ".join(
                f"{100 * r['success_rate']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
                for r in (e[c][task] for e in evals.values())) if task != "mean" else ""
            row.append(f"**{cell(rates)}**" + (f"<br>{seeds}" if seeds and len(evals) > 1 else
                                               (f" [{seeds.split('[')[1]}" if seeds else "")))
        lines.append(f"| {task.split('/')[-1]} | " + " | ".join(row) + " |")
    n = next(iter(evals.values()))[cols[0]][tasks[0]]["episodes"]
    lines.append(f"\n{len(evals)} training seed(s) ({', '.join(evals)}), {n} evaluation episodes per task and seed; "
                 "success % as mean ± std over seeds, then each seed's rate [Wilson 95%].\n")
    return "\n".join(lines) + "\n"


def budget_table(args: Args) -> str:
    lines = ["| run | method | real trajectories | of which |", "|---|---|---|---|"]
    for run in args.runs:
        b = read_json(os.path.join(run, "budget.json"))
        if b:
            lines.append(f"| {run} | WMPO (train_wm.py) | {b['real_trajectories']} of P = {b['budget']} | "
                         f"{b['rollouts']} alignment + {b['val']} validation rollouts; {b['heldout_not_counted']} "
                         "held-out report trajectories not counted (measurement only) |")
        for ckpt in [c for c in args.checkpoints if c.startswith("policy_grpo_real")]:
            n = real_trajectories(run, ckpt)
            if n is not None:
                lines.append(f"| {run} | {label(ckpt)} | {n} | rollouts of the policy being trained |")
    return "\n".join(lines) + "\n"


def fidelity_table(args: Args) -> str:
    keys = [("outcome_agreement", "reward agreement"), ("advantage_correlation", "adv corr"),
            ("judge_agreement", "geometric judge")]
    lines = ["| run | task | pusher px h=8 true / shuffled | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for run in args.runs:
        rep = read_json(os.path.join(run, "wm_report.json"))
        for task, r in (rep or {}).get("per_task", {}).items():
            pus = r.get("pusher_err_px_by_horizon"), r.get("pusher_err_px_shuffled_by_horizon")
            p = f"{pus[0][7]:.1f} / {pus[1][7]:.1f}" if all(x and len(x) > 7 for x in pus) else "-"
            vals = [f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-" for k, _ in keys]
            lines.append(f"| {run} | {task.split('/')[-1]} | {p} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def lifelong_table(args: Args) -> str:
    """Lifelong rounds (train_policy.py wmpo --rounds N, lifelong.metrics.jsonl): each round's checkpoint, the real
    trajectories paid so far, its real success on `val` seeds (logged by the run) and on `eval` seeds (eval.json or
    eval_lifelong*.json), beside the real-env GRPO checkpoint with the same GRPO settings (temperature, lr) and the
    smallest budget P >= the round's cumulative count."""
    lines = []
    for run in args.runs:
        rows = read_jsonl(os.path.join(run, "lifelong.metrics.jsonl"))
        if not rows:
            continue
        ev = read_json(os.path.join(run, "eval.json")) or {}
        for path in sorted(glob.glob(os.path.join(run, "eval_lifelong*.json"))):  # eval.py --out eval_lifelong[_r2]
            ev.update(read_json(path))
        rate = lambda key: f"{100 * ev[key]['mean']['success_rate']:.1f}" if key in ev else "-"  # noqa: E731
        wmpo_args = read_json(os.path.join(run, rows[0]["checkpoint"].removeprefix("policy_") + ".args.json"))
        grpo = wmpo_args["grpo"]
        real = []  # (P, checkpoint) of evaluated GRPO-real runs with the same temperature and lr
        for key in {k.split("@")[0] for k in ev}:  # evaluated at any temperature
            a = read_json(os.path.join(run, key.removeprefix("policy_") + ".args.json"))
            if key.startswith("policy_grpo_real") and a and all(a["grpo"][k] == grpo[k] for k in ("temperature", "lr")):
                real.append((a["budget"], key))
        t = f"@T{grpo['temperature']:g}"
        lines += [f"\n{run} (success %, mean over tasks; `val`: {wmpo_args['val_episodes']} episodes per task):\n",
                  f"| round | WMPO checkpoint | world model | real trajectories | val T={grpo['temperature']:g} | "
                  f"eval greedy | eval T={grpo['temperature']:g} | GRPO-real (P) | eval greedy | "
                  f"eval T={grpo['temperature']:g} |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| base | policy_sft | - | 0 | - | {rate('policy_sft')} | {rate('policy_sft' + t)} | | | |"]
        for r in rows:
            n = r["real_trajectories"]
            P, ck = min([(P, k) for P, k in real if P >= n], default=(None, None))
            other = f"{ck} ({P}) | {rate(ck)} | {rate(ck + t)}" if ck else "- | - | -"
            lines.append(f"| {r['round']} | {r['checkpoint']} | {r['world_model']} | {n} | "
                         f"{100 * r['val/real_success']:.1f} | {rate(r['checkpoint'])} | {rate(r['checkpoint'] + t)} | "
                         f"{other} |")
    return "\n".join(lines) + "\n" if lines else ""


def training_curves(run: str, wmpo_ckpt: str):
    """(iteration, imagined success) and (iteration, real `val` success) of a WMPO run; when the run is lifelong
    (lifelong.metrics.jsonl starts with this checkpoint) every round's iterations follow the previous round's.
    Returns (imagined, real, the first iteration of each round)."""
    rounds = [r["checkpoint"] for r in read_jsonl(os.path.join(run, "lifelong.metrics.jsonl"))]
    ckpts = rounds if rounds and rounds[0] == wmpo_ckpt else [wmpo_ckpt]
    im, va, starts, offset = [], [], [], 0
    for ck in ckpts:
        rows = read_jsonl(os.path.join(run, ck.removeprefix("policy_") + ".metrics.jsonl"))
        starts.append(offset)
        im += [(offset + r["step"] + 1, r["wmpo/imagined_success"]) for r in rows if "wmpo/imagined_success" in r]
        va += [(offset + r["step"] + 1, r["val/real_success"]) for r in rows if "val/real_success" in r]
        offset += 1 + max([r["step"] for r in rows if "step" in r], default=-1)  # this round's iterations
    return im, va, starts


def training_plot(args: Args, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    wmpo_ckpt = next((c for c in args.checkpoints if c.startswith("policy_wmpo")), "policy_wmpo")
    for i, run in enumerate(args.runs):
        im, va, starts = training_curves(run, wmpo_ckpt)
        for x in starts[1:]:
            ax.axvline(x, color="grey", ls=":", lw=0.8)
        if im:
            ax.plot(*zip(*im), color=f"C{i}", ls="--", alpha=0.8, label=f"{os.path.basename(run)} imagined")
        if va:
            ax.plot(*zip(*va), color=f"C{i}", marker="o", label=f"{os.path.basename(run)} real (val seeds)")
        drawn |= bool(im or va)
    if drawn:
        ax.set(xlabel="WMPO iteration (dotted: a new lifelong round)", ylabel="success (mean over tasks)", ylim=(0, 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def budget_plot(args: Args, evals: dict, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the headline's GRPO-real and WMPO checkpoints and their budget variants (<name>_p<P>), at every temperature
    # evaluated: a colour per method, a line style per temperature. y is the change over the same run's base policy
    # at the same temperature, averaged over the runs that have the point: seeds differ by ~10 points in their base,
    # so raw rates from different seeds would not line up
    methods = [c for c in args.checkpoints if c != "policy_sft"]
    pts = {(m, t): {} for m in methods for t in TEMPS}
    for run, e in evals.items():
        for key, res in e.items():
            name, at, temp = key.partition("@")
            t = at + temp  # the TEMPS key: "", "@T0.5", "@T1"
            m = next((m for m in methods if name == m or name.startswith(m + "_p")), None)
            base = e.get("policy_sft" + t, {}).get("mean")
            n = real_trajectories(run, name) if m and t in TEMPS and "mean" in res and base else None
            if n is not None:
                pts[(m, t)].setdefault(n, []).append(100 * (res["mean"]["success_rate"] - base["success_rate"]))
    if not any(pts.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    styles = dict(zip(TEMPS, ["-", "--", ":"]))
    for (m, t), p in pts.items():
        if p:
            xs = sorted(p)
            i = methods.index(m)
            ax.plot(xs, [np.mean(p[x]) for x in xs], color=f"C{i}", ls=styles[t], marker="*" if "wmpo" in m else "o",
                    ms=12 if "wmpo" in m else 6, label=f"{label(m)}, {TEMPS[t]}")
    ax.axhline(0, color="gray", lw=0.8, label="base (SFT), same temperature")
    ax.set(xscale="log", xlabel="real trajectories used",
           ylabel="success − base (points,\nmean over tasks and runs)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def oracle_curve(rows: list[dict], block: int) -> tuple[list[dict], list[dict]]:
    """A grpo-real run's metrics rows -> (blocks, val checks). A block: its iterations, the real trajectories spent by
    its end, rollout success (mean over tasks, and per task), mean per-token entropy, gradient cosine vs its
    permuted control. A val check: real trajectories spent, `val` success (mean and per task); the base is step -1."""
    it_rows = [r for r in rows if "grpo/real_success" in r]
    first = it_rows[0] if it_rows else {}
    tasks = sorted(k.removeprefix("wmpo/success/") for k in first if k.startswith("wmpo/success/"))
    blocks = []
    for i in range(0, len(it_rows), block):
        b = it_rows[i : i + block]
        mean = lambda k: float(np.mean([r[k] for r in b if k in r])) if any(k in r for r in b) else None  # noqa: E731
        blocks.append({"iterations": (b[0]["step"], b[-1]["step"]), "real_trajectories": b[-1]["real_trajectories"],
                       "success": mean("grpo/real_success"), "entropy": mean("grpo/entropy"),
                       "grad_cos": mean("grpo/grad_cos"), "grad_cos_perm": mean("grpo/grad_cos_perm"),
                       **{t: mean(f"wmpo/success/{t}") for t in tasks}})
    spent = {r["step"]: r["real_trajectories"] for r in it_rows}
    vals = [{"step": r["step"], "real_trajectories": spent.get(r["step"], 0),
             **{k.removeprefix("val/real_success").lstrip("/") or "mean": v for k, v in r.items()
                if k.startswith("val/real_success")}} for r in rows if "val/real_success" in r]
    return blocks, vals


def oracle_report(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    md = [f"## Oracle learning curve ({args.oracle}, blocks of {args.block} iterations)\n"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, run in enumerate(args.runs):
        rows = read_jsonl(os.path.join(run, f"{args.oracle}.metrics.jsonl"))
        if not rows:
            raise SystemExit(f"error: {run}/{args.oracle}.metrics.jsonl is missing; make it with: python "
                             f"train_policy.py grpo-real --run-dir {run} --out policy_{args.oracle} ...")
        blocks, vals = oracle_curve(rows, args.block)
        tasks = [k for k in blocks[0] if "/" in k] if blocks else []
        md += [f"\n### {run}\n\n| iterations | real trajectories | rollout success | "
               + " | ".join(t.split("/")[1] for t in tasks) + " | entropy | grad cos | cos perm |\n|"
               + "---|" * (6 + len(tasks)) + "\n"]
        f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
        for b in blocks:
            md.append(f"| {b['iterations'][0]}–{b['iterations'][1]} | {b['real_trajectories']} | {f(b['success'])} | "
                      + " | ".join(f(b[t]) for t in tasks)
                      + f" | {f(b['entropy'], 2)} | {f(b['grad_cos'])} | {f(b['grad_cos_perm'])} |\n")
        if vals:
            keys = [k for k in vals[0] if k not in ("step", "real_trajectories")]
            md += ["\n| val check after iteration | real trajectories | " + " | ".join(keys) + " |\n|"
                   + "---|" * (2 + len(keys)) + "\n"]
            md += [f"| {'base' if v['step'] < 0 else v['step']} | {v['real_trajectories']} | "
                   + " | ".join(f(v.get(k)) for k in keys) + " |\n" for v in vals]
        name = os.path.basename(run.rstrip("/"))
        if blocks:
            ax.plot([b["real_trajectories"] for b in blocks], [b["success"] for b in blocks], color=f"C{i}",
                    ls="--", marker=".", label=f"{name}: rollout success, block mean")
        if vals:
            ax.plot([v["real_trajectories"] for v in vals], [v["mean"] for v in vals], color=f"C{i}", marker="o",
                    label=f"{name}: val success")
            ax.axhline(vals[0]["mean"], color=f"C{i}", lw=0.8, ls=":", label=f"{name}: base (val)")
            ax.axhline(min(vals[0]["mean"] + 0.2, 1), color=f"C{i}", lw=0.8, ls="-.", label=f"{name}: base + 20")
    ax.set(xlabel="real trajectories", ylabel="success (mean over tasks)", ylim=(0, 1))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    plt.close(fig)
    md.append(f"\n![oracle]({os.path.basename(args.out)}.png)\n\nMade by `python scripts/results.py "
              f"{' '.join(args.runs)} --oracle {args.oracle} --block {args.block} --out {args.out}`.\n")
    open(f"{args.out}.md", "w").write("".join(md))
    print("".join(md))


def main(args: Args):
    if args.oracle:
        return oracle_report(args)
    evals = {}
    for run in args.runs:
        if not os.path.isdir(run):
            raise SystemExit(f"error: {run} is not a run folder")
        e = read_json(os.path.join(run, "eval.json"))
        if e is None:
            raise SystemExit(f"error: {run}/eval.json is missing; make it with: python eval.py --run-dir {run} "
                             f"--checkpoints {' '.join(args.checkpoints)} --episodes 500 --temperatures 0 0.5 1")
        evals[run] = e
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    md = ["## Headline: real success\n", headline(args, evals), "\n## Real budget\n", budget_table(args),
          "\n## World-model fidelity of these runs (held-out trajectories)\n", fidelity_table(args)]
    if table := lifelong_table(args):
        md += ["\n## Lifelong rounds\n", table]
    for name, fn in [("training", lambda p: training_plot(args, p)), ("budget", lambda p: budget_plot(args, evals, p))]:
        path = f"{args.out}_{name}.png"
        if fn(path):
            md.append(f"\n![{name}]({os.path.basename(path)})\n")
    ckpts = "" if args.checkpoints == Args.checkpoints else f" --checkpoints {' '.join(args.checkpoints)}"
    md.append(f"\nMade by `python scripts/results.py {' '.join(args.runs)}{ckpts} --out {args.out}`.\n")
    open(f"{args.out}.md", "w").write("".join(md))
    print("".join(md))


if __name__ == "__main__":
    main(tyro.cli(Args))
