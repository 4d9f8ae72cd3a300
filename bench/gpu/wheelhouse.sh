#!/usr/bin/env bash
# Wheels for the GPU machines, which reach no package index. Their image already has torch 2.11, torchvision,
# torchaudio, numpy, scipy, pandas, scikit-learn, sentencepiece, matplotlib, tqdm and pyyaml (device KINDS.md);
# what d2v needs beyond that is fetched here, at the versions of requirements.lock, for CPython 3.12 on x86_64.
# PyAV (36 MB, only for the Asterisk G.722 prompts of real_speech) is left out to stay under the 64 MiB carry;
# EXTRA="av" adds it.
#   bash bench/gpu/wheelhouse.sh            # → .whl/ (git-ignored; carry it with the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
NAMES="pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand soundfile
       cffi pycparser espeakng-loader mwparserfromhell ${EXTRA:-}"
pins=()
for name in $NAMES; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" requirements.lock) || { echo "wheelhouse: $name is not in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any -d .whl "${pins[@]}"
ls .whl
