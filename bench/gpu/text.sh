#!/usr/bin/env bash
# Text pretrained vs scratch at GPU scale, on one H100/H200 through the device tool (issue 4). On 2 CPU cores the
# v2 text teachers of 600, 2400 and 4800 steps (16 blocks × 4 clones) fine-tune no better than scratch over ten
# seeds (67.75 %) or a 20-step control (67.7 %); each doubling costs hours there. This takes the series past that in
# one device call: a 200-step probe times a step, then the longest pretraining of 19200, 9600, 4800, 2400 steps that
# fits BUDGET_S runs (warm-up a tenth, τ over the run, as the CPU series), and rt_polarity is fine-tuned SEEDS times
# from its teacher, its student and from scratch under the pipeline's recipe, and from the teacher of a
# CONTROL_STEPS (20) pretraining, the null control.
#   here:       bash bench/gpu/wheelhouse.sh   (data/tokenizer and data/shards exist after `make run`)
#   device run: carry .whl data/tokenizer data/shards/text_corpus data/shards/rt_polarity;
#               command: bash bench/gpu/text.sh   (timeout_s 600; the default budget leaves ~4 min for the rest)
# Knobs (environment): PT_STEPS (skip the probe and pretrain this long), BUDGET_S (pretraining seconds, default
# 300), CANDIDATES (19200,9600,4800,2400), PROBE_STEPS (200), CONTROL_STEPS (20; 0: none), SEEDS (3), TASKS
# (rt_polarity), STUDENT (1; 0: the teacher's rows only), TAG (text-v2-gpu), OUT (default $OUT or
# results/bench), PY. A CPU rehearsal in minutes: PROBE_STEPS=30 CANDIDATES=20,10 CONTROL_STEPS=20 SEEDS=1
# (5.5 min; at 10 steps the collapse guard stops the run).
# Results: $OUT/pretrain_vs_scratch_text_v2_ptSTEPS_gpu{,_teacher}.{json,md}, the control's
# ..._control_ptCONTROL_STEPS_gpu_teacher.{json,md}, the pretraining's metrics CSV and the probe's step time
# ($OUT/text_v2_probe_gpu.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-300} CANDIDATES=${CANDIDATES:-19200,9600,4800,2400} PROBE_STEPS=${PROBE_STEPS:-200}
SEEDS=${SEEDS:-3} TASKS=${TASKS:-rt_polarity} TAG=${TAG:-text-v2-gpu} CONTROL_STEPS=${CONTROL_STEPS:-20}
OUT=${OUT:-results/bench}
if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl pydantic webdataset; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
RUNS=runs/bench-$TAG

if [ -z "${PT_STEPS:-}" ]; then
  rm -rf "$RUNS/probe"
  $PY -m d2v.cli pretrain text --quiet --tokenizer data/tokenizer/spm.model --out "$RUNS/probe" \
    --set objective=v2 --set steps="$PROBE_STEPS" --set optim.warmup_steps=$((PROBE_STEPS / 10)) \
    --set ema.tau_steps="$PROBE_STEPS"
  PT_STEPS=$($PY bench/gpu/fit_steps.py "$RUNS/probe/metrics.csv" --budget "$BUDGET_S" --skip $((PROBE_STEPS / 4)) \
    --candidates "$CANDIDATES" --out "$OUT/text_v2_probe_gpu.json")
fi
echo "text.sh: pretraining $PT_STEPS steps" >&2

stem="$OUT/pretrain_vs_scratch_text_v2_pt${PT_STEPS}_gpu"
copy_metrics() { cp "$RUNS/pretrain/text-v2/metrics.csv" "${stem}_metrics.csv" 2>/dev/null || true; }
trap copy_metrics EXIT
# one point of the series: STEPS of the v2 recipe (warm-up a tenth), its runs under TAG, then the rest of the args
series() {
  local steps=$1 tag=$2; shift 2
  $PY bench/pretrain_vs_scratch.py --modalities text --tasks "$TASKS" --objective text=v2 --ft-profile embedded \
    --seeds "$SEEDS" --pretrain-steps text="$steps" --set text.optim.warmup_steps=$((steps / 10)) --tag "$tag" "$@"
}
# the teacher first: the steadier start on CPU; the student's fine-tunes then reuse pretraining and scratch runs
series "$PT_STEPS" "$TAG" --weights teacher --out "${stem}_teacher.json"
# the null control: CONTROL_STEPS of the same recipe leave the teacher ~96 % its initialisation, yet on CPU its
# fine-tunes matched 2400-4800 steps' (docs/findings.md, text): the long run must beat this row, not only scratch
if [ "$CONTROL_STEPS" -gt 0 ]; then
  series "$CONTROL_STEPS" "$TAG-control" --weights teacher \
    --out "$OUT/pretrain_vs_scratch_text_v2_control_pt${CONTROL_STEPS}_gpu_teacher.json"
fi
# the student last: on CPU it trailed the teacher, so it is the row a short device call gives up first
if [ "${STUDENT:-1}" = 1 ]; then
  series "$PT_STEPS" "$TAG" --weights student --out "${stem}.json"
fi
