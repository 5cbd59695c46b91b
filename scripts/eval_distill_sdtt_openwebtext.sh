#!/usr/bin/env bash
# Evaluate every SDTT round of a distillation run (the reference repo's eval_distill_sdtt_openwebtext.sh):
# the EMA student of each round boundary checkpoint (steps 10k, 20k, ..., 70k) and the initial teacher, sampled
# in float64 at T in {8,16,32,64,128,256,1024}: Gen PPL (GPT-2 large), unigram entropy, MAUVE (50-token prompts of
# the run's validation documents, 100-token canvases). Writes <run>/eval_rounds/sdtt_rounds.{csv,md,png}:
# one table and a Gen-PPL-vs-steps plot with one curve per round.
#
#   scripts/eval_distill_sdtt_openwebtext.sh                                  # outputs/sdtt_owt_small
#   RUN_DIR=outputs/sdtt_owt_medium TEACHER=ckpts/sdtt_teacher_md scripts/eval_distill_sdtt_openwebtext.sh
#   NGPUS=1 MAUVE_DOCS=0 scripts/eval_distill_sdtt_openwebtext.sh --rounds 6 7 --num-samples 256
#
# Extra arguments go to `ddistill rounds` (see --help). The GPT-2 large judge comes from the
# Hugging Face hub (or its local cache); JUDGE=smollm2 is the offline judge (numbers not comparable to the paper's).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-outputs/sdtt_owt_small}
TEACHER=${TEACHER:-kuleshov-group/mdlm-owt}
JUDGE=${JUDGE:-gpt2-large}
MAUVE_DOCS=${MAUVE_DOCS:-1024}
PYTHON=${PYTHON:-.venv/bin/python}
NGPUS=${NGPUS:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

teacher_args=()
if [[ -n "$TEACHER" ]]; then
  teacher_args=(--teacher "$TEACHER")
fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m ddistill.cli rounds \
  --run-dir "$RUN_DIR" "${teacher_args[@]}" --judge "$JUDGE" --mauve-docs "$MAUVE_DOCS" \
  --steps 8 16 32 64 128 256 1024 --num-samples 1024 --batch-size 32 "$@"
