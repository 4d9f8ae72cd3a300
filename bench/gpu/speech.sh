#!/usr/bin/env bash
# Speech pretrained vs scratch at GPU scale, on one H100/H200 through the device tool (issue 4). It synthesises a
# larger mini-LibriSpeech (N_PRETRAIN unlabeled utterances, about 4.4 s each: 12000 ≈ 15 h), shards it, pretrains
# the embedded speech encoder with bf16 and fine-tunes speech_1h from it and from scratch.
#   here:       bash bench/gpu/wheelhouse.sh && d2v prepare mini_librispeech && d2v tokenizer ...  (data/cache,
#               data/tokenizer/letters.json exist after `make run`)
#   device run: carry .whl data/cache data/tokenizer; command: bash bench/gpu/speech.sh
# Knobs (environment): N_PRETRAIN PT_STEPS PT_BATCH FT_STEPS SEEDS WORKERS TAG PRESET (embedded: the papers'
# waveform CNN; embedded-fbank: the log-mel front end) OBJECTIVE (v1, or v2: with PRESET=embedded-fbank the recipe
# that won on CPU: frozen local encoder, τ 0.999 → 0.9999, warm-up a tenth of the steps).
# Results: $OUT (or results/bench)/pretrain_vs_scratch_speech_{v1,v2}_gpu.json and the pretraining's metrics CSV.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
N_PRETRAIN=${N_PRETRAIN:-12000} PT_STEPS=${PT_STEPS:-3000} PT_BATCH=${PT_BATCH:-32} FT_STEPS=${FT_STEPS:-3000}
SEEDS=${SEEDS:-1} WORKERS=${WORKERS:-12} TAG=${TAG:-gpu} PRESET=${PRESET:-embedded} ROOT=${ROOT:-data_gpu} OUT=${OUT:-results/bench}
OBJECTIVE=${OBJECTIVE:-v1}
case "$OBJECTIVE" in
  v1) PT_DIR=speech; V2_SETS=() ;;
  v2) PT_DIR=speech-v2
      V2_SETS=(--set speech.freeze_local_encoder=true --set speech.ema.tau_start=0.999
               --set speech.optim.warmup_steps=$((PT_STEPS / 10))) ;;
  *) echo "OBJECTIVE must be v1 or v2, got $OBJECTIVE" >&2; exit 2 ;;
esac
$PY -m pip install -q --no-index --find-links .whl pydantic webdataset soundfile espeakng-loader mwparserfromhell
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
d2v() { $PY -m d2v.cli "$@"; }

d2v prepare mini_librispeech --root "$ROOT" --cache data/cache --set "cfg={pretrain: $N_PRETRAIN, workers: $WORKERS}"
for split in pretrain train_1h dev_clean dev_other test_clean test_other; do
  d2v shard mini_librispeech --split "$split" --root "$ROOT"
done
mkdir -p "$ROOT/tokenizer" && cp data/tokenizer/letters.json "$ROOT/tokenizer/"

$PY bench/pretrain_vs_scratch.py --modalities speech --tasks speech_1h --seeds "$SEEDS" --tag "$TAG" \
  --objective speech="$OBJECTIVE" "${V2_SETS[@]}" \
  --pretrain-steps speech="$PT_STEPS" --finetune-steps speech_1h="$FT_STEPS" \
  --set speech.data.shards="$ROOT/shards/mini_librispeech/pretrain" --set speech.data.batch_size="$PT_BATCH" \
  --set speech.data.num_workers=8 --set speech.preset="$PRESET" --ft-set speech_1h.preset="$PRESET" \
  --ft-set speech_1h.data_root="$ROOT" --ft-set speech_1h.letters="$ROOT/tokenizer/letters.json" \
  --ft-set speech_1h.num_workers=4 --ft-set speech_1h.eval_every=500 \
  --out "$OUT/pretrain_vs_scratch_speech_${OBJECTIVE}_gpu.json"
cp runs/bench-"$TAG"/pretrain/"$PT_DIR"/metrics.csv "$OUT/pretrain_speech_${OBJECTIVE}_gpu_metrics.csv" 2>/dev/null || true
