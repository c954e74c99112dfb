"""`jaxscale prepare`: a local corpus into token shards (in parallel, resumable, with a manifest),
then training reads them: the same sample stream as the text it came from."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from test_tokenizers import project_sources, train_bpe

from jaxscale import cli
from jaxscale import config as config_lib
from jaxscale import data as data_lib
from jaxscale.analysis.metrics import read_jsonl
from jaxscale.config import ConfigError, MeshConfig
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.data.documents import text_documents
from jaxscale.data.pipeline import row_hashes
from jaxscale.data.prepare import prepare
from jaxscale.data.shards import open_shards

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=16", "eval_batches=1", "progress=false",
         "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """Text files (this project's sources) and a JSON-lines file bigger than one shard."""
    root = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(project_sources()):
        (root / f"doc{i:03d}.py").write_text(path.read_text())
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "jax", "grain", "shard", "ünï"]
    with open(root / "lines.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 30))),
                                "n": i}) + "\n")
    return root


def _docs(stream):
    return sorted(bytes(stream.document(i).astype(np.uint8)) for i in range(stream.num_docs))


def test_prepare_writes_shards_that_hold_the_corpus(corpus, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare(str(corpus), str(out), shard_mb=0.02, workers=2, progress=False)
    expected = list(text_documents(str(corpus)))
    texts = [d.text if isinstance(d.text, bytes) else d.text.encode() for d in expected]
    assert manifest["num_docs"] == len(expected) == len(list(project_sources())) + 400
    assert manifest["num_tokens"] == sum(len(t) for t in texts)
    assert manifest["num_shards"] >= 5 and len(manifest["shards"]) == manifest["num_shards"]
    assert sum(s["docs"] for s in manifest["shards"]) == manifest["num_docs"]
    assert manifest["tokenizer"] == {"name": "byte", "fingerprint": "byte", "vocab_size": 256}
    assert manifest["dtype"] == "<u2"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    # The JSON-lines file was split into byte ranges; every line landed in exactly one shard.
    plan = json.loads((out / "plan.json").read_text())
    assert sum(1 for t in plan["tasks"] for i in t["inputs"] if i[0].endswith(".jsonl")) >= 2
    stream, _ = open_shards(out)
    assert _docs(stream) == sorted(texts)
    keys = np.sort(stream.doc_keys)
    assert len(np.unique(keys)) == len(keys)  # document names (and so keys) are unique


def test_prepare_resumes_after_an_interruption(corpus, tmp_path):
    out = tmp_path / "shards"
    first = prepare(str(corpus), str(out), shard_mb=0.02, workers=2, progress=False)
    files = sorted(out.glob("shard-*"))
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    # A run killed mid-way: one shard's index (written last) missing, a temporary file left over,
    # no manifest yet.
    (out / "shard-00002.index.npy").unlink()
    (out / ".shard-00003.tokens.tmp999").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="preparation unfinished"):
        open_shards(out)
    again = prepare(str(corpus), str(out), shard_mb=0.02, workers=2, progress=False)
    assert {k: v for k, v in again.items() if k != "prepare_seconds"} == {
        k: v for k, v in first.items() if k != "prepare_seconds"}
    rewritten = {f.name for f in out.glob("shard-*") if f.stat().st_mtime_ns != mtimes[f.name]}
    assert rewritten == {"shard-00002.tokens", "shard-00002.index.npy"}
    assert not list(out.glob(".*tmp*"))
    # Other settings into the same directory are refused, naming what differs.
    with pytest.raises(ConfigError, match=r"holds a preparation with other inputs or settings "
                                          r"\(differs in: shard_bytes, tasks\)"):
        prepare(str(corpus), str(out), shard_mb=0.05, workers=1, progress=False)


def test_shards_feed_the_same_stream_as_the_text(corpus, tmp_path):
    """Prepared shards and the text they came from give the same batches, step for step."""
    out = tmp_path / "shards"
    prepare(str(corpus), str(out), shard_mb=0.03, workers=2, progress=False)
    sharding = shd.batch_sharding(make_mesh(MeshConfig(fsdp=8)), shd.resolve_rules("fsdp"))
    base = ["seq_len=32", "batch_size=16", "data.val_fraction=0.05"]
    text = config_lib.load("tiny", base + [f"data.path={corpus}"])
    shards = config_lib.load("tiny", base + ["data.source=shards", f"data.path={out}"])
    for pack in ("true", "false"):
        pipes = [data_lib.make_pipelines(config_lib.replace(c, **{"data.pack": pack}), sharding)
                 for c in (text, shards)]
        (a_train, a_eval), (b_train, b_eval) = pipes
        assert len(a_train.records) == len(b_train.records)
        assert a_train.fingerprint == b_train.fingerprint
        for step in (0, 1, 50):
            assert row_hashes(a_train.local_batch(step)) == row_hashes(b_train.local_batch(step))
        assert row_hashes(a_eval.local_batch(0)) == row_hashes(b_eval.local_batch(0))


def test_cli_prepare_then_train_on_the_shards(corpus, tmp_path, capsys):
    """`jaxscale prepare` with a BPE trained here, then `jaxscale train` reads the shards."""
    tok = train_bpe(tmp_path / "tokenizer.json", vocab_size=300)
    out = tmp_path / "shards"
    code = cli.main(["prepare", str(corpus), str(out), "--tokenizer", str(tok), "--workers", "2",
                     "--shard-mb", "0.05", "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{manifest['num_tokens']:,} tokens in {manifest['num_shards']} shards" in (
        capsys.readouterr().out)
    assert manifest["tokenizer"]["vocab_size"] == 300
    assert manifest["tokenizer"]["name"] == str(tok)
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", "tiny", *SMALL, "steps=4", "log_every=1",
                     "eval_every=0", "model.vocab_size=300", "data.source=shards",
                     f"data.path={out}", f"data.tokenizer={tok}", f"workdir={workdir}",
                     "optim.lr=1e-2", "watchdog.factor=0"])
    assert code == 0
    losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert abs(losses[0] - np.log(300)) < 0.3  # starts near uniform over the BPE vocabulary
    assert losses[-1] < losses[0]

    # Training with another tokenizer than the shards were made with fails in one line.
    capsys.readouterr()
    code = cli.main(["train", "--config", "tiny", *SMALL, "steps=1", "model.vocab_size=300",
                     "data.source=shards", f"data.path={out}", "data.tokenizer=byte",
                     f"workdir={tmp_path / 'bad'}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG and err.count("\n") == 1
    assert (f"data.tokenizer='byte' is not the tokenizer data.path='{out}' was prepared with "
            f"('{tok}', sha256:") in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_prepare_rejects_bad_arguments(corpus, tmp_path, capsys):
    assert cli.main(["prepare", str(corpus), str(tmp_path / "o"), "--shard-mb", "0"]) == 2
    assert "--shard-mb 0.0 must be positive" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "none*.txt"), str(tmp_path / "o")]) == 2
    assert "matches no file or directory" in capsys.readouterr().err


def test_prepare_hf_dataset(tmp_path):
    """--source hf on a local JSON-lines file (offline); needs the optional `datasets`."""
    pytest.importorskip("datasets")
    path = tmp_path / "rows.jsonl"
    texts = [f"row {i} " + "xyz " * (i % 9) for i in range(120)]
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    out = tmp_path / "shards"
    manifest = prepare(str(path), str(out), source="hf", text_field="content", shard_mb=0.001,
                       workers=2, progress=False)
    assert manifest["num_docs"] == 120 and manifest["num_shards"] > 1
    stream, _ = open_shards(out)
    assert _docs(stream) == sorted(t.encode() for t in texts)


def test_prepare_runs_without_jax(corpus, tmp_path):
    """The tokenizer workers (and the command) never import jax."""
    import subprocess
    import sys

    code = ("import sys; from jaxscale.data.prepare import prepare; "
            f"prepare({str(corpus)!r}, {str(tmp_path / 'o')!r}, shard_mb=0.2, workers=1, "
            "progress=False); assert 'jax' not in sys.modules, 'jax imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
