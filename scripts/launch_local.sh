#!/usr/bin/env bash
# Run the multi-host code path on one machine: N jaxscale processes on localhost, each with its
# own simulated CPU devices, their collectives going through gloo.
#
#   scripts/launch_local.sh 2 4 --config tiny steps=50 workdir=runs/local2x4
#
# runs 2 processes x 4 CPU devices (8 global devices). Process 0's output goes to the terminal,
# the others' to <workdir>/process<i>.log. If any process fails, the others are stopped.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [jaxscale train arguments...]" >&2
  exit 2
fi
procs=$1 devices=$2
shift 2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
workdir=runs/local
for arg in "$@"; do
  case $arg in workdir=*) workdir=${arg#workdir=} ;; esac
done
mkdir -p "$workdir"
unset XLA_FLAGS JAX_PLATFORMS
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
for ((i = procs - 1; i >= 0; i--)); do
  args=(train --cpu-devices "$devices" --coordinator "localhost:$port" --num-processes "$procs"
        --process-id "$i" "$@")
  if [ "$i" -eq 0 ]; then
    jaxscale "${args[@]}" &
  else
    jaxscale "${args[@]}" > "$workdir/process$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { status=$?; cleanup; }
done
trap - EXIT
exit "$status"
