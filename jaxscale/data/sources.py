"""Where tokens come from: text files, synthetic tokens, and random-access records over them.

A corpus is read into one `TokenStream` (all documents concatenated, with their start offsets).
Records are fixed-length windows of `seq_len + 1` tokens: `PackedWindows` cuts the stream into
windows that may span several documents (segment ids and per-document positions keep attention and
the loss inside each document), `PaddedDocuments` gives every document its own windows, padded.
Both are random-access (`len`, `[i]`), which is what grain's MapDataset needs.
"""

from __future__ import annotations

import dataclasses
import glob
import pathlib
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np

from jaxscale.config import ConfigError
from jaxscale.data.tokenizers import Tokenizer

Record = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # every document's tokens, concatenated
    doc_starts: np.ndarray  # int64 offset of each document in `tokens`, then len(tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @classmethod
    def from_documents(cls, docs: Sequence[np.ndarray]) -> TokenStream:
        docs = [d for d in docs if len(d)]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        dtype = np.result_type(*[d.dtype for d in docs]) if docs else np.uint16
        tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
        return cls(tokens=tokens, doc_starts=starts)


def stdlib_text_files() -> list[pathlib.Path]:
    """The Python standard library's own .py files: a real corpus found on every machine."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _is_text(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(4096)


def find_text_files(path: str) -> list[pathlib.Path]:
    """Files named by `path`: a file, a directory (searched recursively) or a glob pattern."""
    if not path:
        return stdlib_text_files()
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        files = sorted(pathlib.Path(f) for f in glob.glob(str(p), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise ConfigError(f"data.path={path!r} matches no file or directory")
    files = [f for f in files if _is_text(f)]
    if not files:
        raise ConfigError(f"data.path={path!r} holds no text files")
    return files


def split_documents(names: Sequence[str], val_fraction: float) -> np.ndarray:
    """Boolean mask of held-out documents, stable across runs and machines (a hash of the name).

    With a positive fraction and at least two documents, at least one is held out and one kept.
    """
    bucket = np.array([zlib.crc32(n.encode()) % 100_000 for n in names], dtype=np.int64)
    held_out = bucket < int(round(val_fraction * 100_000))
    if val_fraction > 0 and len(names) >= 2:
        if not held_out.any():
            held_out[np.argmin(bucket)] = True
        if held_out.all():
            held_out[np.argmax(bucket)] = False
    return held_out


def load_text_corpus(
    path: str, tokenizer: Tokenizer, val_fraction: float
) -> tuple[TokenStream, TokenStream]:
    """Read and tokenize text files into (train, validation) streams, split by document."""
    files = find_text_files(path)
    root = pathlib.Path(path).expanduser() if path else pathlib.Path(sysconfig.get_paths()["stdlib"])
    names = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
    docs = [tokenizer.encode(f.read_bytes()) for f in files]
    held_out = split_documents(names, val_fraction)
    train = TokenStream.from_documents([d for d, h in zip(docs, held_out) if not h])
    val = TokenStream.from_documents([d for d, h in zip(docs, held_out) if h])
    return train, val


def _window_record(tokens: np.ndarray, doc_ids: np.ndarray) -> Record:
    """inputs/targets/positions/segment_ids/loss_mask of one window of T+1 tokens.

    `doc_ids` holds each token's document (-1 for padding). Targets that belong to another
    document than their input (a boundary) or to padding are masked out of the loss.
    """
    inputs, targets = tokens[:-1], tokens[1:]
    doc_in, doc_out = doc_ids[:-1], doc_ids[1:]
    new_segment = np.concatenate([[True], doc_in[1:] != doc_in[:-1]])
    segment_ids = np.cumsum(new_segment).astype(np.int32)
    segment_ids[doc_in < 0] = 0
    starts = np.flatnonzero(new_segment)
    positions = (np.arange(len(inputs)) - starts[np.cumsum(new_segment) - 1]).astype(np.int32)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": ((doc_in == doc_out) & (doc_in >= 0)).astype(np.int32),
    }


class PackedWindows:
    """Windows of T+1 tokens cut from the stream every T tokens; documents packed together."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self._len = max((len(stream.tokens) - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        start = int(index) * self.seq_len
        span = np.arange(start, start + self.seq_len + 1)
        doc_ids = np.searchsorted(self.stream.doc_starts, span, side="right") - 1
        return _window_record(self.stream.tokens[span], doc_ids)


class PaddedDocuments:
    """Each document on its own: cut into windows of T+1 (every T tokens), the last one padded."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        lengths = np.diff(stream.doc_starts)
        per_doc = np.maximum((lengths - 1 + seq_len - 1) // seq_len, 1)
        self._doc = np.repeat(np.arange(stream.num_docs), per_doc)
        self._chunk = np.concatenate([np.arange(n) for n in per_doc]) if len(per_doc) else per_doc

    def __len__(self) -> int:
        return len(self._doc)

    def __getitem__(self, index: int) -> Record:
        doc, chunk = int(self._doc[index]), int(self._chunk[index])
        lo, hi = self.stream.doc_starts[doc], self.stream.doc_starts[doc + 1]
        start = lo + chunk * self.seq_len
        piece = self.stream.tokens[start:min(start + self.seq_len + 1, hi)]
        pad = self.seq_len + 1 - len(piece)
        tokens = np.concatenate([piece, np.zeros(pad, piece.dtype)])
        doc_ids = np.concatenate([np.zeros(len(piece), np.int64), np.full(pad, -1)])
        return _window_record(tokens, doc_ids)


class SyntheticTokens:
    """Uniformly random tokens, a pure function of (seed, index): for throughput benchmarks."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int, size: int = 1 << 30):
        self.seq_len, self.vocab_size, self.seed, self._len = seq_len, vocab_size, seed, size

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        rng = np.random.default_rng([self.seed, int(index)])
        tokens = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
        return _window_record(tokens, np.zeros(self.seq_len + 1, np.int64))
