"""jaxscale.data: documents, the token stream, packing, per-process rows, the iterator's state and
elastic resumes, the sources table and the data settings' checks."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import tiny_model_config

from jaxscale import config as config_lib
from jaxscale import data as data_lib
from jaxscale.config import ConfigError, MeshConfig
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.data.documents import document_key, split_documents, text_documents
from jaxscale.data.pipeline import DataPipeline, row_hashes
from jaxscale.data.sources import (
    PackedWindows,
    PaddedDocuments,
    SyntheticTokens,
    TokenStream,
    load_text_corpus,
    window_records,
)
from jaxscale.data.tokenizers import ByteTokenizer
from jaxscale.models import build_model

DOCS = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 29), np.arange(30, 32)]  # 5, 3, 9, 2


def _sharding(mesh_cfg: MeshConfig | None = None, rules="fsdp"):
    mesh = make_mesh(mesh_cfg or MeshConfig(fsdp=8))
    return shd.batch_sharding(mesh, shd.resolve_rules(rules))


def test_packed_window_fields():
    stream = TokenStream.from_documents(DOCS)
    windows = PackedWindows(stream, seq_len=8)
    assert len(windows) == (19 - 1) // 8
    r = windows[0]  # tokens 1..5 | 10 11 12 | 20: inputs 8 tokens, targets shifted by one
    np.testing.assert_array_equal(r["inputs"], [1, 2, 3, 4, 5, 10, 11, 12])
    np.testing.assert_array_equal(r["targets"], [2, 3, 4, 5, 10, 11, 12, 20])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 3, 4, 0, 1, 2])
    # A target from the next document is not predicted from this one.
    np.testing.assert_array_equal(r["loss_mask"], [1, 1, 1, 1, 0, 1, 1, 0])
    r = windows[1]  # starts inside a document: its positions count from the window's start
    np.testing.assert_array_equal(r["inputs"], [20, 21, 22, 23, 24, 25, 26, 27])
    np.testing.assert_array_equal(r["segment_ids"], [1] * 8)
    np.testing.assert_array_equal(r["loss_mask"], [1] * 8)


def test_padded_documents_one_per_window():
    windows = PaddedDocuments(TokenStream.from_documents(DOCS), seq_len=8)
    assert len(windows) == 4  # a document of 9 tokens makes 8 predictions: one window
    r = windows[1]
    np.testing.assert_array_equal(r["inputs"], [10, 11, 12, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(r["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_stream_over_chunks_reads_like_one_array():
    """A stream whose documents live in several arrays (as shards do), some selected away."""
    one = TokenStream.from_documents(DOCS, keys=[7, 8, 9, 10])
    chunked = TokenStream(
        chunks=(np.concatenate(DOCS[:2]), np.concatenate(DOCS[2:])),
        doc_chunk=np.array([0, 0, 1, 1], np.int32),
        doc_offset=np.array([0, 5, 0, 9]),
        doc_starts=one.doc_starts,
        doc_keys=one.doc_keys,
    )
    for lo in range(one.num_tokens):
        for hi in range(lo + 1, one.num_tokens + 1):
            for a, b in zip(one.read(lo, hi), chunked.read(lo, hi), strict=True):
                np.testing.assert_array_equal(a, b)
    kept = chunked.select(np.array([True, False, True, True]))
    assert kept.num_tokens == 16
    np.testing.assert_array_equal(kept.read(3, 8)[0], [4, 5, 20, 21, 22])
    np.testing.assert_array_equal(kept.read(3, 8)[1], [0, 0, 1, 1, 1])


def _chunked_stream(rng) -> TokenStream:
    """Random documents spread over three token arrays (as shards are)."""
    docs = [rng.integers(1, 1000, n) for n in rng.integers(1, 40, 60)]
    parts = [docs[:20], docs[20:45], docs[45:]]
    chunks = tuple(np.concatenate(p).astype(np.uint16) for p in parts)
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([np.cumsum([0] + [len(d) for d in p][:-1]) for p in parts])
    return TokenStream(
        chunks=chunks, doc_chunk=np.repeat([0, 1, 2], [len(p) for p in parts]).astype(np.int32),
        doc_offset=offsets.astype(np.int64),
        doc_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        doc_keys=np.arange(60, dtype=np.uint32),
    )


def test_batched_windows_equal_window_by_window_reads():
    """The vectorised batch read gives each window exactly as a plain slice of the stream does."""
    rng = np.random.default_rng(1)
    stream = _chunked_stream(rng).select(rng.random(60) < 0.8)
    packed = PackedWindows(stream, seq_len=16)
    ids = rng.integers(0, len(packed), 40)
    batch = packed.batch(ids)
    for row, i in enumerate(ids):
        tokens, doc_ids = stream.read(int(i) * 16, int(i) * 16 + 17)
        expected = window_records(tokens[None], doc_ids[None])
        for key in expected:
            np.testing.assert_array_equal(batch[key][row], expected[key][0], err_msg=key)
    padded = PaddedDocuments(stream, seq_len=16)
    batch = padded.batch(np.arange(len(padded)))
    row = 0
    for doc in range(stream.num_docs):  # each document cut every 16 tokens, the last piece padded
        lo, hi = int(stream.doc_starts[doc]), int(stream.doc_starts[doc + 1])
        for start in range(lo, max(hi - 1, lo + 1), 16):
            tokens, _ = stream.read(start, min(start + 17, hi))
            pad = 17 - len(tokens)
            expected = window_records(np.concatenate([tokens, np.zeros(pad, tokens.dtype)])[None],
                                      np.array([[0] * len(tokens) + [-1] * pad]))
            for key in expected:
                np.testing.assert_array_equal(batch[key][row], expected[key][0], err_msg=key)
            row += 1
    assert row == len(padded)


def test_documents_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("beta")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two", "three"])]
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2")
    docs = list(text_documents(str(tmp_path)))
    assert [d.name for d in docs] == ["a.txt", "c.jsonl:0", f"c.jsonl:{len(lines[0]) + 1}",
                                      f"c.jsonl:{len(lines[0]) + len(lines[1]) + 3}", "sub/b.py"]
    assert [d.text for d in docs] == [b"alpha", "one", "two", "three", b"beta"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: the line at byte 0 is not a JSON object "
                                          r"with a 'text' field \(data.text_field\)"):
        list(text_documents(str(tmp_path)))


def test_held_out_split_is_stable_and_never_empty():
    names = [f"doc{i}" for i in range(200)]
    keys = [document_key(n) for n in names]
    held = split_documents(keys, 0.1)
    assert 5 <= held.sum() <= 40
    # The split of a document depends on its own name only.
    np.testing.assert_array_equal(split_documents(keys[50:], 0.1), held[50:])
    assert split_documents(keys[:2], 0.001).sum() == 1


def test_text_corpus_split_by_document(tmp_path):
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 5)
    train, val = load_text_corpus(str(tmp_path), ByteTokenizer(), 0.2)
    assert train.num_docs + val.num_docs == 20 and val.num_docs >= 1
    assert set(train.doc_keys).isdisjoint(set(val.doc_keys))


def _doc_losses(model, params, batch):
    """Summed next-token loss of every (row, segment) of a batch."""
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(batch["inputs"]),
                                  jnp.asarray(batch["positions"]),
                                  jnp.asarray(batch["segment_ids"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_loss = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    token_loss = token_loss * batch["loss_mask"]
    return token_loss


@pytest.mark.parametrize("attention", ["xla", "reference"])
def test_packing_has_no_cross_document_attention(attention):
    """Every document's loss is the same packed with others as alone in its own padded row."""
    rng = np.random.default_rng(0)
    lengths = [7, 12, 4, 9]  # 32 tokens: one packed window of 31 predictions
    docs = [rng.integers(1, 64, n) for n in lengths]
    stream = TokenStream.from_documents(docs)
    cfg = tiny_model_config(attention=attention)
    model = build_model(cfg)
    packed = PackedWindows(stream, seq_len=31)
    alone = PaddedDocuments(stream, seq_len=31)
    assert len(packed) == 1 and len(alone) == len(docs)
    packed_batch = {k: v[None] for k, v in packed[0].items()}
    alone_batch = {k: np.stack([alone[i][k] for i in range(len(docs))]) for k in alone[0]}
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 31), jnp.int32))["params"]

    packed_loss = _doc_losses(model, params, packed_batch)[0]
    alone_loss = _doc_losses(model, params, alone_batch)
    seg = packed_batch["segment_ids"][0]
    per_doc_packed = [packed_loss[seg == d + 1].sum() for d in range(len(docs))]
    per_doc_alone = alone_loss.sum(axis=1)
    np.testing.assert_allclose(per_doc_packed, per_doc_alone, rtol=2e-5)
    # Each document predicts all but its last token (the next one belongs to another document).
    assert packed_batch["loss_mask"].sum() == sum(n - 1 for n in lengths)

    # The check has teeth: the same packed row without segment ids and positions mixes documents.
    leaky = _doc_losses(model, params, {**packed_batch,
                                        "segment_ids": np.ones_like(packed_batch["segment_ids"]),
                                        "positions": np.arange(31)[None]})[0]
    per_doc_leaky = [leaky[seg == d + 1].sum() for d in range(len(docs))]
    assert not np.allclose(per_doc_leaky[1:], per_doc_alone[1:], rtol=1e-3)


def _device_rows(sharding, global_shape, devices):
    """The rows a process owning `devices` would load (process_rows, for simulated processes)."""
    rows = set()
    for device, index in sharding.devices_indices_map(global_shape).items():
        if device in devices:
            rows.update(range(*index[0].indices(global_shape[0])))
    return slice(min(rows), max(rows) + 1)


RECORDS = SyntheticTokens(seq_len=16, vocab_size=64, seed=3, size=1000)


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_processes_load_disjoint_rows_that_make_the_global_batch(processes):
    sharding = _sharding()
    whole = DataPipeline(RECORDS, global_batch=16, sharding=sharding, seed=5)
    devices = list(sharding.mesh.devices.flat)
    per = len(devices) // processes
    parts = [
        DataPipeline(RECORDS, global_batch=16, sharding=sharding, seed=5,
                     rows=_device_rows(sharding, (16, 16), devices[p * per:(p + 1) * per]))
        for p in range(processes)
    ]
    assert [(p.rows.start, p.rows.stop) for p in parts] == [
        (i * 16 // processes, (i + 1) * 16 // processes) for i in range(processes)]
    for step in (0, 1, 7):
        local = [p.local_batch(step) for p in parts]
        assert all(len(x["inputs"]) == 16 // processes for x in local)
        for key, value in whole.local_batch(step).items():
            np.testing.assert_array_equal(np.concatenate([x[key] for x in local]), value)


def test_global_batch_is_assembled_with_the_batch_sharding():
    sharding = _sharding(MeshConfig(data=2, fsdp=4), "fsdp")
    pipeline = DataPipeline(RECORDS, global_batch=16, sharding=sharding, seed=1)
    batch = pipeline.batch(2)
    assert batch["inputs"].shape == (16, 16) and batch["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["targets"]),
                                  pipeline.local_batch(2)["targets"])


def _hashes(it, steps):
    out = []
    for _ in range(steps):
        out.append(row_hashes({k: np.asarray(v) for k, v in next(it).items()}))
    return out


def test_iterator_resumes_the_exact_stream_from_its_state():
    sharding = _sharding()
    pipeline = DataPipeline(RECORDS, global_batch=16, sharding=sharding, seed=9, num_threads=2)
    reference = _hashes(pipeline.iterator(), 8)
    it = pipeline.iterator()
    _hashes(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints keep it as JSON
    assert state["step"] == 3 and state["grain"] == {"next_index": 3}
    assert {"seed": 9, "global_batch": 16, "num_records": 1000}.items() <= state.items()
    # A new run, on another mesh (another device layout of the batch), continues the stream.
    other = DataPipeline(RECORDS, global_batch=16, sharding=_sharding(MeshConfig(data=2, fsdp=4)),
                         seed=9)
    resumed = other.iterator(state=state)
    assert _hashes(resumed, 5) == reference[3:]
    assert resumed.get_state()["step"] == 8
    # The plain step form (older checkpoints) is accepted too.
    old = other.iterator(state={"step": 6, "seed": 9, "global_batch": 16})
    assert _hashes(old, 2) == reference[6:]


def test_resume_fails_clearly_when_the_stream_cannot_continue():
    sharding = _sharding()
    pipeline = DataPipeline(RECORDS, global_batch=16, sharding=sharding, seed=9)
    state = pipeline.iterator(4).get_state()

    def resume(**changes):
        args = dict(records=RECORDS, global_batch=16, sharding=sharding, seed=9) | changes
        with pytest.raises(ConfigError) as info:
            DataPipeline(**args).iterator(state=state)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert resume(global_batch=32) == (
        "the data state saved at step 4 read batch_size=16 sequences per step but this run reads "
        "32: step s reads records s*batch_size to (s+1)*batch_size-1 of the stream, so the sample "
        "stream cannot continue exactly; resume with batch_size=16 (any process or device count "
        "is fine)")
    assert resume(seed=1).startswith(
        "the data state saved at step 4 was shuffled with seed=9 but this run has seed=1")
    other = SyntheticTokens(seq_len=16, vocab_size=64, seed=4, size=1000)
    assert "data.path, data.tokenizer, data.pack, data.shuffle or seq_len changed" in resume(
        records=other)
    assert "reads 1000 records" in resume(records=SyntheticTokens(16, 64, seed=3, size=999))


def test_stream_is_grains_shuffled_repeated_records():
    """Row r of step s is record s*G+r of grain's MapDataset.source(records).shuffle(seed)
    .repeat(): the definition the whole data path (and every checkpoint) relies on."""
    records = PackedWindows(_chunked_stream(np.random.default_rng(2)), seq_len=8)
    reference = grain.MapDataset.source(records).shuffle(seed=4).repeat(None)
    pipeline = DataPipeline(records, global_batch=8, sharding=_sharding(), seed=4)
    for step in (0, 3, len(records) // 8 + 1):  # the last one in the second epoch
        rows = [reference[step * 8 + r] for r in range(8)]
        for key, value in pipeline.local_batch(step).items():
            np.testing.assert_array_equal(value, np.stack([x[key] for x in rows]))


def test_epochs_reshuffle_and_cover_every_record():
    records = SyntheticTokens(seq_len=4, vocab_size=64, seed=0, size=32)
    pipeline = DataPipeline(records, global_batch=8, sharding=_sharding(), seed=2)
    seen = [row_hashes(pipeline.local_batch(s)) for s in range(8)]
    epoch1, epoch2 = sum(seen[:4], []), sum(seen[4:], [])
    everything = {row_hashes({k: v[None] for k, v in records[i].items()})[0] for i in range(32)}
    assert set(epoch1) == set(epoch2) == everything
    assert epoch1 != epoch2  # a new order every epoch


def test_sources_table_matches_the_config_choices():
    """The text sources and the image sources (`data.images`) together are the config's."""
    from jaxscale.data import images

    assert set(data_lib.SOURCES) | set(images.SOURCES) == set(config_lib.DATA_SOURCES)


def test_hf_source_reads_a_local_dataset(tmp_path):
    """data.source=hf on a local JSON-lines file (offline; `datasets` is in the dev extra)."""
    texts = [f"row {i}: " + "abc " * (i % 5 + 1) for i in range(30)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    from jaxscale.data.sources import load_hf_corpus

    train, val = load_hf_corpus(str(path), ByteTokenizer(), 0.1, text_field="body")
    got = sorted(bytes(s.document(i).astype(np.uint8)).decode()
                 for s in (train, val) for i in range(s.num_docs))
    assert got == sorted(texts) and val.num_docs >= 1
    cfg = config_lib.load("tiny", ["data.source=hf", f"data.path={path}", "data.text_field=body",
                                   "seq_len=16", "batch_size=8", "data.val_fraction=0.2"])
    train_records, _ = data_lib.SOURCES["hf"](cfg)
    assert len(train_records) > 0


@pytest.mark.parametrize("overrides, message", [
    (["data.source=shard"], "data.source='shard' is not valid; choose one of: text, shards, hf, "
                            "synthetic, addition, digits, image_folder, npz (did you mean "
                            "'shards'?)"),
    (["data.source=digits"], "data.source='digits' holds labelled images: task.name=lm reads "
                             "text from one of text, shards, hf, synthetic, addition"),
    (["data.source=shards"], "data.source='shards' needs data.path: a directory written by "
                             "`jaxscale prepare`"),
    (["data.source=hf"], "data.source='hf' needs data.path: a local data file or directory, or "
                         "a dataset name"),
    (["data.text_field=''"], "data.text_field='' must name the key that holds a document's text"),
    (["data.num_threads=0"], "data.num_threads=0 must be positive"),
    (["data.log_rows=maybe"], "data.log_rows: Value 'maybe' is not a valid bool"),
])
def test_bad_data_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_lib.load("tiny", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_shards_directory_without_manifest_fails_clearly(tmp_path):
    cfg = config_lib.load("tiny", ["data.source=shards", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"holds no manifest.json; create one with `jaxscale "
                                          r"prepare INPUT DIR`"):
        data_lib.make_pipelines(cfg, _sharding())
