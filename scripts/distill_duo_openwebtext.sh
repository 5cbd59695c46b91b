#!/usr/bin/env bash
# DCD (Discrete Consistency Distillation, arXiv 2506.10892 §4.2) of a DUO teacher on OpenWebText: 5 rounds x 10k
# steps, δ = 2^r/512, batch 128 x 1024 (configs/experiments/dcd_owt_small.yaml). The counterpart of the reference
# repo's scripts/distil_owt.sh. The teacher is the public DUO base model (s-sahoo/duo, downloaded on first use) or
# our own DUO run:
#
#   scripts/distill_duo_openwebtext.sh                                               # from s-sahoo/duo
#   huggingface-cli download s-sahoo/duo --local-dir ckpts/duo && scripts/distill_duo_openwebtext.sh init_from=ckpts/duo
#   scripts/distill_duo_openwebtext.sh init_from=runs/duo_owt_small/export/student    # our DUO (duo_owt_small.yaml)
#   NGPUS=1 scripts/distill_duo_openwebtext.sh train.micro_batch_size=8              # any dotted override
#
# Our DUO teacher itself: torchrun --standalone --nproc_per_node 8 -m ddistill.engine configs/experiments/duo_owt_small.yaml
# A killed run restarts from its newest complete checkpoint when launched again with the same train.out_dir.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/experiments/dcd_owt_small.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
  CONFIG=$1
  shift
fi
PYTHON=${PYTHON:-.venv/bin/python}
NGPUS=${NGPUS:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m ddistill.engine "$CONFIG" "$@"
