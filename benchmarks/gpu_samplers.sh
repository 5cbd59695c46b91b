#!/usr/bin/env bash
# Issue 11, sampler rows, on one H200 in at most ~150 s (each command under its own timeout, most important first).
# Run from the repository root with PYTHONPATH pointing at it; results and logs go to "$OUT/samplers/".
#   1. the GPU tests of the fused draw kernels against the float64 torch path at V = 50258, and of the samplers
#   2. bench_dit sampler rows, eager: fused and torch draw paths, MDLM (cached) and DUO (greedy tail), 8/32/256 steps
#   3. the same with compiled DiT blocks (fused draws)
#   4. one sampler step taken apart (bench_sampler_draw.py): the draw kernels vs torch, the denoiser call
set -u
OUT_DIR="${OUT:?set OUT}/samplers"
mkdir -p "$OUT_DIR"
export DDISTILL_GIT_REV="${DDISTILL_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/gpu.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT_DIR/gpu.txt" 2>&1
STEPS=(--size small --batch 16 --length 1024 --no-train --samplers mdlm duo --sampler-steps 8 32 256)

timeout 35 "$PY" -m pytest -q -x tests/test_samplers_gpu.py \
    "tests/test_perf_gpu.py::test_mdlm_sampler_on_gpu_equals_plain_transcription" > "$OUT_DIR/tests_gpu.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT_DIR/status.txt"

timeout 45 "$PY" benchmarks/bench_dit.py "${STEPS[@]}" --draws fused torch > "$OUT_DIR/bench_dit_eager.log" 2>&1
echo "bench_dit eager rc=$?" | tee -a "$OUT_DIR/status.txt"

timeout 50 "$PY" benchmarks/bench_dit.py "${STEPS[@]}" --draws fused --compile on > "$OUT_DIR/bench_dit_compiled.log" 2>&1
echo "bench_dit compiled rc=$?" | tee -a "$OUT_DIR/status.txt"

timeout 18 "$PY" benchmarks/bench_sampler_draw.py --iters 5 > "$OUT_DIR/bench_sampler_draw.log" 2>&1
echo "bench_sampler_draw rc=$?" | tee -a "$OUT_DIR/status.txt"

cp benchmarks/results/dit.csv benchmarks/results/sampler_draw.csv "$OUT_DIR/" 2>/dev/null
tail -n 3 "$OUT_DIR"/*.log
