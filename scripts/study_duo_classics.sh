#!/usr/bin/env bash
# The classics evidence of the DUO issue, end to end on one GPU (or CPU with the cpu profiles):
#  1. `ddistill demo method=duo`: a DUO teacher trained with the Gaussian curriculum for half its steps, then DCD
#     round by round, every model sampled at several T with ancestral and greedy-tail final steps;
#  2. the same teacher recipe without the curriculum (method usdm: the plain discrete ELBO from step 0);
#  3. the validation ELBO (NELBO per token, one t per sequence, log-linear α_t) of both teachers on the held-out
#     classics blocks: the curriculum ablation of the paper.
# Gen-PPL is scored afterwards where the judge is (the demo's stage=score), e.g. on a CPU box:
#   ddistill demo method=duo stage=score out_dir=$OUT/demo_duo
#
#   OUT=runs/duo_study scripts/study_duo_classics.sh                   # profile gpu (judge none)
#   OUT=runs/duo_study PROFILE=cpu scripts/study_duo_classics.sh train.max_steps=100 method.curriculum_end=50
# Extra arguments are dotted overrides of both teachers (e.g. a shorter budget); DEMO_ARGS more demo arguments;
# VAL_BATCHES=n evaluates the first n batches of 64 validation blocks only (default: all); PARALLEL=1 trains the
# no-curriculum teacher beside the demo instead of after it.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/duo_study}
PROFILE=${PROFILE:-gpu}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
overrides=("$@")
teacher_overrides=$("$PYTHON" - "$PROFILE" "${overrides[@]}" <<'PY'
import json, sys
from ddistill.config import load_yaml
profile = load_yaml(f"configs/demo/duo_{sys.argv[1]}.yaml")
print(json.dumps(profile["teacher"]["overrides"] + sys.argv[2:]))
PY
)
# The same teacher run without the curriculum (curriculum_end is not a usdm field: drop it), beside the demo
# (PARALLEL=1, for a GPU with room for both) or after it.
mapfile -t usdm_overrides < <("$PYTHON" -c 'import json,sys; [print(o) for o in json.loads(sys.argv[1]) if not o.startswith("method.curriculum")]' "$teacher_overrides")
usdm_teacher() {
  "$PYTHON" -m ddistill.engine configs/experiments/classics_usdm_tiny.yaml "${usdm_overrides[@]}" \
    train.out_dir="$OUT/usdm_teacher" | grep -v '^SUMMARY' || true
}
if [ "${PARALLEL:-0}" = 1 ]; then usdm_teacher > "$OUT/usdm_teacher.log" 2>&1 & usdm_pid=$!; fi
"$PYTHON" -m ddistill.cli demo method=duo profile="$PROFILE" judge=none out_dir="$OUT/demo_duo" \
  "teacher.overrides=$teacher_overrides" ${DEMO_ARGS:-}
if [ "${PARALLEL:-0}" = 1 ]; then wait "$usdm_pid"; else usdm_teacher; fi
"$PYTHON" - "$OUT" "${VAL_BATCHES:-0}" <<'PY'
import json, sys
import torch
from pathlib import Path
from ddistill.data.corpora import DataConfig
from ddistill.data.packing import build_token_blocks
from ddistill.diffusion import LogLinearSchedule
from ddistill.eval.metrics import val_nll_bound
from ddistill.models.checkpoints import checkpoint_tokenizer, load_pretrained

out, max_batches = Path(sys.argv[1]), int(sys.argv[2]) or None  # VAL_BATCHES=0: the whole validation split
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
results = {}
for label, path in (("duo (curriculum)", out / "demo_duo/teacher/export/student"),
                    ("usdm (no curriculum)", out / "usdm_teacher/export/student")):
    model, cfg = load_pretrained(path, overrides={"dropout": 0.0})
    model = model.to(device)
    data_cfg = DataConfig(dataset="classics", block_size=cfg.length, tokenizer=checkpoint_tokenizer(path))
    blocks = build_token_blocks(data_cfg, "validation")
    data = torch.as_tensor(blocks[: (len(blocks) // 64) * 64], dtype=torch.long)
    batches = [data[i : i + 64] for i in range(0, len(data), 64)]
    nll = val_nll_bound(model, batches, process="uniform", schedule=LogLinearSchedule(), vocab_size=cfg.vocab_size,
                        seed=0, device=device, max_batches=max_batches)
    results[label] = {"val_nelbo_per_token": nll.nll, "val_ppl_bound": nll.ppl, "tokens": nll.num_tokens}
    print(f"{label}: validation NELBO {nll.nll:.4f} nats/token (PPL <= {nll.ppl:.1f}) on {nll.num_tokens} tokens")
results["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
(out / "val_elbo.json").write_text(json.dumps(results, indent=1))
PY
