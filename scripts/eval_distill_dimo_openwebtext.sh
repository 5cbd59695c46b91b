#!/usr/bin/env bash
# Evaluate a DiMO generator (the EMA export of scripts/distill_dimo_openwebtext.sh) against its MDLM teacher:
# Gen PPL (GPT-2 large), unigram entropy, batch diversity (distinct-2/3/4, duplicate fraction) and MAUVE
# (50-token prompts of reference documents, 100-token canvases), at 1, 2, 4, 8, 16 generator steps, a temperature
# sweep at one step, and the teacher at the same step counts (plus 1024). One table and one plot:
# <OUT_DIR>/sample_eval.{csv,md,png}, one curve per label.
#
#   scripts/eval_distill_dimo_openwebtext.sh
#   GENERATOR=outputs/dimo_owt_small/export/generator MAUVE_REF=data/owt_valid.jsonl scripts/eval_distill_dimo_openwebtext.sh
#   JUDGE=smollm2 NUM_SAMPLES=64 scripts/eval_distill_dimo_openwebtext.sh      # offline judge (not the paper's)
set -euo pipefail
cd "$(dirname "$0")/.."

GENERATOR=${GENERATOR:-outputs/dimo_owt_small/export/generator}
TEACHER=${TEACHER:-kuleshov-group/mdlm-owt}
JUDGE=${JUDGE:-gpt2-large}
OUT_DIR=${OUT_DIR:-outputs/dimo_owt_small/eval}
NUM_SAMPLES=${NUM_SAMPLES:-512}
MAUVE_REF=${MAUVE_REF:-}
PYTHON=${PYTHON:-.venv/bin/python}

mauve_args=()
if [[ -n "$MAUVE_REF" ]]; then
  mauve_args=(--mauve-reference "$MAUVE_REF")
fi
common=(--judge "$JUDGE" --num-samples "$NUM_SAMPLES" --batch-size 16 --out-dir "$OUT_DIR" "${mauve_args[@]}" "$@")

"$PYTHON" -m ddistill.cli eval "$GENERATOR" --process dimo --steps 1 2 4 8 16 --label dimo "${common[@]}"
for temperature in 0.5 0.8 1.2 1.5 2.0; do
  "$PYTHON" -m ddistill.cli eval "$GENERATOR" --process dimo --steps 1 --temperature "$temperature" \
    --label "dimo T=$temperature" "${common[@]}"
done
"$PYTHON" -m ddistill.cli eval "$TEACHER" --process absorbing --steps 1 2 4 8 16 1024 --label teacher "${common[@]}"
