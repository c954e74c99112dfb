#!/usr/bin/env bash
# Train with jaxscale on SLURM GPU nodes: one process per node driving all of its GPUs.
#
#   sbatch --nodes=4 scripts/launch_slurm.sh --config llama-1b \
#       mesh.dcn_data=4 mesh.fsdp=-1 sharding.rules=hsdp workdir=/shared/runs/llama-1b
#
# Every process finds its place from SLURM's variables (SLURM_NTASKS, SLURM_PROCID, the first
# host of SLURM_STEP_NODELIST as the coordinator; see docs/multihost.md), so the command line is
# the same on every node. workdir (metrics, checkpoints) must be on a filesystem all nodes share.
# A node that fails or whose watchdog fires (exit 5) takes the step down with it
# (--kill-on-bad-exit); resubmit and the run resumes from its last checkpoint.
#
#SBATCH --job-name=jaxscale
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# Optional: a fixed coordinator port (default: derived from the job id, the same on every node).
# export JAXSCALE_COORDINATOR_PORT=8476

# SIGTERM 120 s before the time limit: jaxscale checkpoints and exits with code 4.
# (Request it with: sbatch --signal=TERM@120 ...)
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-32}" \
    jaxscale train "$@"
