#!/usr/bin/env bash
# Issue 21's GPU check in one script, for a GPU machine with no network: installs the carried wheels, runs the
# CUDA tests, then the benchmark, and writes everything under $OUT (default ./gpu-out).
#
#   benchmarks/gpu_check.sh [WHEELS_DIR] [tests|bench|all]      # default: .gpu-wheels all
#
# WHEELS_DIR holds pure-Python wheels the machine lacks (fla-core, einops; pytest and its dependencies; made with
# `pip download --no-deps ... -d .gpu-wheels`, ~3 MB). Triton, torch and transformers are the machine's own
# (triton's wheel, ~290 MB, is over what a call carries). The package runs from src/ (PYTHONPATH), not installed.
# Each stage has its own time limit, so a slow stage still leaves the others' output; files written:
# env.txt, install.txt, tests.txt (pytest -rs: skips named), overhead.txt and overhead.json (the benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.gpu-wheels}
STAGES=${2:-all}
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
TEST_LIMIT=${TEST_LIMIT:-180}    # seconds; both stages and the install fit one 600 s device call
BENCH_LIMIT=${BENCH_LIMIT:-360}  # seconds
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TOKENIZERS_PARALLELISM=false

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1

{
    # only what is missing: never replace the machine's torch, triton or transformers
    for pkg in pytest:pytest einops:einops fla:fla-core parameterized:parameterized; do
        module=${pkg%%:*} dist=${pkg##*:}
        if ! "$PY" -c "import $module" 2>/dev/null; then
            "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps "$dist" || echo "could not install $dist"
            [ "$dist" = pytest ] && "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps pluggy iniconfig pygments packaging 2>&1 | tail -1
        fi
    done
    "$PY" -c "import fla, importlib; print('fla-core', fla.__version__); importlib.import_module('fla.ops.attnres')" 2>&1
    "$PY" -c "from hf_attnres.modeling.modeling_attnres import ALL_DEPTH_ATTENTION_FUNCTIONS as f; print('implementations', sorted(f))"
} > "$OUT/install.txt" 2>&1

if [ "$STAGES" = all ] || [ "$STAGES" = tests ]; then
    # CUDA tests: every implementation ("auto", "eager", "fla", "two_phase") against the transcription in fp32 and
    # bf16, the converted model's identity, cached generation; the bf16 whole-model training test's CUDA cases
    timeout "$TEST_LIMIT" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_fla.py \
        "tests/test_equations.py::test_bf16_training_gradients_within_transcription_floor" -k "cuda or fla or flash" \
        > "$OUT/tests.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/tests.txt"
    tail -3 "$OUT/tests.txt"
fi

if [ "$STAGES" = all ] || [ "$STAGES" = bench ]; then
    # the suite of benchmarks/overhead.py on CUDA (GPU_SUITE); fewer repeats than on CPU: a GPU is steadier
    timeout "$BENCH_LIMIT" "$PY" benchmarks/overhead.py --device cuda --dtype bfloat16 --repeats 5 --short-repeats 6 \
        --new-tokens 64 --json "$OUT/overhead.json" > "$OUT/overhead.txt" 2>&1
    echo "overhead.py exit $?" >> "$OUT/overhead.txt"
    grep -E "^===|^  (block|full) |MISSED|FAILED" "$OUT/overhead.txt"
fi
