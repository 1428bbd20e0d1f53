#!/usr/bin/env bash
# The GPU checks of docs/performance.md, for a machine with one CUDA GPU (about 5 of the 8 minute
# budget on one H200; each part has its own time limit). Usage, from the repository root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # the same code on CPU at toy sizes
#
# Each part prints one JSON line; all of them go to ${OUT:-runs}/gpu_check.jsonl. The exit status
# is the number of failed or timed-out parts. PYTHON overrides the interpreter.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=(--dry-run)
fi
out_dir=${OUT:-runs}
mkdir -p "$out_dir"
results="$out_dir/gpu_check.jsonl"
: > "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [[ ${#DRY[@]} -eq 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"devices {torch.cuda.device_count()}")
PY

failed=0
# part:seconds. mfu compiles flex and the fused element-wise kernels on its first steps.
for spec in flex:90 nccl:60 apex:30 fp16:120 mfu:170; do
    part=${spec%%:*}
    limit=${spec##*:}
    start=$SECONDS
    line=$(timeout "$limit" "$PYTHON" benchmarks/gpu_check.py "$part" "${DRY[@]}" 2>"$out_dir/gpu_check.$part.err")
    status=$?
    if [[ $status -eq 124 ]]; then
        line="{\"part\": \"$part\", \"ok\": false, \"error\": \"timed out after ${limit}s\"}"
    elif [[ -z "$line" ]]; then
        line="{\"part\": \"$part\", \"ok\": false, \"error\": \"exit $status, see gpu_check.$part.err\"}"
    fi
    echo "$line" | tee -a "$results"
    [[ $status -eq 0 ]] || failed=$((failed + 1))
    echo "  ($part: $((SECONDS - start)) s, exit $status)"
done
echo "gpu_check: $failed part(s) failed; results in $results"
exit "$failed"
