#!/usr/bin/env bash
# Single-GPU throughput and MFU of jaxscale (gpt2-small at seq 1024, a ~1B Llama at seq 2048),
# sweeping remat policy and batch, profiling the best configuration of each model.
#
# On a machine with the GPU and jax[cuda] but without jaxscale's pure-Python dependencies, put
# their wheels in .whl/ (installed only when omegaconf is missing; see benchmarks/RESULTS.md for the list); they are installed into
# /tmp/site and jaxscale runs from this checkout, uninstalled. Results go to $OUT (default
# ./gpu_results): results.jsonl, table.md, profile_<model>.txt and log.
#
#   bash scripts/gpu_benchmark.sh                       # the full sweep (about 10 minutes)
#   bash scripts/gpu_benchmark.sh --models gpt2-small   # one model
#   bash scripts/gpu_benchmark.sh --tiny                # the same path on the CPU, tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# Let XLA take 90% of the GPU instead of 75%: the sweep's memory check uses this limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
"$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
"$PYTHON" benchmarks/gpu_throughput.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log"
