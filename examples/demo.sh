#!/usr/bin/env bash
# The whole kacl loop on the built-in synthetic phantoms, on CPU, in a few minutes.
# Usage: KACL_WORKSPACE=demo-workspace bash examples/demo.sh   (what `make demo` runs)
set -euo pipefail
KACL=${KACL:-.venv/bin/kacl}
export KACL_WORKSPACE=${KACL_WORKSPACE:-demo-workspace}
# 3000 phantoms at 64 px and 15 pretrain epochs: at 64 px the tiny net's receptive field
# covers the lesions and each epoch is 4x cheaper than at 128 px, so more images fit the
# budget; measured 3 min on 2 lightly loaded cores (docs/training.md, "Demo budget").
N=${DEMO_IMAGES:-3000}
SIZE=${DEMO_SIZE:-64}
BACKBONE=${DEMO_BACKBONE:-tiny}

echo "== kacl demo in $KACL_WORKSPACE: $N phantoms at ${SIZE}px, backbone $BACKBONE" >&2
$KACL prepare --synthetic "$N" --size "$SIZE" --seed 0
$KACL pretrain --backbone "$BACKBONE" --epochs "${DEMO_EPOCHS:-15}" --batch-size 32
# The fast radiomics backend gives pyradiomics' features (parity-tested) at ~25x the speed.
$KACL contrast --rounds 3 --epochs-per-round "${DEMO_ROUND_EPOCHS:-2}" --radiomics-backend fast
$KACL evaluate --round all
echo "== report: $KACL_WORKSPACE/reports/" >&2
