#!/usr/bin/env bash
# The GPU check: every CUDA code path once, with figures, in <= 8 minutes on one GPU + 16 cores.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [WORKDIR]
#
# Stages, each timed, each printing img/s:
#   1. prepare   N phantoms (256 px store)
#   2. bench     train_bench on the device: loader alone, model alone, pretrain loop, and the
#                data path's share of step time (densenet121 at 224, AMP, batch 64)
#   3. pretrain  densenet121 at 224 with AMP (bf16 on H100/H200), batched data path
#   4. cam       Grad-CAM maps + boxes of every image
#   5. contrast  one round (radiomics of the CAM boxes + classification + NT-Xent)
#   6. torchrun  one-rank NCCL job through kacl's DDP helpers (benchmarks/dist_check.py),
#                then `pretrain` itself under a one-rank torchrun
#   7. predict   a few phantom PNGs with --boxes
# --dry-run runs the same commands on the CPU with tiny settings (gloo instead of NCCL); the
# test suite runs it (tests/test_gpu_check.py).
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
WORK=${1:-$(mktemp -d -t kacl-gpu-check.XXXXXX)}
PY=${PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export KACL_NO_PROGRESS=1
WS="$WORK/ws"
mkdir -p "$WORK"

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; N=40; SIZE=32; IMAGE=32; BACKBONE=tiny; EPOCHS=1; BATCH=8; WORKERS=0
  BENCH=(--device cpu --cases tiny:32 --loader-size 32 --store-size 32 --batch 8 --batches 1
         --repeats 1)
  DIST=(--device cpu --backbone tiny --size 32 --store-size 32 --batch 4 --steps 2)
  PREDICT_N=2
else
  DEVICE=cuda; N=${GPU_CHECK_IMAGES:-6000}; SIZE=256; IMAGE=224; BACKBONE=densenet121
  EPOCHS=2; BATCH=64; WORKERS=${GPU_CHECK_WORKERS:-8}
  BENCH=(--device cuda --cases densenet121:224 --batch 64 --batches 30 --workers "$WORKERS"
         --repeats 3)
  DIST=(--device cuda --backbone densenet121 --size 224 --store-size 256 --batch 64 --steps 20)
  PREDICT_N=16
fi
KACL=("$PY" -m kacl_cli.app)

now() { date +%s.%N; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / s }'; }
took() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
json_field() { "$PY" -c "import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print(f'{v:.1f}' if isinstance(v, float) else v)" "$1" "$2"; }
report() { printf 'gpu_check %-9s %7s s  %s\n' "$1" "$2" "$3"; }

T_ALL=$(now)
echo "gpu_check: device $DEVICE, $N phantoms at $SIZE px, $BACKBONE at $IMAGE, work dir $WORK" >&2
if [[ $DRY == 0 ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true; fi

t=$(now)
"${KACL[@]}" prepare -w "$WS" --synthetic "$N" --size "$SIZE" --seed 0 --enrich 0.3 \
  --workers "$WORKERS" --json > "$WORK/prepare.json"
s=$(took "$t" "$(now)"); report prepare "$s" "$(rate "$N" "$s") img/s"

t=$(now)
"$PY" -m benchmarks.train_bench "${BENCH[@]}" | tee "$WORK/bench.txt"
report bench "$(took "$t" "$(now)")" "(loader / model / pretrain above)"

t=$(now)
"${KACL[@]}" pretrain -w "$WS" --backbone "$BACKBONE" --epochs "$EPOCHS" --batch-size "$BATCH" \
  --image-size "$IMAGE" --device "$DEVICE" --workers "$WORKERS" --json > "$WORK/pretrain.json"
s=$(took "$t" "$(now)")
report pretrain "$s" "$(json_field "$WORK/pretrain.json" images_per_s) img/s (train loop, mean of epochs)"

t=$(now)
"${KACL[@]}" cam -w "$WS" --split all --batch-size "$BATCH" --device "$DEVICE" \
  --workers "$WORKERS" --json > "$WORK/cam.json"
s=$(took "$t" "$(now)"); report cam "$s" "$(rate "$N" "$s") img/s (wall, all splits)"

t=$(now)
"${KACL[@]}" contrast -w "$WS" --rounds 1 --epochs-per-round 1 --batch-size "$BATCH" \
  --device "$DEVICE" --workers "$WORKERS" --json > "$WORK/contrast.json"
s=$(took "$t" "$(now)"); report contrast "$s" "one round (cam + radiomics + 1 epoch), wall"

t=$(now)
"$TORCHRUN" --standalone --nproc-per-node 1 -m benchmarks.dist_check "${DIST[@]}"
"$TORCHRUN" --standalone --nproc-per-node 1 -m kacl_cli.app pretrain -w "$WS" \
  --backbone "$BACKBONE" --epochs 1 --batch-size "$BATCH" --image-size "$IMAGE" \
  --device "$DEVICE" --workers "$WORKERS" --force --json > "$WORK/torchrun.json"
s=$(took "$t" "$(now)")
report torchrun "$s" "$(json_field "$WORK/torchrun.json" images_per_s) img/s (pretrain, 1 rank)"

t=$(now)
mapfile -t FILES < <(find "$WS/phantoms/images" -name '*.png' | sort | head -n "$PREDICT_N")
"${KACL[@]}" predict -w "$WS" --boxes --device "$DEVICE" --json "${FILES[@]}" > "$WORK/predict.json"
s=$(took "$t" "$(now)"); report predict "$s" "$(rate "${#FILES[@]}" "$s") img/s (wall, with start-up)"

report total "$(took "$T_ALL" "$(now)")" "work dir $WORK"
