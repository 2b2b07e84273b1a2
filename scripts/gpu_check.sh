#!/usr/bin/env bash
# One prepared command for a rare, short GPU lease: GPU kernel tests, both kernel benchmarks and a short smoke run
# of the `gpu` preset, each step under its own time limit, everything written into one folder.
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine: writes $OUT (or gpu_check/) and prints a summary
#   bash scripts/gpu_check.sh --dry-run       # anywhere (automatic without CUDA): checks that every step starts
#
# Installs nothing beyond requirements.txt. Steps (limits in seconds, so one slow step cannot eat the rest):
#   1. GPU tests of both kernels (bf16 / fp16 / fp32 at large shapes; no interpreter)          120
#   2. python -m kernels.frame_attention: ours vs SDPA flash causal / dense mask / FlexAttention 150
#   3. python -m kernels.grpo: advantages + loss vs eager and torch.compile                       60
#   4. gpu-preset smoke: sft 300 steps, train_wm with small step counts, wmpo 2 iterations       320
# Measured on an H200 (2026-11-27): 28 + 50 + 40 + 37 + ~150 + 45 s. Everything is also packed into
# $OUT/gpu_check.tgz (logs, CSVs, run metrics; no weights), so a lease that returns few files needs only that one.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3 )}
OUT=${OUT:-gpu_check}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    [ $DRY = 0 ] && echo "no CUDA device: dry run"
    DRY=1
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), dry_run=$DRY" > "$SUMMARY"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (dry run)')" | tee -a "$SUMMARY"

step() {  # step NAME LIMIT CMD... : run with a time limit, log to $OUT/NAME.log, record status and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc = 124 ] && status="timed out after ${limit}s"
    [ $rc != 0 ] && [ $rc != 124 ] && status="failed (exit $rc)"
    echo "| $name | $status | $(( $(date +%s) - t0 )) s |" | tee -a "$SUMMARY"
    [ $rc = 0 ]
}

echo "| step | status | time |" >> "$SUMMARY"
echo "|---|---|---|" >> "$SUMMARY"
RUN="$OUT/run"
FAIL=0
if [ $DRY = 1 ]; then  # every step starts: imports, CLIs, test collection
    step tests 120 $PY -m pytest -q --collect-only tests/test_frame_attention.py tests/test_grpo_kernels.py || FAIL=1
    step bench_frame_attention 60 $PY -c "import kernels.frame_attention as k; assert callable(k.bench); print('would benchmark', list(k.SHAPES))" || FAIL=1
    step bench_grpo 60 $PY -c "import kernels.grpo as k; assert callable(k.bench); print('would benchmark grouped advantages + loss')" || FAIL=1
    step smoke_help 60 bash -c "$PY train_policy.py sft --help >/dev/null && $PY train_wm.py --help >/dev/null && $PY train_policy.py wmpo --help >/dev/null && echo 'would run sft, train_wm, wmpo with --preset gpu'" || FAIL=1
else
    step tests 120 $PY -m pytest -q tests/test_frame_attention.py tests/test_grpo_kernels.py || FAIL=1
    # the benchmarks write their CSV / markdown into the working directory: run them inside $OUT
    step bench_frame_attention 150 bash -c "cd '$OUT' && PYTHONPATH='$ROOT' '$PY' -m kernels.frame_attention" || FAIL=1
    step bench_grpo 60 bash -c "cd '$OUT' && PYTHONPATH='$ROOT' '$PY' -m kernels.grpo" || FAIL=1
    step smoke_sft 80 $PY train_policy.py sft --preset gpu --run-dir "$RUN" --num-steps 300 || FAIL=1
    # train_wm's own training takes ~80 s there; its fidelity report (imagined replays) the rest
    step smoke_train_wm 200 $PY train_wm.py --preset gpu --run-dir "$RUN" --explore-per-level 20 --codec-steps 200 \
        --wm-steps 300 --wm-finetune-steps 50 --reward-steps 200 --heldout-groups 4 || FAIL=1
    step smoke_wmpo 60 $PY train_policy.py wmpo --preset gpu --run-dir "$RUN" --iterations 2 || FAIL=1
fi
tar czf "$OUT/gpu_check.tgz" -C "$OUT" --exclude=gpu_check.tgz --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='*.npz' . 2>/dev/null
echo "gpu_check: $([ $FAIL = 0 ] && echo all steps ok || echo some steps failed), see $SUMMARY"
exit $FAIL
