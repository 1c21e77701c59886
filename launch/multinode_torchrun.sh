#!/bin/bash
# Run on every node with the same HEAD (first node's address) and NNODES.
#   HEAD=node0 NNODES=2 launch/multinode_torchrun.sh 8 train.epochs=30
set -euo pipefail
NPROC="${1:-8}"; shift || true
exec torchrun --nnodes="${NNODES:?set NNODES}" --nproc_per_node="$NPROC" \
    --rdzv_id="${RDZV_ID:-dtrain}" --rdzv_backend=c10d --rdzv_endpoint="${HEAD:?set HEAD}:${PORT:-29500}" \
    -m dtrain "$@"
