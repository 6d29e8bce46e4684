#!/usr/bin/env bash
# Download, here, every wheel the lent GPU machine lacks, for bench/device.sh to install there (nothing can be
# fetched on that machine). It has torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, tokenizers 0.23.2,
# huggingface_hub 1.33, safetensors 0.8 and DeepSpeed's other dependencies, but no DeepSpeed, pydantic or liger.
#
#   bash bench/device_wheels.sh                          # Python 3.12 (the GPU machine's) into .device-wheels/
#   bash bench/device_wheels.sh --python 3.11 .device-wheels-cp311   # for the CPU rehearsal here
#
# The folder is replaced whole (one version of each wheel); the DeepSpeed wheel built here is reused.
# Carry it to the machine with the working tree (run's carry: [".device-wheels"]); it and the tree must fit 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12
DIR=.device-wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The versions llava_loop is tested with (the dev venv's); transformers and peft replace the machine's older ones.
# typing-extensions: pydantic 2.14 needs >= 4.16, newer than torch's image is likely to hold.
# transformers 5.24 needs huggingface_hub >= 1.31, tokenizers >= 0.23.1, safetensors >= 0.8: the machine's suffice.
PINS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  hjson==3.1.0 liger-kernel==0.8.5 transformers==5.24.0 peft==0.21.2
  # no pytest: the image has its own (with plugins a carried one would shadow); device.sh runs it, autoload off
)
DEEPSPEED=deepspeed-0.19.8-py3-none-any.whl

NEW=$(mktemp -d "${DIR%/}.new.XXXXXX")
trap 'rm -rf "$NEW"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$NEW" "${PINS[@]}"

if [ -f "$DIR/$DEEPSPEED" ]; then
  cp "$DIR/$DEEPSPEED" "$NEW/"
else
  # PyPI has only DeepSpeed's sdist; without its ops (JIT-built where needed) the wheel is pure Python
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$NEW" deepspeed==0.19.8
fi
[ -f "$NEW/$DEEPSPEED" ] || { echo "expected $NEW/$DEEPSPEED after the DeepSpeed build" >&2; exit 1; }

count=$(ls "$NEW"/*.whl | wc -l)
[ "$count" -eq $(( ${#PINS[@]} + 1 )) ] || { echo "expected $(( ${#PINS[@]} + 1 )) wheels, got $count" >&2; exit 1; }
rm -rf "$DIR"
mv "$NEW" "$DIR"
trap - EXIT

ls -l "$DIR"
wheels=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels $(mib "$wheels") + working tree $(mib "$tree") = $(mib $((wheels + tree))) of the 64 MiB carried"
[ $((wheels + tree)) -lt $((64 * 1048576)) ] || { echo "over the 64 MiB that travels to the GPU machine" >&2; exit 1; }
