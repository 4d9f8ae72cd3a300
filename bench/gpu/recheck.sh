#!/usr/bin/env bash
# The first call of the next GPU lease: what the stop of 2026-12-04 changed for CUDA without a device to run it on.
# The GPU-only tests (no host sync in a training step, fused AdamW on CUDA) and the compile tests, then
# bench/gpu/profile.sh (ViT-B v1/v2 eager at 32 and 128 images, and compiled, which failed on 2026-12-04 before the
# DropPath fix) to compare with results/bench/update_profile_image_*_gpu.json of that day; before it, the v2
# decoder's layouts (bench/decoder_layouts.py) and the biased attention's kernels (bench/attention_kernels.py).
#   device run: carry .whl; command: bash bench/gpu/recheck.sh   (timeout_s 420; about 6 min)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3} DEST=${OUT:-results/bench}
mkdir -p "$DEST"
if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl pydantic webdataset soundfile; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_device_sync.py tests/test_compile.py -m "not slow" \
  2>&1 | tee "$DEST/recheck_tests.log"
# the v2 decoder's convs per memory layout and with cuDNN's autotuner (seconds; the profile's 25 % of layout transforms)
timeout 60 $PY bench/decoder_layouts.py --preset base --rows 512 --device cuda --precision bf16 \
  --out "$DEST/decoder_layouts_gpu.json" 2>&1 | tee "$DEST/decoder_layouts.log"
# BEiT's biased attention: SDPA (memory-efficient kernel) against a compiled FlexAttention and unbiased flash
timeout 120 $PY bench/attention_kernels.py --batch 32 --device cuda --precision bf16 \
  --out "$DEST/attention_kernels_gpu.json" 2>&1 | tee "$DEST/attention_kernels.log"
DEADLINE_S=${DEADLINE_S:-$((390 - SECONDS))} OUT=$DEST bash bench/gpu/profile.sh
