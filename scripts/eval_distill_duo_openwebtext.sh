#!/usr/bin/env bash
# Evaluate every DCD round of a distillation run (scripts/distill_duo_openwebtext.sh) and its DUO teacher: the EMA
# student of each round-boundary checkpoint (steps 10k, ..., 50k, the students the `dcd` method lists), sampled in
# float64 at T in {8,16,32,128,1024} with the ancestral and the greedy-tail final step (DUO Table 3): Gen PPL
# (GPT-2 large), unigram entropy. Writes <run>/eval_rounds/dcd_rounds.{csv,md,png}: one table and a
# Gen-PPL-vs-steps plot with one curve per round and tail.
#
#   scripts/eval_distill_duo_openwebtext.sh                                   # runs/dcd_owt_small, s-sahoo/duo
#   RUN_DIR=runs/dcd_owt_small TEACHER=runs/duo_owt_small/export/student scripts/eval_distill_duo_openwebtext.sh
#   NGPUS=1 scripts/eval_distill_duo_openwebtext.sh --rounds 4 5 --num-samples 256
#
# Extra arguments go to `ddistill rounds` (see --help). The GPT-2 large judge comes from the Hugging Face hub (or its
# local cache); JUDGE=smollm2 is the offline judge (numbers not comparable to the paper's).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-runs/dcd_owt_small}
TEACHER=${TEACHER:-s-sahoo/duo}
JUDGE=${JUDGE:-gpt2-large}
PYTHON=${PYTHON:-.venv/bin/python}
NGPUS=${NGPUS:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

teacher_args=()
if [[ -n "$TEACHER" ]]; then
  teacher_args=(--teacher "$TEACHER")
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m ddistill.cli rounds \
  --run-dir "$RUN_DIR" "${teacher_args[@]}" --judge "$JUDGE" --tails ancestral greedy \
  --steps 8 16 32 128 1024 --num-samples 800 --batch-size 32 "$@"
