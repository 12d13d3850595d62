#!/bin/bash
# Starts this node's ranks: torchrun with a static rendezvous at MASTER_ADDR:MASTER_PORT. Used by train.sbatch
# (under srun, node rank from SLURM_NODEID) and usable by hand on machines without Slurm:
#   MASTER_ADDR=node0 MASTER_PORT=29511 NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 bash launchers/slurm/launch_node.sh ARGS
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:?set MASTER_PORT}"
node_rank=${SLURM_NODEID:-${NODE_RANK:-0}}
nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
nproc=${NPROC_PER_NODE:-1}
# Unset Slurm's task variables so train.py takes its rank from torchrun, not from srun's single task.
unset SLURM_PROCID SLURM_NTASKS SLURM_LOCALID
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
here=$(cd "$(dirname "$0")/../.." && pwd)
exec python -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$here/launchers/train.py" "$@"
