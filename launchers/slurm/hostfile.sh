#!/bin/bash
# Writes a DeepSpeed hostfile ("host slots=N" per node) from the Slurm allocation, for the alternative path:
#   bash launchers/slurm/hostfile.sh > hostfile && deepspeed --hostfile hostfile launchers/train.py ...
# (the deepspeed launcher then starts every node over ssh/pdsh; train.sbatch needs neither).
set -euo pipefail
slots=${CLORAE_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
  echo "$host slots=$slots"
done
