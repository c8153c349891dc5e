#!/usr/bin/env bash
# Train any recipe with DDP under torchrun: NNODES nodes x NPROC_PER_NODE processes (one per GPU).
#
#   recipes/cluster/torchrun.sh RECIPE [lightning-amor fit options...]
#
# Run the same line on every node, from the repository root. Environment (default in brackets):
#   NNODES          number of nodes [1]
#   NPROC_PER_NODE  processes per node, one per GPU [the GPUs that nvidia-smi lists, else 1]
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node, e.g. the first node [localhost:29400]
#   RDZV_ID         an id shared by the nodes of one run, e.g. a job id [lightning-amor]
#   MAX_RESTARTS    how often torchrun restarts all workers after one fails or is preempted [0]
#   BASE_CONFIG     the shared trainer settings, composed before RECIPE as `lightning-amor recipes` shows
#                   [recipes/_base/trainer.yaml beside this script]; empty: RECIPE alone (a recipe of your own)
# Every start resumes from the run's last checkpoint (--ckpt_path last_or_fresh); the first one starts fresh.
# Options after RECIPE override the recipe and the settings here (later options win).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [NNODES=..] [NPROC_PER_NODE=..] [RDZV_ENDPOINT=host:port] $0 RECIPE [fit options...]" >&2
    exit 2
fi
recipe=$1
shift
base=${BASE_CONFIG-$(dirname "${BASH_SOURCE[0]}")/../_base/trainer.yaml}
configs=(--config "$recipe")
if [[ -n $base ]]; then
    configs=(--config "$base" "${configs[@]}")
fi

nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)}
if [[ ! $nproc =~ ^[1-9][0-9]*$ ]]; then
    nproc=1
fi

exec torchrun \
    --nnodes "$nnodes" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-localhost:29400}" --rdzv_id "${RDZV_ID:-lightning-amor}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    -m lightning_amor.cli fit "${configs[@]}" \
    --trainer.num_nodes "$nnodes" --trainer.devices "$nproc" --trainer.strategy ddp \
    --ckpt_path last_or_fresh "$@"
