"""How a base policy fits demonstrations it never saw: is it unsure where it is wrong, or has it memorised?

    python scripts/base_fit.py --run-dir runs/s0 --episodes 50

Per task, the clean scripted expert (no DART noise) runs --episodes episodes from `val` reset seeds (never demo or
`eval` seeds); on every state it visited the policy scores the expert's next chunk (the SFT targets,
train_policy.chunk_targets) and reports
    nll         held-out token NLL (nats per token, T = 1): what early stopping on a validation loss would watch
    entropy     mean per-token entropy at T = 1 and at --temperature (the spread sampling draws from)
    acc / acc2  argmax token = the expert's, and within 2 bins of it
    tv_bins     the bins per token that hold 90% of the probability (median): 1-2 for a memorised head
Appends one JSON line per (task, checkpoint) to <run-dir>/base_fit.jsonl and prints a markdown table. Bases with a
different number of bins compare on nll per token only up to log(bins); acc2 and tv_bins are in bins too.
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import wmpo  # noqa: E402
from train_policy import chunk_targets  # noqa: E402


@dataclass
class Args:
    run_dir: str = "runs/demo"
    """run folder holding the checkpoint"""
    checkpoint: str = "policy_sft"
    """policy checkpoint to measure"""
    tasks: tuple[str, ...] = tuple(envs.TASKS)
    """tasks, each measured on its own"""
    episodes: int = 50
    """clean expert episodes per task from `val` seeds (5,000 on: clear of eval.py's val episodes)"""
    temperature: float = 0.5
    """the deploy temperature, for the second entropy column"""


def fit_numbers(policy: wmpo.VLA, episodes: list[dict], temperature: float) -> dict:
    frames, words, tokens, masks = chunk_targets(episodes, policy.cfg.chunk, policy.cfg.bins, policy.text.words)
    out = {"nll": [], "entropy": [], "entropy_T": [], "acc": [], "acc2": [], "bins90": []}
    with torch.no_grad():
        for i in range(0, len(frames), 256):
            f, w, t, m = frames[i : i + 256], words[i : i + 256], tokens[i : i + 256], masks[i : i + 256]
            logits = policy.logits(f, w, t)  # teacher-forced for an autoregressive head: each token given the truth
            logp = logits.log_softmax(-1)  # (b, n, v)
            p = logp.exp()
            pT = (logits / temperature).softmax(-1)
            top = p.sort(-1, descending=True).values.cumsum(-1)
            out["nll"].append(-logp.gather(-1, t[..., None])[..., 0][m])
            out["entropy"].append(-(p * logp).sum(-1)[m])
            out["entropy_T"].append(-(pT * pT.clamp(min=1e-30).log()).sum(-1)[m])
            out["acc"].append((logits.argmax(-1) == t)[m].float())
            out["acc2"].append(((logits.argmax(-1) - t).abs() <= 2)[m].float())
            out["bins90"].append(((top < 0.9).sum(-1) + 1)[m].float())
    cat = {k: torch.cat(v) for k, v in out.items()}
    return {"nll": cat["nll"].mean().item(), "entropy": cat["entropy"].mean().item(),
            f"entropy_T{temperature:g}": cat["entropy_T"].mean().item(), "acc": cat["acc"].mean().item(),
            "acc2": cat["acc2"].mean().item(), "bins90_median": cat["bins90"].median().item(),
            "tokens": len(cat["nll"])}


def main(args: Args):
    policy = wmpo.load(envs.require(os.path.join(args.run_dir, f"{args.checkpoint}.safetensors"),
                                    f"python train_policy.py sft --run-dir {args.run_dir}"), expect="VLA").eval()
    rows = []
    for task in args.tasks:
        eps = envs.collect(task, envs.expert_policy(), envs.seeds("val", task, args.episodes, start=5000),
                           desc=f"expert {task}")
        row = {"task": task, "checkpoint": args.checkpoint, "bins": policy.cfg.bins,
               "decoding": getattr(policy.cfg, "decoding", "parallel"), "expert_success":
               float(np.mean([e["success"][-1] for e in eps])), **fit_numbers(policy, eps, args.temperature)}
        rows.append(row)
        with open(os.path.join(args.run_dir, "base_fit.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    keys = [k for k in rows[0] if k not in ("task", "checkpoint", "decoding")]
    print("| task | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['task']} | " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                               for k in keys) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
