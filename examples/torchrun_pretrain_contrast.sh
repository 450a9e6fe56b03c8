#!/usr/bin/env bash
# Data-parallel training on one node (or several) with torchrun.
#
#   GPUS=4 KACL_WORKSPACE=/data/kacl-ws bash examples/torchrun_pretrain_contrast.sh
#
# torchrun starts one kacl process per GPU (rank r uses GPU LOCAL_RANK). Gradients are
# averaged by DDP over NCCL, BatchNorm statistics and the NT-Xent negatives span the global
# batch, and only rank 0 writes the checkpoint, the catalog and the report, so
# --batch-size B on G GPUs trains like one process with batch G x B. contrast's cam and
# radiomics steps are split over the ranks as shards that rank 0 merges.
#
# Multi-node: run this on every node with NNODES, NODE_RANK and MASTER_ADDR (a host every
# node reaches) set; the workspace must be on a shared file system.
set -euo pipefail

TORCHRUN=${TORCHRUN:-torchrun}
KACL_PY=${KACL_PY:-python}            # the Python that has kacl installed
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=$((GPUS > 0 ? GPUS : 1))
NNODES=${NNODES:-1}
BATCH=${BATCH:-32}                    # per GPU
: "${KACL_WORKSPACE:?set KACL_WORKSPACE to a prepared workspace}"
export KACL_WORKSPACE

if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}" "${NODE_RANK:?set NODE_RANK}"
  launch=("$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS"
          --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  launch=("$TORCHRUN" --standalone --nproc-per-node "$GPUS")
fi
kacl=("${launch[@]}" -m kacl_cli.app)   # torchrun runs the CLI module, not the wrapper script

"${kacl[@]}" pretrain --backbone "${BACKBONE:-densenet121}" --init "${INIT:-none}" \
  --epochs "${EPOCHS:-10}" --batch-size "$BATCH" --device cuda --workers "${WORKERS:-6}"
"${kacl[@]}" contrast --rounds "${ROUNDS:-3}" --epochs-per-round "${ROUND_EPOCHS:-2}" \
  --batch-size "$BATCH" --device cuda --workers "${WORKERS:-6}"
# evaluation is light: one process
"$KACL_PY" -m kacl_cli.app evaluate --round all --device cuda
