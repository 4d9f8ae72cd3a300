#!/usr/bin/env bash
# One device call (a task drawn for a GPU gets 15 minutes of device time in all, start-up included, and one call
# runs at most 10): the GPU checks no CPU session could make, in the order a call cut short should keep them.
#   1. throughput: data2vec 2.0 vs 1.0 training updates at base size, bf16 eager, with FLOPs and MFU (issue 6);
#   2. text: pretrained vs scratch at GPU scale (issue 4), bench/gpu/text.sh with the pretraining budget the
#      deadline leaves after FINETUNE_S for its fine-tunes;
#   3. smoke: the CUDA paths no default run takes: fp16 pretraining and fine-tuning through the loss scaler, and a
#      torch.compile'd pretraining.
# Each part runs under `timeout` within what is left of DEADLINE_S; after each, what the parts wrote (their JSON,
# logs, metrics CSVs; no checkpoints) is packed into $OUT/session.tar.gz, so a part cut short keeps the others.
#   here:       bash bench/gpu/wheelhouse.sh   (data/tokenizer and data/shards exist after `make run`)
#   device run: carry .whl data/tokenizer data/shards/text_corpus data/shards/rt_polarity;
#               command: bash bench/gpu/session.sh   (timeout_s 600)
# Knobs (environment): DEADLINE_S (585), DEVICE (cuda), PRESETS (base), BATCH (per preset and modality, see
# v2_vs_v1.py), THROUGHPUT_S (100), TEXT (1; 0 skips part 2, measured on 2026-12-04), FINETUNE_S (120: text.sh's
# fine-tunes and control), SMOKE_S (100: the three smokes together; 60 each at most), SMOKE_STEPS (60), PY, and
# text.sh's own (TAG: text-v2-gpu).
# A CPU rehearsal (~10 min): DEVICE=cpu PRESETS=embedded BATCH= DEADLINE_S=900 FINETUNE_S=420 PROBE_STEPS=30
#   CANDIDATES=20,10 SEEDS=1 STUDENT=0 SMOKE_STEPS=12 TAG=rehearsal OUT=/tmp/session bash bench/gpu/session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-585} DEVICE=${DEVICE:-cuda} PRESETS=${PRESETS:-base}
BATCH=${BATCH-base.image=32,base.speech=16,base.text=64}
export TAG=${TAG:-text-v2-gpu}  # text.sh's runs folder, runs/bench-$TAG
THROUGHPUT_S=${THROUGHPUT_S:-100} FINETUNE_S=${FINETUNE_S:-120} SMOKE_S=${SMOKE_S:-100} SMOKE_STEPS=${SMOKE_STEPS:-60}
DEST=${OUT:-results/bench}
STAGE=$(mktemp -d)
mkdir -p "$DEST"
exec > >(tee -a "$STAGE/session.log") 2>&1

left() { echo $((DEADLINE_S - SECONDS)); }
pack() {  # the staged results and every run's small files, replaced whole (a reader never sees half an archive)
  local runs; runs=$(ls -d runs/bench-"$TAG"* runs/bench-smoke 2>/dev/null)
  tar -czf "$DEST/session.part" --exclude=checkpoints --exclude='*.pt' --exclude='*.tmp' \
    -C "$STAGE" . ${runs:+-C "$PWD" $runs} && mv "$DEST/session.part" "$DEST/session.tar.gz"
}
part() {  # NAME CAP COMMAND...: COMMAND under min(CAP, the time left less the packing's margin)
  local name=$1 cap=$2 limit; shift 2
  limit=$(( $(left) - 10 )); (( cap < limit )) && limit=$cap
  if (( limit < 20 )); then echo "session: $name skipped (it would get $limit s)"; return; fi
  echo "session: $name, at most $limit s (at $SECONDS s)"
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@"; rc=$?
  echo "session: $name ended rc $rc after $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >> "$STAGE/parts.tsv"
  pack
}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl pydantic webdataset soundfile; fi
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda,
torch.cuda.is_available() and torch.cuda.get_device_name(0))"; nproc; } > "$STAGE/machine.txt" 2>&1
cat "$STAGE/machine.txt"

precision=bf16; [ "$DEVICE" = cpu ] && precision=fp32
part throughput "$THROUGHPUT_S" $PY bench/v2_vs_v1.py throughput --presets "$PRESETS" --batch "$BATCH" --steps 10 \
  --device "$DEVICE" --precision "$precision" --out "$STAGE/v2_vs_v1_${PRESETS//,/_}_${DEVICE}.json"

# text: what is left, less the smoke's share; its pretraining gets that less the probe and the fine-tunes
text_s=$(( $(left) - SMOKE_S - 10 ))
budget=$(( text_s - 45 - FINETUNE_S ))
if [ "${TEXT:-1}" = 0 ]; then
  echo "session: text skipped (TEXT=0)"
elif (( budget >= 30 )); then
  OUT=$STAGE BUDGET_S=${BUDGET_S:-$budget} CANDIDATES=${CANDIDATES:-19200,14400,9600,7200,4800,2400} \
    part text "$text_s" bash bench/gpu/text.sh
else
  echo "session: text skipped (a ${budget} s pretraining budget)"
fi

smoke() {  # NAME ARGS...: a short d2v run whose metrics.csv tail is kept
  local name=$1; shift
  part "smoke-$name" $((SMOKE_S < 60 ? SMOKE_S : 60)) $PY -m d2v.cli "$@" --quiet --restart-on-change \
    --out "runs/bench-smoke/$name"  # a folder an earlier smoke of other settings left is trained over
  tail -n 2 "runs/bench-smoke/$name/metrics.csv" 2>/dev/null | sed "s|^|smoke $name: |"
}
# the collapse guard arms at the last step alone: so short a run is not a recipe and its pred_var may dip (the CPU
# rehearsal's did); a guard stop there still ran every step
pretrain_text=(pretrain text --tokenizer data/tokenizer/spm.model --set objective=v2 --set steps="$SMOKE_STEPS"
               --set optim.warmup_steps=$((SMOKE_STEPS / 10)) --set ema.tau_steps="$SMOKE_STEPS"
               --set collapse_warmup=1.0)
smoke pretrain-compile "${pretrain_text[@]}" --set compile=true
smoke pretrain-fp16 "${pretrain_text[@]}" --set precision=fp16
smoke finetune-fp16 finetune rt_polarity --init scratch --set steps="$SMOKE_STEPS" --set precision=fp16
pack
echo "session: done at $SECONDS s"
