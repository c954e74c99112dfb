"""The README's promises: its example model trains, and CI runs the README's test command."""

import pathlib
import re

import numpy as np

from jaxscale.analysis.metrics import read_jsonl

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    pytest_part = test_command.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert pytest_part in ci
    install = test_command.split("&&")[-2].strip().removeprefix("pip install ")
    assert f"pip install --quiet {install}" in ci
    train_command = next(c for c in commands if "jaxscale train --config tiny --cpu-devices 8" in c)
    assert train_command.startswith("python3 -m venv .venv")


def test_bring_your_own_model_example_trains(tmp_path):
    block = README.split("## Bring your own Flax model", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", block, re.S).group(1)
    small = ('["mesh.fsdp=8", "steps=4", "seq_len=16", "batch_size=16", "eval_batches=1", '
             f'"log_every=1", "progress=false", "optim.warmup_steps=1", "workdir={tmp_path}", '
             f'"data.path={pathlib.Path(__file__).parent}"]')
    code, n = re.subn(r'\["mesh\.fsdp=8", "steps=100"\]', small, code)
    assert n == 1, "the README example's config line changed; update this test"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert int(namespace["state"].step) == 4
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
