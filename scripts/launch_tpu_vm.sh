#!/usr/bin/env bash
# Train with jaxscale on every host of a Cloud TPU VM slice (one process per host).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/launch_tpu_vm.sh --config llama-8b \
#       mesh.fsdp=-1 workdir=gs://my-bucket/runs/llama-8b
#
# Runs the same command on all workers (gcloud ... --worker=all). Each process finds its place in
# the slice from the TPU runtime (jaxscale.run.distributed: JAX's TPU detection reads the VM
# metadata), so no flag differs between hosts. Process 0 writes metrics and logs; checkpoints
# need storage every host can reach (a gs:// workdir or checkpoint.dir).
#
# Set SETUP to install jaxscale on the workers first, e.g.
#   SETUP="pip install 'jax[tpu]' jaxscale" scripts/launch_tpu_vm.sh ...
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

quoted=$(printf '%q ' "$@")
command="${SETUP:+$SETUP && }cd ${REMOTE_DIR:-\$HOME} && jaxscale train ${quoted}"
# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$command"
