"""Where tokens come from, and random-access records over them.

A corpus becomes one `TokenStream`: its documents laid end to end, read from token arrays in
memory (a tokenized text corpus) or memory-mapped from shard files (`jaxscale prepare`'s output).
Records are fixed-length windows of `seq_len + 1` tokens: `PackedWindows` cuts the stream into
windows that may span several documents (segment ids and per-document positions keep attention and
the loss inside each document), `PaddedDocuments` gives every document its own windows, padded.
Both are random-access (`len`, `[i]`), which is what grain's MapDataset needs, and read a whole
batch of windows at once (`batch(indices)`, vectorised over the rows), which is what the pipeline
uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxscale.data.documents import (
    Document,
    document_key,
    hf_documents,
    split_documents,
    text_documents,
)
from jaxscale.data.tokenizers import Tokenizer

Record = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Documents laid end to end, read from one or more token arrays.

    Document ``d`` is ``chunks[doc_chunk[d]][doc_offset[d]:doc_offset[d] + length]`` and occupies
    ``[doc_starts[d], doc_starts[d + 1])`` of the stream. Documents appear in the stream in the
    order they are stored (a chunk's documents in increasing offset), which lets a window that
    stays inside one chunk be read as a single slice.
    """

    chunks: tuple[np.ndarray, ...]  # token arrays: in memory or np.memmap of shard files
    doc_chunk: np.ndarray  # int32: the chunk holding each document
    doc_offset: np.ndarray  # int64: where each document starts in its chunk
    doc_starts: np.ndarray  # int64: each document's offset in the stream, then the stream length
    doc_keys: np.ndarray  # uint32: each document's `document_key` (decides the held-out split)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    @classmethod
    def from_documents(
        cls, docs: Sequence[np.ndarray], keys: Sequence[int] | None = None
    ) -> TokenStream:
        """A stream over token arrays in memory (empty documents are dropped)."""
        keys = np.arange(len(docs)) if keys is None else np.asarray(keys)
        kept = [i for i, d in enumerate(docs) if len(d)]
        docs = [docs[i] for i in kept]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        dtype = np.result_type(*[d.dtype for d in docs]) if docs else np.uint16
        tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(
            chunks=(tokens,),
            doc_chunk=np.zeros(len(docs), np.int32),
            doc_offset=offsets[:-1],
            doc_starts=offsets,
            doc_keys=keys[kept].astype(np.uint32) if len(kept) else np.zeros(0, np.uint32),
        )

    def select(self, mask: np.ndarray) -> TokenStream:
        """The stream of the documents where `mask` is True, in the same order."""
        lengths = np.diff(self.doc_starts)[mask]
        return TokenStream(
            chunks=self.chunks,
            doc_chunk=self.doc_chunk[mask],
            doc_offset=self.doc_offset[mask],
            doc_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_keys=self.doc_keys[mask],
        )

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream]:
        """(training, held-out) streams, split by document key (`split_documents`)."""
        held_out = split_documents(self.doc_keys, val_fraction)
        return self.select(~held_out), self.select(held_out)

    def document(self, index: int) -> np.ndarray:
        lo, hi = self.doc_starts[index], self.doc_starts[index + 1]
        return self.read(int(lo), int(hi))[0]

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens at stream `positions` (any shape) and the document index of each."""
        doc_ids = np.searchsorted(self.doc_starts, positions, side="right") - 1
        offsets = self.doc_offset[doc_ids] + (positions - self.doc_starts[doc_ids])
        if len(self.chunks) == 1:
            return np.asarray(self.chunks[0][offsets]), doc_ids
        chunk_ids = self.doc_chunk[doc_ids]
        tokens = np.empty(positions.shape, np.result_type(*[c.dtype for c in self.chunks]))
        for c in np.unique(chunk_ids):
            where = chunk_ids == c
            tokens[where] = self.chunks[c][offsets[where]]
        return tokens, doc_ids

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[lo, hi)`` of the stream and the document index of each."""
        starts = self.doc_starts
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        doc_ids = np.searchsorted(starts, np.arange(lo, hi), side="right") - 1
        chunk = self.doc_chunk[first]
        if chunk == self.doc_chunk[last] and (
            self.doc_offset[last] - self.doc_offset[first] == starts[last] - starts[first]
        ):
            begin = int(self.doc_offset[first] + lo - starts[first])
            return np.asarray(self.chunks[chunk][begin:begin + hi - lo]), doc_ids
        pieces = []
        for d in range(first, last + 1):
            a, b = max(lo, starts[d]), min(hi, starts[d + 1])
            begin = int(self.doc_offset[d] + a - starts[d])
            pieces.append(self.chunks[self.doc_chunk[d]][begin:begin + b - a])
        return np.concatenate(pieces), doc_ids


def tokenize_documents(docs: Iterable[Document], tokenizer: Tokenizer) -> TokenStream:
    """Tokenize documents into an in-memory stream that keeps each document's key."""
    tokens, keys = [], []
    for doc in docs:
        tokens.append(tokenizer.encode(doc.text))
        keys.append(document_key(doc.name))
    return TokenStream.from_documents(tokens, keys)


def load_text_corpus(
    path: str, tokenizer: Tokenizer, val_fraction: float, text_field: str = "text"
) -> tuple[TokenStream, TokenStream]:
    """Read and tokenize text (and JSON-lines) files into (train, validation) streams."""
    return tokenize_documents(text_documents(path, text_field), tokenizer).split(val_fraction)


def load_hf_corpus(
    path: str, tokenizer: Tokenizer, val_fraction: float, split: str = "train",
    text_field: str = "text",
) -> tuple[TokenStream, TokenStream]:
    """Read and tokenize a Hugging Face dataset into (train, validation) streams."""
    return tokenize_documents(hf_documents(path, split, text_field), tokenizer).split(val_fraction)


def window_records(tokens_BL: np.ndarray, doc_ids_BL: np.ndarray) -> Record:
    """inputs/targets/positions/segment_ids/loss_mask of B windows of L = T+1 tokens each.

    `doc_ids_BL` holds each token's document (-1 for padding). Targets that belong to another
    document than their input (a boundary) or to padding are masked out of the loss.
    """
    inputs, targets = tokens_BL[:, :-1], tokens_BL[:, 1:]
    doc_in, doc_out = doc_ids_BL[:, :-1], doc_ids_BL[:, 1:]
    B, T = inputs.shape
    new_segment = np.concatenate([np.ones((B, 1), bool), doc_in[:, 1:] != doc_in[:, :-1]], 1)
    segment_ids = np.cumsum(new_segment, axis=1).astype(np.int32)
    segment_ids[doc_in < 0] = 0
    index = np.arange(T)
    segment_start = np.maximum.accumulate(np.where(new_segment, index, 0), axis=1)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "positions": (index - segment_start).astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": ((doc_in == doc_out) & (doc_in >= 0)).astype(np.int32),
    }


def _one(batch: Record) -> Record:
    return {k: v[0] for k, v in batch.items()}


class _Batched:
    """Random access to `_len` records that `batch(indices)` reads or computes together."""

    _len: int

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        return _one(self.batch(np.array([index])))


class PackedWindows(_Batched):
    """Windows of T+1 tokens cut from the stream every T tokens; documents packed together."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self._len = max((stream.num_tokens - 1) // seq_len, 0)

    def batch(self, indices: np.ndarray) -> Record:
        """Windows `indices`, stacked: each field [len(indices), seq_len]."""
        starts = np.asarray(indices, np.int64) * self.seq_len
        positions = starts[:, None] + np.arange(self.seq_len + 1)
        return window_records(*self.stream.gather(positions))


class PaddedDocuments(_Batched):
    """Each document on its own: cut into windows of T+1 (every T tokens), the last one padded."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        lengths = np.diff(stream.doc_starts)
        per_doc = np.maximum((lengths - 1 + seq_len - 1) // seq_len, 1)
        self._doc = np.repeat(np.arange(stream.num_docs), per_doc)
        self._chunk = np.concatenate([np.arange(n) for n in per_doc]) if len(per_doc) else per_doc
        self._len = len(self._doc)

    def batch(self, indices: np.ndarray) -> Record:
        """Windows `indices`, stacked: each field [len(indices), seq_len]."""
        doc = self._doc[indices]
        starts = self.stream.doc_starts[doc] + self._chunk[indices] * self.seq_len
        ends = self.stream.doc_starts[doc + 1]
        positions = starts[:, None] + np.arange(self.seq_len + 1)
        valid = positions < ends[:, None]
        tokens, _ = self.stream.gather(np.minimum(positions, ends[:, None] - 1))
        tokens = np.where(valid, tokens, 0)
        return window_records(tokens, np.where(valid, 0, -1))


class SyntheticTokens(_Batched):
    """Uniformly random tokens, a pure function of (seed, index): for throughput benchmarks."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int, size: int = 1 << 30):
        self.seq_len, self.vocab_size, self.seed, self._len = seq_len, vocab_size, seed, size

    def batch(self, indices: np.ndarray) -> Record:
        tokens = np.stack([
            np.random.default_rng([self.seed, int(i)]).integers(
                0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
            for i in indices
        ])
        return window_records(tokens, np.zeros(tokens.shape, np.int64))


class SyntheticClasses(_Batched):
    """Labelled examples a fixed random linear teacher separates, a pure function of (seed,
    split, index): a classification source that needs no download.

    Every example is standard normal noise of `input_shape`; its label is the argmax of a
    teacher's scores (the teacher is drawn from `seed`), so a model can learn it exactly.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, seed: int,
                 split: int = 0, size: int = 4096):
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.seed, self.split, self._len = seed, split, size
        teacher_rng = np.random.default_rng([seed, 7919])
        self._teacher = teacher_rng.standard_normal((int(np.prod(input_shape)), num_classes))

    def batch(self, indices: np.ndarray) -> Record:
        images = np.stack([
            np.random.default_rng([self.seed, self.split, int(i)]).standard_normal(
                self.input_shape).astype(np.float32)
            for i in indices
        ])
        labels = np.argmax(images.reshape(len(indices), -1) @ self._teacher, axis=-1)
        return {"images": images, "labels": labels.astype(np.int32)}
