#!/usr/bin/env bash
# Create .venv with everything ddistill needs on a fresh machine (idempotent; a stamp records success).
#   scripts/setup_env.sh            # CPU machine: installs the CPU build of torch first
#   DDISTILL_TORCH=skip scripts/setup_env.sh   # keep whatever torch the interpreter already has
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DDISTILL_VENV:-$root/.venv}
stamp=$venv/.ddistill-installed
want=$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
python3 -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q --upgrade pip
if [[ ${DDISTILL_TORCH:-} != skip ]]; then
  # A bare `torch` requirement pulls a multi-GB CUDA build; on CPU machines take the CPU one first.
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$py" -m pip install -q "torch==2.13.0" || "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$py" -m pip install -q -e "$root[judge,mauve,test]"
echo "$want" > "$stamp"
