#!/usr/bin/env bash
# Prepare .whl/, the folder the GPU check carries to the device machine (bench/gpu_check.sh):
# wheels of exactly the packages the check imports that the device image lacks, for its Python
# (CPython 3.12, x86-64 manylinux), at the versions this checkout's .venv holds:
#   pydantic, pydantic-core, annotated-types, typing-inspection (elsa/config.py imports pydantic)
#   typing-extensions: pydantic needs >= 4.16, the image's version is not known, so it travels too
#   bitsandbytes: the 8-bit Adam of ELSA-L (optimizer=adam8bit), only if it fits (see below)
# Run here (it needs PyPI), in the repo root or anywhere: `bash bench/gpu_carry.sh`.
# It prints the sizes and fails when tracked files + untracked-not-ignored files + .whl exceed the
# 64 MiB a device call may carry. .whl/COMMIT records HEAD for the JSON (the device copy has no git).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((4 * 1024 * 1024))  # room left for files the tree gains before the device run
REQUIRED=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)
OPTIONAL=(bitsandbytes)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

version() {  # the version this checkout's venv holds (the one the tests ran with)
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

download() {  # one wheel for the device's Python, no dependencies (each is named here)
  local spec="$1==$(version "$1")"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  compgen -G ".whl/$1-*.whl" >/dev/null || compgen -G ".whl/${1//_/-}-*.whl" >/dev/null \
    || { echo "no wheel of $spec for CPython 3.12 manylinux x86-64" >&2; exit 1; }
}

bytes_of() { find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

tree_bytes() {  # what travels besides .whl: tracked files and untracked files git does not ignore
  local tracked untracked
  tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  untracked=$(git ls-files -o --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  echo "$tracked $untracked"
}

rm -rf .whl && mkdir -p .whl  # one version of each: two would stop the install there
git rev-parse HEAD >.whl/COMMIT
for name in "${REQUIRED[@]}"; do download "$name"; done
read -r tracked untracked < <(tree_bytes)
for name in "${OPTIONAL[@]}"; do
  download "$name"
  if (( tracked + untracked + $(bytes_of .whl) > LIMIT - MARGIN )); then
    echo "$name left out: with it the carried tree would exceed 64 MiB less a 4 MiB margin"
    rm -f .whl/"$name"-*.whl
  fi
done

whl=$(bytes_of .whl)
total=$((tracked + untracked + whl))
ls -l .whl | tail -n +2
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
echo "tracked files: $tracked bytes ($(mib "$tracked")); untracked, not ignored: $untracked bytes ($(mib "$untracked"))"
echo ".whl: $whl bytes ($(mib "$whl")); total that travels: $total bytes ($(mib "$total")) of 64 MiB"
if (( total > LIMIT )); then
  echo "too large for a device call: carry less" >&2
  exit 1
fi
