#!/usr/bin/env bash
# DiMO (arXiv 2503.15457) distillation of MDLM-OWT into a one-step generator on OpenWebText (30k steps),
# named like the seed repository's scripts/distill_sdtt_openwebtext.sh.
#
#   scripts/distill_dimo_openwebtext.sh                                    # small, every GPU of this node
#   scripts/distill_dimo_openwebtext.sh configs/experiments/dimo_owt_small.yaml init_from=ckpts/mdlm-owt
#   NGPUS=1 scripts/distill_dimo_openwebtext.sh train.micro_batch_size=4 method.aux_steps=2   # any override
#
# A killed run restarts from its newest complete checkpoint when launched again with the same train.out_dir.
# The exported generator (EMA) lands in <out_dir>/export/generator; evaluate it with
# scripts/eval_distill_dimo_openwebtext.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/experiments/dimo_owt_small.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
  CONFIG=$1
  shift
fi
PYTHON=${PYTHON:-.venv/bin/python}
NGPUS=${NGPUS:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m ddistill.engine "$CONFIG" "$@"
