"""jaxscale.data.tokenizers: bytes, and a BPE trained here with the `tokenizers` library on local
text (no download), loaded from its tokenizer.json and used by the data pipeline."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import jaxscale
from jaxscale import config as config_lib
from jaxscale import data as data_lib
from jaxscale.config import ConfigError
from jaxscale.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x + 1  # ünïcode ✓\n"


def project_sources() -> list[pathlib.Path]:
    return sorted(pathlib.Path(jaxscale.__file__).parent.rglob("*.py"))


def train_bpe(path: pathlib.Path, vocab_size: int = 300) -> pathlib.Path:
    """Train a byte-level BPE on this project's own sources and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in project_sources()], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> pathlib.Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert len(ids) == len(TEXT.encode()) and tok.decode(ids) == TEXT
    np.testing.assert_array_equal(tok.encode(TEXT.encode()), ids)
    assert load_tokenizer("byte").fingerprint() == "byte"


def test_trained_bpe_from_its_file(bpe):
    tok = load_tokenizer(str(bpe))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte-level BPE is lossless
    assert 0 < ids.max() < 300
    source = project_sources()[0].read_text()
    assert len(tok.encode(source)) < 0.8 * len(source.encode())  # merges learned from the corpus
    np.testing.assert_array_equal(tok.encode_batch([TEXT, TEXT])[1], ids)
    # The fingerprint is the file's content hash: equal for a copy, different for another BPE.
    copy = bpe.parent / "copy.json"
    copy.write_bytes(bpe.read_bytes())
    assert tok.fingerprint() == load_tokenizer(str(copy)).fingerprint()
    assert tok.fingerprint().startswith("sha256:")
    other = train_bpe(bpe.parent / "other.json", vocab_size=280)
    assert load_tokenizer(str(other)).fingerprint() != tok.fingerprint()


def test_pipeline_tokenizes_text_with_the_bpe(bpe, tmp_path):
    for i, path in enumerate(project_sources()[:20]):
        (tmp_path / f"{i}.py").write_text(path.read_text())
    cfg = config_lib.load("tiny", [f"data.path={tmp_path}", f"data.tokenizer={bpe}",
                                   "model.vocab_size=300", "seq_len=32"])
    train, held_out = data_lib.SOURCES["text"](cfg)
    tok = load_tokenizer(str(bpe))
    record = train[0]
    assert record["inputs"].max() < 300
    # Each packed document's tokens are the tokenizer's encoding of some corpus file.
    first = record["inputs"][record["segment_ids"] == record["segment_ids"][0]]
    texts = [p.read_text() for p in sorted(tmp_path.iterdir())]
    assert any(first.tolist() == tok.encode(t)[:len(first)].tolist() for t in texts)
    bytes_windows = len(data_lib.SOURCES["text"](config_lib.replace(cfg, **{
        "data.tokenizer": "byte", "model.vocab_size": 300}))[0])
    assert len(train) + len(held_out) < 0.8 * bytes_windows


def test_vocab_and_missing_file_fail_clearly(bpe, tmp_path):
    cfg = config_lib.load("tiny", [f"data.path={tmp_path}", f"data.tokenizer={bpe}",
                                   "model.vocab_size=256"])
    (tmp_path / "a.txt").write_text("some text " * 100)
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than the tokenizer's "
                                          r"vocabulary \(300, data.tokenizer="):
        data_lib.SOURCES["text"](cfg)
    with pytest.raises(ConfigError, match=r"data.tokenizer='/nonexistent/tok.json': no such "
                                          r"tokenizer file"):
        load_tokenizer("/nonexistent/tok.json")
