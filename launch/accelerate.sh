#!/bin/bash
# `accelerate launch` starts torch's elastic agent, which exports RANK/LOCAL_RANK/WORLD_SIZE/
# MASTER_*; dtrain reads those like under torchrun. Precision is dtrain's train.precision,
# not accelerate's --mixed_precision.   (pip install accelerate)
#   launch/accelerate.sh 4 train.precision=bf16
set -euo pipefail
NPROC="${1:-4}"; shift || true
if [ "$NPROC" -gt 1 ]; then MULTI=(--multi_gpu); else MULTI=(); fi
exec accelerate launch "${MULTI[@]}" --num_processes="$NPROC" --num_machines=1 -m dtrain "$@"
