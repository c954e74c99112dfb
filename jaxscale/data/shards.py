"""The on-disk format of a tokenized corpus: memory-mapped token shards, their index, a manifest.

A prepared directory holds, for each shard ``shard-NNNNN``:

  shard-NNNNN.tokens      the shard's documents' tokens, end to end: raw little-endian uint16
                          (vocabularies up to 65,536) or uint32, read with `np.memmap`
  shard-NNNNN.index.npy   one row per document: ``start`` (int64 offset in the tokens file),
                          ``length`` (int64) and ``key`` (uint32 `document_key` of its name)

and once every shard is written, ``manifest.json``: the format version, the token dtype, the
tokenizer (name, fingerprint, vocabulary size), per-shard document and token counts, and totals.
The manifest is written last, so its presence means the directory is complete. Nothing here
depends on the sequence length: packing into windows happens when training reads the shards.

Why raw token files and not ArrayRecord: training packs documents into windows that cross document
and record boundaries; a flat token file serves any window as one slice of a memory map (no
decoding, no copy until the window is cut), whatever `seq_len` is, and the OS page cache shares it
between grain's reader threads and between processes on a host. ArrayRecord stores variable-size
serialized records with compression and shines for examples that are read whole; here it would add
a deserialisation per document and a second index to find the documents a window spans.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from jaxscale.data.sources import TokenStream
from jaxscale.errors import ConfigError

FORMAT = "jaxscale-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype([("start", "<i8"), ("length", "<i8"), ("key", "<u4")])


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokens_path(directory: pathlib.Path, name: str) -> pathlib.Path:
    return directory / f"{name}.tokens"


def index_path(directory: pathlib.Path, name: str) -> pathlib.Path:
    return directory / f"{name}.index.npy"


def _tmp(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write then rename: readers see the whole file or none of it."""
    tmp = _tmp(path)
    tmp.write_bytes(data)
    tmp.replace(path)


def write_shard(
    directory: pathlib.Path, name: str, docs: list[np.ndarray], keys: list[int], dtype: np.dtype
) -> dict[str, int]:
    """Write one shard (tokens first, the index last: the index marks the shard complete).

    Returns:
      ``{"docs": ..., "tokens": ...}`` of the shard.
    """
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    index = np.zeros(len(docs), INDEX_DTYPE)
    index["length"] = lengths
    index["start"] = np.cumsum(lengths) - lengths
    index["key"] = np.asarray(keys, dtype=np.uint32)
    tokens = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    target = tokens_path(directory, name)
    tmp = _tmp(target)
    tokens.tofile(tmp)
    tmp.replace(target)
    target = index_path(directory, name)
    tmp = _tmp(target)
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, index)
    tmp.replace(target)
    return {"docs": len(docs), "tokens": int(lengths.sum())}


def read_index(directory: pathlib.Path, name: str, dtype: np.dtype) -> np.ndarray | None:
    """A complete shard's index, or None when the shard is missing or was cut short."""
    try:
        index = np.load(index_path(directory, name))
        size = tokens_path(directory, name).stat().st_size
    except (OSError, ValueError):
        return None
    if index.dtype != INDEX_DTYPE or size != int(index["length"].sum()) * dtype.itemsize:
        return None
    return index


def read_manifest(directory: str | os.PathLike, key: str = "data.path") -> dict[str, Any]:
    """The manifest of a prepared directory; ConfigError naming `key` if there is none."""
    path = pathlib.Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        hint = (" (preparation unfinished: run `jaxscale prepare` again to complete it)"
                if (path.parent / "plan.json").is_file() else
                "; create one with `jaxscale prepare INPUT DIR`")
        raise ConfigError(f"{key}={str(directory)!r} holds no {MANIFEST}{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise ConfigError(
            f"{key}={str(directory)!r}: {MANIFEST} is not a version <= {VERSION} {FORMAT} manifest"
        )
    return manifest


def open_shards(directory: str | os.PathLike) -> tuple[TokenStream, dict[str, Any]]:
    """Memory-map a prepared directory's shards as one TokenStream; returns it and the manifest.

    The stream holds every document (the held-out split is made from the documents' keys, see
    `TokenStream.split`). Token files are mapped, not read: only the windows a process loads are
    paged in.
    """
    root = pathlib.Path(directory).expanduser()
    manifest = read_manifest(root)
    dtype = np.dtype(manifest["dtype"])
    chunks, doc_chunk, doc_offset, lengths, keys = [], [], [], [], []
    for shard in manifest["shards"]:
        if shard["tokens"] == 0:
            continue
        index = np.load(index_path(root, shard["name"]))
        file = tokens_path(root, shard["name"])
        if file.stat().st_size != shard["tokens"] * dtype.itemsize or len(index) != shard["docs"]:
            raise ConfigError(
                f"data.path={str(directory)!r}: {file.name} does not match {MANIFEST} (the "
                "directory was changed after preparation); prepare it again"
            )
        doc_chunk.append(np.full(len(index), len(chunks), np.int32))
        chunks.append(np.memmap(file, dtype=dtype, mode="r"))
        doc_offset.append(index["start"])
        lengths.append(index["length"])
        keys.append(index["key"])

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    lengths = cat(lengths, np.int64)
    keep = lengths > 0
    stream = TokenStream(
        chunks=tuple(chunks),
        doc_chunk=cat(doc_chunk, np.int32)[keep],
        doc_offset=cat(doc_offset, np.int64)[keep],
        doc_starts=np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64),
        doc_keys=cat(keys, np.uint32)[keep],
    )
    return stream, manifest
