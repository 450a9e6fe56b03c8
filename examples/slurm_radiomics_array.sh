#!/usr/bin/env bash
# Sharded radiomics on a SLURM cluster: one array task per shard, then one merge job.
#
#   N=64 ROUND=0 KACL_WORKSPACE=/shared/kacl-ws bash examples/slurm_radiomics_array.sh
#
# Submitted without arguments, this script submits itself twice: an array of N tasks
# (each `kacl radiomics --shard $SLURM_ARRAY_TASK_ID/$N`, writing only its own part under
# $KACL_WORKSPACE/parts/radiomics-round-$ROUND/shard-i-of-N/) and a merge job that starts
# once every task succeeded (afterok) and folds the parts into the workspace. The workspace
# must be prepared and `kacl cam --round $ROUND` merged first; it must sit on a file system
# every node sees. Re-submitting is safe: finished shards are skipped, merging is idempotent.
#
# (The #SBATCH lines below are the array task's defaults; sbatch flags on the command line
# win. The header assumes N=64: the --array range is passed explicitly when submitting.)
#SBATCH --job-name=kacl-radiomics
#SBATCH --array=0-63
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=kacl-radiomics-%A_%a.log
set -euo pipefail

KACL=${KACL:-kacl}
N=${N:-64}
ROUND=${ROUND:-0}
BACKEND=${BACKEND:-fast}     # or: pyradiomics (the reference, same features, ~70x slower)
ROI=${ROI:-cam}
: "${KACL_WORKSPACE:?set KACL_WORKSPACE to the shared workspace directory}"
export KACL_WORKSPACE KACL_NO_PROGRESS=1

case "${1:-submit}" in
  task)   # one array element: shard $SLURM_ARRAY_TASK_ID of $N
    : "${SLURM_ARRAY_TASK_ID:?run the task step inside a SLURM array job}"
    "$KACL" radiomics --round "$ROUND" --roi "$ROI" --backend "$BACKEND" \
      --workers "${SLURM_CPUS_PER_TASK:-1}" --shard "$SLURM_ARRAY_TASK_ID/$N" --json
    ;;
  merge)  # after the whole array: fold the N parts in (exit 1 names a missing shard)
    "$KACL" merge --stage radiomics --round "$ROUND" --json
    ;;
  submit)
    array_id=$(sbatch --parsable --array="0-$((N - 1))" \
      --export=ALL,N="$N",ROUND="$ROUND",BACKEND="$BACKEND",ROI="$ROI" "$0" task)
    array_id=${array_id%%;*}
    # --wrap: a plain job (this file's #SBATCH --array header would make it an array too)
    sbatch --parsable --job-name=kacl-merge --dependency="afterok:$array_id" \
      --cpus-per-task=2 --mem=8G --time=00:30:00 --output=kacl-merge-%j.log \
      --export=ALL,N="$N",ROUND="$ROUND" --wrap="bash $(printf '%q' "$0") merge"
    echo "submitted radiomics array $array_id (N=$N shards) and its merge job" >&2
    ;;
  *)
    echo "usage: $0 [submit|task|merge]" >&2
    exit 2
    ;;
esac
