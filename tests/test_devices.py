"""`jaxscale.run.devices.set_cpu_devices`: the simulated device count, set before jax starts."""

import os
import subprocess
import sys


def test_set_cpu_devices_before_jax_in_a_fresh_process():
    """Importing the module leaves jax unimported; the count then holds when jax starts (the
    tests' own process already has 8 devices, so this runs in a fresh one)."""
    code = (
        "import sys\n"
        "from jaxscale.run.devices import set_cpu_devices\n"
        "assert 'jax' not in sys.modules\n"
        "set_cpu_devices(3)\n"
        "import jax\n"
        "print(jax.device_count(), jax.default_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "cpu"]
