#!/usr/bin/env bash
# The full NIH ChestX-ray14 run on one multi-GPU node: prepare -> pretrain -> contrast
# rounds -> evaluate.
#
#   NIH_DIR=/data/nih GPUS=8 KACL_WORKSPACE=/scratch/kacl-nih bash examples/nih_full_run_multigpu.sh
#
# - prepare decodes the 112,120 PNGs with one worker process per core (at most 8 by default;
#   --workers N to change) and is resumable: re-running the script after a crash continues
#   where each stage stopped, finished stages are skipped.
# - pretrain and contrast run under torchrun, one rank per GPU (see
#   torchrun_pretrain_contrast.sh for the semantics); contrast's cam and radiomics steps are
#   sharded over the ranks and merged by rank 0. Radiomics is CPU work: RADIOMICS_WORKERS
#   processes per rank (GPUS x RADIOMICS_WORKERS should not exceed the cores).
# - evaluate writes the HTML report to $KACL_WORKSPACE/reports/.
set -euo pipefail

: "${NIH_DIR:?set NIH_DIR to the NIH ChestX-ray14 folder (CSV files + images_0NN/)}"
: "${KACL_WORKSPACE:?set KACL_WORKSPACE to the workspace directory}"
export KACL_WORKSPACE
KACL_PY=${KACL_PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=$((GPUS > 0 ? GPUS : 1))
CORES=$(nproc)
SIZE=${SIZE:-256}                     # store size; training uses 224 px crops of it
BATCH=${BATCH:-32}                    # per GPU
RADIOMICS_WORKERS=${RADIOMICS_WORKERS:-$((CORES / GPUS > 1 ? CORES / GPUS : 1))}

kacl=("$KACL_PY" -m kacl_cli.app)
ddp=("$TORCHRUN" --standalone --nproc-per-node "$GPUS" -m kacl_cli.app)

echo "== prepare ($NIH_DIR -> $KACL_WORKSPACE, ${SIZE}px)" >&2
"${kacl[@]}" prepare --nih-dir "$NIH_DIR" --size "$SIZE" --workers "${PREPARE_WORKERS:-0}"

echo "== pretrain on $GPUS GPU(s)" >&2
# INIT=imagenet starts from torchvision's ImageNet weights when its cache holds them (kacl
# never downloads); INIT=/path/to/state_dict.pth from any other file.
"${ddp[@]}" pretrain --backbone "${BACKBONE:-densenet121}" --init "${INIT:-none}" \
  --epochs "${EPOCHS:-10}" --batch-size "$BATCH" --image-size "${IMAGE_SIZE:-224}" \
  --device cuda --workers "${WORKERS:-6}"

echo "== contrast: ${ROUNDS:-3} rounds of cam -> radiomics -> joint training" >&2
"${ddp[@]}" contrast --rounds "${ROUNDS:-3}" --epochs-per-round "${ROUND_EPOCHS:-2}" \
  --batch-size "$BATCH" --device cuda --workers "$RADIOMICS_WORKERS" \
  --radiomics-backend "${RADIOMICS_BACKEND:-fast}"

echo "== evaluate every round" >&2
"${kacl[@]}" evaluate --round all --device cuda
echo "== report: $KACL_WORKSPACE/reports/" >&2
