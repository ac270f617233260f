#!/usr/bin/env bash
# The one command of the GPU check (bench/gpu_check.py; issue 29, item 1), run on the lent device
# machine in the repository root: `bash bench/gpu_check.sh [gpu_check.py options]`.
# Why a wrapper: the device image lacks pydantic (elsa/config.py imports it) and bitsandbytes (the
# 8-bit Adam of ELSA-L), and it has no package registry. bench/gpu_carry.sh puts their wheels in
# .whl/ here, the run call carries that folder, and this script installs them into /tmp/site,
# skipped where they import already (a CPU checkout's venv, the test). Python: $PYTHON or python3.
# The JSON is also copied to $OUT (the device tool's return folder) when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if ! "$PY" -c "import pydantic, bitsandbytes" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "[gpu_check] pydantic or bitsandbytes missing and no .whl/ here: run bench/gpu_carry.sh, carry .whl" >&2
  fi
fi

out=bench/results/gpu_check.json
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do  # where the JSON goes, to copy it back
  case "${args[i]}" in
    --out) out=${args[i + 1]:-$out} ;;
    --out=*) out=${args[i]#--out=} ;;
  esac
done

status=0
timeout 470 "$PY" bench/gpu_check.py "$@" || status=$?
if [[ -n "${OUT:-}" && -d "${OUT:-}" && -f "$out" ]]; then
  cp "$out" "$OUT/gpu_check.json"
fi
[[ -f "$out" ]] && "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); [r['results'][k].pop('traceback', None) for k in r['results']]; print(json.dumps(r, separators=(',', ':'), default=str))" "$out"
exit "$status"
