#!/usr/bin/env bash
# The whole WMPO loop on the tiny preset, one training seed, into one run folder (nanochat's runcpu.sh is the model):
#   base policy (SFT) -> world + reward model (P = 128 real trajectories) -> WMPO -> real-env GRPO at the same P
#   -> evaluation (500 episodes per task, greedy and T = 1) -> results tables and plots
#
#   bash scripts/run_tiny.sh                 # runs/tiny-s0
#   bash scripts/run_tiny.sh runs/tiny-s1 1  # another training seed: then python scripts/results.py runs/tiny-s*
#
# Every step resumes where it stopped, so re-running after a kill continues. Wall time per step goes to
# DIR/wall_times.json. Environment: PY (python to use, default .venv/bin/python if present), EPISODES (default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/tiny-s0}
SEED=${2:-0}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
EPISODES=${EPISODES:-500}
mkdir -p "$DIR"
T0=$(date +%s)
TIMES=()
step() {  # step NAME CMD...: run it, record its wall time
    local name=$1 start
    shift
    start=$(date +%s)
    echo "== $name: $*"
    "$@"
    TIMES+=("\"$name\": $(( $(date +%s) - start ))")
}

step sft       "$PY" train_policy.py sft --run-dir "$DIR" --seed "$SEED"
step train_wm  "$PY" train_wm.py --run-dir "$DIR" --seed "$SEED" --budget 128
step wmpo      "$PY" train_policy.py wmpo --run-dir "$DIR" --seed "$SEED"
step grpo_real "$PY" train_policy.py grpo-real --run-dir "$DIR" --seed "$SEED" --budget 128
step eval      "$PY" eval.py --run-dir "$DIR" --checkpoints policy_sft policy_grpo_real policy_wmpo \
                   --episodes "$EPISODES" --temperatures 0 0.5 1
step results   "$PY" scripts/results.py "$DIR" --out "$DIR/results"

TOTAL=$(( $(date +%s) - T0 ))
( IFS=,; echo "{${TIMES[*]}, \"total\": $TOTAL}" ) > "$DIR/wall_times.json"
echo "done in $TOTAL s: $DIR/results.md"
