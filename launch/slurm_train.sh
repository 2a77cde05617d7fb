#!/bin/bash
# SLURM batch script: tipslab pretraining on N nodes x G GPUs through torchrun (one torchrun per node).
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_train.sh tipsv2_b data.path=/data/shards
# Every process writes to one run folder, runs/<experiment>/slurm-<job id> (TIPSLAB_RUN_NAME); a job
# resubmitted after a preemption continues it with: ... launch/slurm_train.sh tipsv2_b checkpoint.resume=slurm-<old id>
#SBATCH --job-name=tipslab
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

EXP=${1:?usage: sbatch launch/slurm_train.sh EXPERIMENT [key=value ...]}
shift
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS=${GPUS##*:}                       # "h100:8" -> 8
NODES=${SLURM_JOB_NUM_NODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export TIPSLAB_RUN_NAME=${TIPSLAB_RUN_NAME:-slurm-$SLURM_JOB_ID}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
cd "${SLURM_SUBMIT_DIR:-.}"

# One task per node; torchrun starts the GPU processes and the c10d rendezvous assigns ranks.
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes="$NODES" --nproc-per-node="$GPUS" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:29500" --rdzv-id="$TIPSLAB_RUN_NAME" \
    -m tipslab.platform.cli train "$EXP" trainer.devices="$GPUS" trainer.num_nodes="$NODES" "$@"
