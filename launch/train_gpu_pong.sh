#!/usr/bin/env bash
# Trains the shipped Pong world (configs/atari.py: stage 1 -> 2 -> 3) on one
# H100/H200-class GPU within a wall-clock budget, then exports it.
#
#   bash launch/train_gpu_pong.sh OUT_DIR [DATA_DIR] [extra train.py flags...]
#
# Data in: DATA_DIR (default OUT_DIR/data) holds records from
# launch/prepare_data.py; they are recorded first if it has no metadata.json.
# Out: OUT_DIR/run (checkpoints of the three stages, resumable: rerun the same
# command), OUT_DIR/export (the inference export: launch/play.py
# --checkpoint=OUT_DIR/export), OUT_DIR/eval (launch/evaluate.py's report,
# with EVAL=1).
#
# Each stage runs under its own time limit (SIGTERM saves a checkpoint and the
# next stage starts from it), so the whole job ends within the budget whatever
# the GPU's speed: 60 s data + DIFFUSION_S + CONSISTENCY_S + ADVERSARIAL_S +
# export, 15 minutes with the defaults. The step counts are upper bounds, not
# measured GPU figures (no GPU has run this yet): read the logged step times
# of a first run and set them.
#
# Knobs (environment): DTYPE (bfloat16), BATCH (64), DIFFUSION_STEPS (6000),
# CONSISTENCY_STEPS (400), ADVERSARIAL_STEPS (200), DIFFUSION_S (480),
# CONSISTENCY_S (120), ADVERSARIAL_S (180), EPISODES (48), FRAMES (1000),
# EVAL (0), EVAL_FLAGS (""), STAGES ("diffusion consistency adversarial": the
# CPU test runs the first two; the export is of the last stage run).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash launch/train_gpu_pong.sh OUT_DIR [DATA_DIR] [train.py flags...]" >&2
  exit 2
fi
OUT=$(realpath -m "$1"); shift
DATA=$(realpath -m "${1:-$OUT/data}"); [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."

DTYPE=${DTYPE:-bfloat16}
BATCH=${BATCH:-64}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-6000}
CONSISTENCY_STEPS=${CONSISTENCY_STEPS:-400}
ADVERSARIAL_STEPS=${ADVERSARIAL_STEPS:-200}
DIFFUSION_S=${DIFFUSION_S:-480}
CONSISTENCY_S=${CONSISTENCY_S:-120}
ADVERSARIAL_S=${ADVERSARIAL_S:-180}
EPISODES=${EPISODES:-48}
STAGES=${STAGES:-diffusion consistency adversarial}
FRAMES=${FRAMES:-1000}
CLIP=12   # configs/atari.py train.clip_frames: records hold clips of 2 x 12, stride 12

python -c "import jax; d = jax.devices(); print('devices:', d);
import sys; sys.exit(0) if d[0].platform == 'gpu' else print(
  'train_gpu_pong: warning: no GPU, running on', d[0].platform, file=sys.stderr)"

if [ ! -f "$DATA/metadata.json" ]; then
  python launch/prepare_data.py --world=atari --game=Pong --episodes="$EPISODES" \
    --frames_per_episode="$FRAMES" --clip_frames=$((2 * CLIP)) --clip_stride=$CLIP --policy=rally \
    --size=64 --out="$DATA" --overwrite
fi

stage() {  # stage NAME STEPS SECONDS: one stage, stopped (and saved) by SIGTERM at the limit
  echo "train_gpu_pong: stage $1, up to $2 steps or $3 s"
  timeout -s TERM -k 120 "$3" python launch/train.py --config=configs/atari.py:full \
    --workdir="$OUT/run" --config.stage="$1" --config.train.steps="$2" \
    --config.data.path="$DATA" --config.model.dtype="$DTYPE" \
    --config.train.batch_size="$BATCH" --config.checkpoint.every_steps=500 \
    "${TRAIN_FLAGS[@]}" || {
      rc=$?; [ $rc -eq 124 ] || { echo "train_gpu_pong: stage $1 failed ($rc)" >&2; exit $rc; }; }
}
TRAIN_FLAGS=("$@")
for name in $STAGES; do
  case $name in
    diffusion) stage diffusion "$DIFFUSION_STEPS" "$DIFFUSION_S" ;;
    consistency) stage consistency "$CONSISTENCY_STEPS" "$CONSISTENCY_S" ;;
    adversarial) stage adversarial "$ADVERSARIAL_STEPS" "$ADVERSARIAL_S" ;;
    *) echo "train_gpu_pong: unknown stage '$name' in STAGES" >&2; exit 2 ;;
  esac
done

python launch/export.py --checkpoint="$OUT/run" --out="$OUT/export"
if [ "${EVAL:-0}" = "1" ]; then
  # shellcheck disable=SC2086
  python launch/evaluate.py --checkpoint="$OUT/export" --out="$OUT/eval" ${EVAL_FLAGS:-}
fi
echo "train_gpu_pong: done: $OUT/export (play: python launch/play.py --checkpoint=$OUT/export)"
