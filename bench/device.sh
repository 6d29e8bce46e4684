#!/usr/bin/env bash
# The GPU bench on the lent machine: install the carried wheels (bench/device_wheels.sh, made here) into a folder on
# PYTHONPATH, check the imports, show the machine, run bench/gpu.py's plan within a time budget, then
# tests/test_gpu.py if the time left holds them.
#
#   bash bench/device.sh OUTDIR                        # the first call: the whole plan in 7 minutes
#   bash bench/device.sh --rows "anyres" --tests OUTDIR   # a rerun: named rows (and the GPU tests) in 3.5 minutes
#   bash bench/device.sh --tests-only OUTDIR            # the GPU tests alone
#   bash bench/device.sh --dry-run                      # here: the plan, predicted GiB and minutes on H100 and H200
#   bash bench/device.sh --smoke OUTDIR                 # the CPU rehearsal: tiny twins through the same path
#   options: --wheels DIR (default .device-wheels), --budget-minutes M, --no-tests
#
# OUTDIR gets device.log (everything printed), plan.md (the predictions for the card found), rows.jsonl (one row per
# planned launch as it ends: measured, refused by the memory model, skipped for time, or failed with its stderr
# tail) and table.md. The budget covers the whole script: bench/gpu.py starts no row whose predicted time does not
# fit what is left, stops one that outruns it keeping its steps, and the tests run only if TESTS_S seconds remain
# (or --tests / --tests-only asks for them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SMOKE=()
ROWS=()
WHEELS=.device-wheels
BUDGET=
TESTS=auto
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=(--smoke); shift ;;
    --rows) read -r -a ROWS <<< "$2"; shift 2 ;;
    --tests) TESTS=yes; shift ;;
    --no-tests) TESTS=no; shift ;;
    --tests-only) TESTS=only; shift ;;
    --dry-run) exec python3 bench/gpu.py --dry-run ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --budget-minutes) BUDGET=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash bench/device.sh [--smoke] [--rows \"A B\"] OUTDIR (see --help)" >&2; exit 2; }
# the first call gets 7 minutes, a rerun 3.5: with a minute or two to start the machine, both fit its 15
[ -n "$BUDGET" ] || BUDGET=$([ ${#ROWS[@]} -gt 0 ] || [ "$TESTS" = only ] && echo 3.5 || echo 7)
TESTS_S=120
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/device.log") 2>&1
echo "== bench/device.sh ${SMOKE[*]} rows: ${ROWS[*]:-the plan} tests: $TESTS, budget $BUDGET min, $OUT, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"

TAG=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
ls "$WHEELS"/*.whl > /dev/null 2>&1 || {
  echo "no wheels in $WHEELS: run bash bench/device_wheels.sh here first and carry $WHEELS" >&2; exit 1; }
for wheel in "$WHEELS"/*-cp3*.whl; do
  [ -e "$wheel" ] || continue
  case "$wheel" in *"-$TAG-"*) ;; *)
    echo "$wheel is not for this Python ($TAG): bash bench/device_wheels.sh --python $(python3 -c 'import sys; print(sys.version.split()[0].rsplit(".", 1)[0])') $WHEELS" >&2
    exit 1 ;;
  esac
done

SITE=$(mktemp -d "${TMPDIR:-/tmp}/llava-device-site.XXXXXX")
if python3 -m pip --version > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
else  # a first run must not end here: these wheels unpack to the tree pip would install (scripts aside)
  echo "no pip for $(command -v python3): unpacking the wheels into $SITE instead"
  python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset PYTHONDONTWRITEBYTECODE  # wheels went in uncompiled: let the first import cache bytecode for every launch
# nothing can be fetched there: fail at once on a hub lookup instead of waiting for its timeouts
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1
echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE ($(( $(date +%s) - START )) s)"

SMOKE_FLAG=${SMOKE[*]:-} python3 - <<'EOF'
import importlib.metadata as md
import os
import sys

import torch

site = os.environ["PYTHONPATH"].split(os.pathsep)[0]
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}, bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
carried = {"transformers": "5.24.0", "peft": "0.21.2", "deepspeed": "0.19.8", "pydantic": "2.14.4"}
import accelerate, deepspeed, liger_kernel, peft, pydantic, transformers  # noqa: E401,F401
import llava_loop
from deepspeed.accelerator import get_accelerator

for name in ("transformers", "accelerate", "peft", "deepspeed", "pydantic", "liger_kernel"):
    module = sys.modules[name]
    print(f"{name} {md.version(name.replace('_', '-'))} from {os.path.dirname(module.__file__)}")
print(f"deepspeed accelerator: {get_accelerator()._name}; llava_loop from {os.path.dirname(llava_loop.__file__)}")
wrong = [f"{n} {md.version(n)} (expected the carried {v})" for n, v in carried.items() if md.version(n) != v]
wrong += [f"{n} imported from {sys.modules[n].__file__}, not {site}" for n in carried
          if not sys.modules[n].__file__.startswith(site)]
if not os.environ["SMOKE_FLAG"]:
    import liger_kernel.transformers  # noqa: F401 - the model patches, which load Triton kernels

    wrong += [] if torch.cuda.is_available() else ["no CUDA device visible to torch"]
    wrong += [] if get_accelerator()._name == "cuda" else ["DeepSpeed did not pick its CUDA accelerator"]
if wrong:
    sys.exit("import check failed: " + "; ".join(wrong))
print("import check: ok")
EOF

nvidia-smi -L || echo "(no nvidia-smi)"
df -h /dev/shm
# DataLoader workers hand batches over through /dev/shm (a 32-sample batch at 336 px is 43 MiB, 8 workers x 2 ahead)
SHM_MIB=$(df -Pm /dev/shm | awk 'NR == 2 {print $4}')
WORKERS=()
if [ -z "${SMOKE[*]:-}" ] && [ "${SHM_MIB:-0}" -lt 2048 ]; then
  WORKERS=(--workers $(( SHM_MIB >= 512 ? 2 : 0 )))
  echo "/dev/shm has ${SHM_MIB} MiB free: bench/gpu.py ${WORKERS[*]} (8 workers need about 1.4 GiB there)"
fi

left() { awk -v b="$BUDGET" -v used=$(( $(date +%s) - START )) 'BEGIN {printf "%.2f", b - used / 60}'; }
rc=0
set +e
if [ "$TESTS" != only ]; then
  LEFT=$(left)
  echo "== bench/gpu.py with $LEFT of $BUDGET minutes left"
  # gpu.py keeps to its budget; the timeout (a minute later) only catches a hang outside a launch
  timeout --signal=TERM --kill-after=30 "$(awk -v m="$LEFT" 'BEGIN {printf "%d", m * 60 + 60}')" \
    python3 bench/gpu.py "${SMOKE[@]}" "${WORKERS[@]}" ${ROWS[@]:+--rows "${ROWS[@]}"} \
    --budget-minutes "$LEFT" --out "$OUT"
  rc=$?
fi
LEFT_S=$(awk -v m="$(left)" 'BEGIN {printf "%d", m * 60}')
if [ "$TESTS" = no ] || { [ "$TESTS" = auto ] && [ ${#ROWS[@]} -gt 0 ]; }; then
  echo "== tests/test_gpu.py not run (--no-tests, or --rows without --tests)"
elif [ "$TESTS" = auto ] && [ "$LEFT_S" -lt "$TESTS_S" ]; then
  echo "== tests/test_gpu.py not run: ${LEFT_S} s left of the budget, they take about ${TESTS_S} s;" \
    "run them with: bash bench/device.sh --tests-only OUTDIR"
elif ! python3 -m pytest --version > /dev/null 2>&1; then
  echo "== tests/test_gpu.py not run: no pytest for $(command -v python3) (the image's own is used, not carried)"
else
  # the image's pytest, without the plugins it would autoload (none of them is ours)
  echo "== tests/test_gpu.py (each training run in its own process; they skip without CUDA)"
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout --signal=TERM --kill-after=10 "$(( LEFT_S > TESTS_S ? LEFT_S : TESTS_S ))" \
    python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tail -25
  test_rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] || rc=$test_rc
fi
set -e
echo "== exit $rc; $(( $(date +%s) - START )) s in all; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $rc
