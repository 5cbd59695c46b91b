#!/usr/bin/env bash
# CPU exploration for the CPU demo profile (issue 13, "The demo must show its claim"), run on the GPU machine's CPU
# cores: up to six `ddistill demo` pipelines in parallel, each pinned to 2 cores of 4-15 (`taskset`, 2 threads, no
# GPU: CUDA_VISIBLE_DEVICES is empty, so training and sampling both run on the CPU), judge=none. Each run's
# models, samples and logs come back as one archive, $OUT/democlaim/<name>.tar.gz, scored on the CPU of the dev
# machine afterwards with `ddistill demo stage=score` (the judge is not on the GPU machine). Whole script <= 420 s.
#
#   OUT=/tmp/out bash benchmarks/gpu_democlaim.sh
#
# Every variant: a 128-wide 2-block DiT (model.size=test with hidden_size/n_blocks/n_heads), dropout 0, a classics
# BPE of V ids, blocks of L tokens; MDLM teacher (AdamW, cosine to 3e-4), then SDTT in rounds; 256 samples a cell.
# On the dev CPU, 16-token blocks left the unigram plateau in 200 steps (64-token ones not in 1000) and SDTT at lr
# 3e-4 x 150 steps a round did not lower its KL: the variants vary the SDTT lr, round length and count.
set -u
OUT_D="${OUT:?set OUT}/democlaim"
mkdir -p "$OUT_D"
RUNS=/tmp/democlaim_runs
rm -rf "$RUNS" && mkdir -p "$RUNS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"
LOG="$OUT_D/console.log"
{
  date -u; nproc; lscpu | grep -E "Model name|^CPU\(s\)|MHz" ; git rev-parse HEAD 2>/dev/null || echo "${DDISTILL_GIT_REV:-unknown rev}"
  $PY -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
} >"$LOG" 2>&1

# The token blocks of every (V, L) used below (the tokenizers are trained on first use: seconds).
for VL in "512 32" "512 16"; do
  set -- $VL
  timeout 60 $PY -m ddistill.cli prepare dataset=classics block_size=$2 tokenizer=classics-bpe-$1 >>"$LOG" 2>&1
done

# variant NAME CORES V L BATCH TEACHER_STEPS TEACHER_LR SDTT_ROUNDS SDTT_STEPS_PER_ROUND INITIAL_TEACHER_STEPS SDTT_LR STEPS_SHOWN
variant() {
  local name=$1 cores=$2 V=$3 L=$4 B=$5 TS=$6 TLR=$7 R=$8 SPR=$9 N0=${10} SLR=${11} SHOWN=${12}
  local model="\"model.size=test\",\"model.hidden_size=128\",\"model.n_blocks=2\",\"model.n_heads=4\",\"model.dropout=0.0\",\"model.length=$L\",\"model.vocab_size=$V\",\"data.tokenizer=classics-bpe-$V\",\"data.block_size=$L\",\"train.device=cpu\",\"train.global_batch_size=$B\",\"train.micro_batch_size=$B\",\"logging.wandb=disabled\",\"logging.progress_bar=false\""
  local teacher="[$model,\"train.max_steps=$TS\",\"train.ckpt_every=$TS\",\"train.eval_every=0\",\"train.log_every=100\",\"optim.lr=$TLR\",\"optim.warmup_steps=50\",\"optim.min_lr=3.0e-4\",\"train.ema_decay=0.99\"]"
  local sdtt="[$model,\"train.log_every=25\",\"method.initial_teacher_steps=$N0\",\"optim.lr=$SLR\",\"optim.warmup_steps=10\",\"train.ema_decay=0.9\"]"
  local start=$SECONDS
  timeout 400 taskset -c "$cores" $TIME $PY -m ddistill.cli demo profile=cpu out_dir="$RUNS/$name" judge=none \
    "steps=$SHOWN" num_samples=256 batch_size=128 "teacher.overrides=$teacher" "distill.sdtt.overrides=$sdtt" \
    distill.sdtt.num_rounds=$R distill.sdtt.steps_per_round=$SPR >"$RUNS/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (cores $cores)" >>"$RUNS/$name.log"
  cp "$RUNS/$name.log" "$RUNS/$name/" 2>/dev/null
  tar -C "$RUNS" --exclude=checkpoints --exclude="$name/sdtt/export" --exclude="*.tmp" -czf "$OUT_D/$name.tar.gz" "$name" "$name.log"
}

variant L16_s1e3      4,5    512 16 128 2500 3.0e-3 2 150  8 1.0e-3 "[2,4,8,16]" &
variant L16_s3e3      6,7    512 16 128 2500 3.0e-3 2 150  8 3.0e-3 "[2,4,8,16]" &
variant L16_s1e3_300  8,9    512 16 128 2500 3.0e-3 2 300  8 1.0e-3 "[2,4,8,16]" &
variant L16_r3        10,11  512 16 128 2500 3.0e-3 3 150 16 1.0e-3 "[2,4,8,16]" &
variant L32_s1e3      12,13  512 32  64 2500 3.0e-3 2 150 16 1.0e-3 "[4,8,16,32]" &
variant L16_s1e3_again 14,15 512 16 128 2500 3.0e-3 2 150  8 1.0e-3 "[2,4,8,16]" &  # same as L16_s1e3: reproducible?
wait
# Same config, same seed, other cores: are the samples (hence the table) the same bit for bit?
$PY - "$RUNS/L16_s1e3" "$RUNS/L16_s1e3_again" >>"$LOG" 2>&1 <<'PYEOF'
import sys, pathlib, torch
a, b = map(pathlib.Path, sys.argv[1:3])
files = sorted(p.relative_to(a) for p in a.glob("samples/*/steps_*.pt"))
same = [torch.equal(torch.load(a / f)["tokens"], torch.load(b / f)["tokens"]) for f in files if (b / f).is_file()]
print(f"repeat: {sum(same)} of {len(files)} sample sets identical ({len(same)} present in both)")
PYEOF
for f in "$RUNS"/*.log; do echo "== $f"; grep -E "^\[demo\]|exit |Elapsed|User time|System time" "$f"; done >>"$LOG"
cat "$LOG"
