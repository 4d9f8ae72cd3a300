#!/usr/bin/env bash
# The memory pre-flight of the GPU profiles on one H100/H200 through the device tool: every pretraining and
# fine-tuning stage of paper, paper-v2, paper-v2-large, paper-large, paper-v2-huge and paper-audioset takes one
# step at its configured per-GPU micro-batch and longest inputs, in bf16 (the profiles' `auto` precision on CUDA),
# and reports its peak memory. A stage that does not fit one GPU fails here, by name, instead of hours into a
# cluster run.
#   here:       bash bench/gpu/wheelhouse.sh
#   device run: carry .whl; command: bash bench/gpu/rehearse.sh   (about 2-4 min a profile on an H200)
# Knobs (environment): PROFILES (default: the six GPU profiles), OUT (default $OUT or results/bench).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-results/bench}
$PY -m pip install -q --no-index --find-links .whl pydantic webdataset soundfile || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
status=0
for profile in ${PROFILES:-paper paper-v2 paper-v2-large paper-large paper-v2-huge paper-audioset}; do
  $PY -m d2v.cli rehearse --profile "$profile" --device cuda --batch config \
    --out "$OUT/rehearsal_${profile}_gpu.json" || status=1  # the next profile still runs
done
exit $status
