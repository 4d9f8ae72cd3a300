#!/usr/bin/env bash
# Why a base training update leaves the GPU idle (session.sh measured 8 % MFU for ViT-B v1 at 32 images, 18 % for
# v2): bench/update_profile.py on one H100/H200 for image v1 and v2, eager at two batch sizes and compiled. Each
# writes $OUT/update_profile_*.json; the log is $OUT/profile.log.
#   device run: carry .whl; command: bash bench/gpu/profile.sh   (timeout_s 240; about 3 min)
# Knobs (environment): DEADLINE_S (220), PY, OUT (default $OUT or results/bench).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3} DEADLINE_S=${DEADLINE_S:-220} DEST=${OUT:-results/bench}
mkdir -p "$DEST"
exec > >(tee -a "$DEST/profile.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl pydantic webdataset; fi
run() {  # MODALITY OBJECTIVE BATCH [--compile]: one profile, under the time left
  local limit=$((DEADLINE_S - SECONDS)) tag="$1_$2_b$3${4:+_compiled}"
  if (( limit < 15 )); then echo "profile: $tag skipped"; return; fi
  timeout "$limit" $PY bench/update_profile.py --modality "$1" --objective "$2" --batch "$3" ${4:-} \
    --device cuda --precision bf16 --out "$DEST/update_profile_${tag}_gpu.json"
  echo "profile: $tag rc $? at $SECONDS s"
}
run image v1 32
run image v2 32
run image v1 128
run image v1 32 --compile
run image v2 32 --compile
