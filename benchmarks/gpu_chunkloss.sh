#!/usr/bin/env bash
# GPU figures of branch `chunkloss` (issue 11, the fused-loss rows): one H200, at most ~150 s, most important first.
#
#   OUT=/some/dir bash benchmarks/gpu_chunkloss.sh
#
# Writes every log and the result tables under "$OUT/chunkloss/": the three table rows (MDLM, distillation KL,
# uniform ELBO at N = 16384, d = 768: torch eager, the Triton kernels, the chunked path at its default and at 1024 /
# 2048 / 4096 rows a chunk, then torch.compile), a per-kernel GPU profile of the chunked path, one `bench_engine.py`
# MDLM `small` row with the chunked loss, and the bf16 GPU test of the chunked losses, as far as the time goes.
set -u
cd "$(dirname "$0")/.."
R="${OUT:?set OUT}/chunkloss"
mkdir -p "$R"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DDISTILL_GIT_REV="${DDISTILL_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo chunkloss)}"
START=$SECONDS

step() {  # step NAME LIMIT_S CMD...: run under timeout, log to $R/NAME.log, print rc and the log's tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s, started at +$((SECONDS - START)) s): $*"
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  echo "== $name rc=$? after +$((SECONDS - START)) s"
  tail -n 30 "$R/$name.log"
}

step env 20 "$PY" -c '
import torch, triton
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
a = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16); b = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16)
ref = a.double() @ b.double()
z = torch.mm(a, b, out_dtype=torch.float32); print("mm out_dtype:", z.dtype, float((z.double() - ref).abs().max()))
acc = torch.zeros(256, 512, device="cuda")
torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc); print("addmm out_dtype:", float((acc.double() - ref).abs().max()))
'
# the new path and its baseline first (no autotuning in them), the Triton kernels (autotuned: slower to start) next
step kernels_chunked 55 "$PY" benchmarks/bench_kernels.py --quick --chunk-rows 1024,2048,4096 \
  --methods eager,chunked,chunked-1024,chunked-2048,chunked-4096
step profile 20 "$PY" benchmarks/profile_kernels.py --loss all --method chunked --steps 3 --rows 12
step kernels_triton 45 "$PY" benchmarks/bench_kernels.py --quick --methods triton
left=$((150 - (SECONDS - START)))
if [ "$left" -gt 25 ]; then
  step compile "$((left < 40 ? left : 40))" "$PY" benchmarks/bench_kernels.py --quick --methods compile
fi
left=$((150 - (SECONDS - START)))
if [ "$left" -gt 30 ]; then
  step engine "$left" "$PY" benchmarks/bench_engine.py --rows mdlm_small --variants chunked --steps 20
fi
left=$((150 - (SECONDS - START)))
if [ "$left" -gt 20 ]; then  # the row kernels' block width / warps (console only: not saved over the default's rows)
  step rowblock "$left" bash -c 'for spec in 1024,4 4096,16; do echo "DDISTILL_ROW_BLOCK=$spec"
    DDISTILL_ROW_BLOCK=$spec '"$PY"' benchmarks/bench_kernels.py --quick --methods chunked --no-error --no-save; done'
fi
left=$((150 - (SECONDS - START)))
if [ "$left" -gt 10 ]; then  # the bf16 accuracy is also in the kernels table's error columns
  step gpu_test "$left" "$PY" -m pytest -q -p no:cacheprovider -k chunked tests/test_kernels_gpu.py \
    tests/test_kernels_chunked.py::test_gpu_bf16_production_vocab_as_accurate_as_the_triton_path
fi
cp benchmarks/results/kernels.csv benchmarks/results/kernels.md "$R"/ 2>/dev/null
cp benchmarks/results/engine.csv benchmarks/results/engine.md "$R"/ 2>/dev/null
echo "== done after $((SECONDS - START)) s"
