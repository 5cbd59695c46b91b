#!/usr/bin/env bash
# SDTT (arXiv 2410.21035) distillation of MDLM-OWT on OpenWebText: 7 rounds x 10k steps, 512 -> 8 student steps.
# The counterpart of the reference repo's script/distill_sdtt_openwebtext.sh.
#
#   scripts/distill_sdtt_openwebtext.sh                                    # small, every GPU of this node
#   scripts/distill_sdtt_openwebtext.sh configs/experiments/sdtt_owt_medium.yaml init_from=ckpts/sdtt_teacher_md
#   NGPUS=1 scripts/distill_sdtt_openwebtext.sh train.micro_batch_size=8   # any dotted override
#
# A killed run restarts from its newest complete checkpoint when launched again with the same train.out_dir.
# Several nodes / SLURM: see ddistill/launchers (same config and overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/experiments/sdtt_owt_small.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
  CONFIG=$1
  shift
fi
PYTHON=${PYTHON:-.venv/bin/python}
NGPUS=${NGPUS:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" -m ddistill.engine "$CONFIG" "$@"
