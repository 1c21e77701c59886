#!/bin/bash
# Single node, N processes (one per GPU, or CPU processes on gloo without CUDA).
#   launch/torchrun.sh 4 --config configs/mnist_mlp.yaml train.epochs=5
set -euo pipefail
NPROC="${1:-4}"; shift || true
exec torchrun --standalone --nproc_per_node="$NPROC" -m dtrain "$@"
