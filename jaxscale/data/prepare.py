"""`jaxscale prepare`: tokenize a corpus once into memory-mapped token shards (see `shards`).

The input (a directory, file or glob of text and JSON-lines files, or a Hugging Face dataset) is
split into shard tasks by size; worker processes tokenize the tasks in parallel, each writing its
shard atomically. ``plan.json`` records the tasks and settings when the preparation starts; run the
same command again after an interruption and it checks the plan is unchanged, skips the shards that
are complete, and finishes the rest. ``manifest.json`` (counts per shard, the tokenizer's
fingerprint) is written last.

    jaxscale prepare ~/corpus data/corpus --tokenizer tok.json --workers 8
    jaxscale train --config tiny data.source=shards data.path=data/corpus data.tokenizer=tok.json
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxscale.data import shards
from jaxscale.data.documents import (
    Document,
    corpus_root,
    document_key,
    find_text_files,
    hf_documents,
    is_jsonl,
    load_hf_dataset,
    read_file_documents,
    relative_name,
)
from jaxscale.data.tokenizers import Tokenizer, load_tokenizer
from jaxscale.errors import ConfigError

PLAN = "plan.json"
PREPARE_SOURCES = ("text", "hf")
# Documents tokenized per call of a batch-capable tokenizer.
ENCODE_BATCH = 256


def _task(index: int, inputs: list[list[Any]], size: int) -> dict[str, Any]:
    return {"name": f"shard-{index:05d}", "inputs": inputs, "bytes": size}


def plan_text(path: str, shard_bytes: int) -> list[dict[str, Any]]:
    """Shard tasks over text and JSON-lines files, about `shard_bytes` of input each.

    Text files are whole documents and are grouped in order; a JSON-lines file larger than a shard
    is split into byte ranges (each line is read by the range it starts in). An input is
    ``[file, name, begin, end]``.
    """
    root = corpus_root(path)
    tasks, group, group_bytes = [], [], 0

    def flush():
        nonlocal group, group_bytes
        if group:
            tasks.append(_task(len(tasks), group, group_bytes))
        group, group_bytes = [], 0

    for file in find_text_files(path):
        size, name = file.stat().st_size, relative_name(file, root)
        if is_jsonl(file) and size > shard_bytes:
            flush()
            for begin in range(0, size, shard_bytes):
                end = min(begin + shard_bytes, size)
                tasks.append(_task(len(tasks), [[str(file), name, begin, end]], end - begin))
            continue
        group.append([str(file), name, 0, size])
        group_bytes += size
        if group_bytes >= shard_bytes:
            flush()
    flush()
    return tasks


def plan_hf(path: str, split: str, text_field: str, shard_bytes: int) -> list[dict[str, Any]]:
    """Shard tasks over contiguous row ranges of a Hugging Face dataset.

    An input is ``["hf", lo, hi, fingerprint]``, the last the dataset's own content fingerprint
    (a resumed preparation of a changed dataset is refused).
    """
    dataset = load_hf_dataset(path, split, text_field)
    rows, size = len(dataset), max(int(dataset.data.nbytes), 1)
    per_shard = max(1, math.ceil(rows * shard_bytes / size))
    fingerprint = getattr(dataset, "_fingerprint", "")
    return [
        _task(i, [["hf", lo, min(lo + per_shard, rows), fingerprint]],
              size * (min(lo + per_shard, rows) - lo) // max(rows, 1))
        for i, lo in enumerate(range(0, rows, per_shard))
    ]


def _task_documents(task: dict[str, Any], settings: dict[str, Any]) -> Iterator[Document]:
    for item in task["inputs"]:
        if item[0] == "hf":
            src = settings["source"]
            yield from hf_documents(
                src["path"], src["hf_split"], src["text_field"], range(item[1], item[2])
            )
        else:
            file, name, begin, end = item
            file = pathlib.Path(file)
            byte_range = (begin, end) if is_jsonl(file) else None
            yield from read_file_documents(file, name, settings["source"]["text_field"], byte_range)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str) -> Tokenizer:
    return load_tokenizer(name)


def _encode(tokenizer: Tokenizer, docs: list[Document]) -> list[np.ndarray]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:
        return [tokenizer.encode(d.text) for d in docs]
    texts = [d.text.decode("utf-8", errors="replace") if isinstance(d.text, bytes) else d.text
             for d in docs]
    return [ids for i in range(0, len(texts), ENCODE_BATCH)
            for ids in batch(texts[i:i + ENCODE_BATCH])]


def run_task(task: dict[str, Any], settings: dict[str, Any], out: str) -> dict[str, Any]:
    """Tokenize one task and write its shard; returns the shard's manifest entry."""
    tokenizer = _load_tokenizer(settings["tokenizer"]["name"])
    docs = list(_task_documents(task, settings))
    tokens = _encode(tokenizer, docs)
    stats = shards.write_shard(
        pathlib.Path(out), task["name"], tokens, [document_key(d.name) for d in docs],
        np.dtype(settings["dtype"]),
    )
    return {"name": task["name"], **stats}


def _check_plan(out: pathlib.Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if not path.is_file():
        shards.write_atomic(path, (json.dumps(plan, indent=1) + "\n").encode())
        return
    old = json.loads(path.read_text())
    if old != plan:
        changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise ConfigError(
            f"{out} holds a preparation with other inputs or settings (differs in: "
            f"{', '.join(changed)}); use an empty directory, or delete {out} to start over"
        )


def prepare(
    input_path: str,
    out_dir: str,
    *,
    tokenizer: str = "byte",
    source: str = "text",
    text_field: str = "text",
    hf_split: str = "train",
    shard_mb: float = 64.0,
    workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into token shards with a manifest; resumable.

    Args:
      input_path: text source: a directory, file or glob of text / JSON-lines files;
        hf source: a local data file or directory, or a dataset name.
      out_dir: where the shards, plan.json and manifest.json go.
      tokenizer: "byte" or the path of a Hugging Face tokenizer.json.
      source: "text" or "hf".
      text_field: the key of a JSON line's (or a dataset row's) text.
      hf_split: the split of a Hugging Face dataset.
      shard_mb: input megabytes per shard (about; a text file is never split).
      workers: tokenizer processes; 0 = one per CPU.
      progress: show a progress bar (None: when stderr is a terminal).

    Returns:
      The manifest (also written to ``out_dir/manifest.json``).
    """
    from tqdm import tqdm

    if source not in PREPARE_SOURCES:
        raise ConfigError(f"--source {source!r} is not valid; choose one of: "
                          f"{', '.join(PREPARE_SOURCES)}")
    if shard_mb <= 0:
        raise ConfigError(f"--shard-mb {shard_mb} must be positive")
    tok = load_tokenizer(tokenizer)
    shard_bytes = max(1, int(shard_mb * 1e6))
    tasks = (plan_text(input_path, shard_bytes) if source == "text"
             else plan_hf(input_path, hf_split, text_field, shard_bytes))
    settings = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "dtype": shards.token_dtype(tok.vocab_size).str,
        "tokenizer": {"name": tokenizer, "fingerprint": tok.fingerprint(),
                      "vocab_size": tok.vocab_size},
        "source": {"kind": source, "path": input_path, "text_field": text_field,
                   "hf_split": hf_split},
    }
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, {**settings, "shard_bytes": shard_bytes, "tasks": tasks})
    for stale in out.glob(".*.tmp*"):  # left by an interrupted run
        stale.unlink()

    dtype = np.dtype(settings["dtype"])
    done: dict[str, dict[str, Any]] = {}
    for task in tasks:
        index = shards.read_index(out, task["name"], dtype)
        if index is not None:
            done[task["name"]] = {"name": task["name"], "docs": len(index),
                                  "tokens": int(index["length"].sum())}
    todo = [t for t in tasks if t["name"] not in done]
    start = time.perf_counter()
    bar = tqdm(total=sum(t["bytes"] for t in tasks), unit="B", unit_scale=True,
               initial=sum(t["bytes"] for t in tasks if t["name"] in done),
               desc=f"prepare {len(todo)}/{len(tasks)} shards",
               disable=None if progress is None else not progress)
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    with bar:
        if workers == 1:
            for task in todo:
                done[task["name"]] = run_task(task, settings, str(out))
                bar.update(task["bytes"])
        else:
            # spawn: the parent may hold threads (tokenizers, jax) that a fork would copy mid-state
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(run_task, t, settings, str(out)): t for t in todo}
                for future in concurrent.futures.as_completed(futures):
                    entry = future.result()
                    done[entry["name"]] = entry
                    bar.update(futures[future]["bytes"])

    entries = [done[t["name"]] for t in tasks]
    manifest = {
        **settings,
        "num_shards": len(entries),
        "num_docs": sum(e["docs"] for e in entries),
        "num_tokens": sum(e["tokens"] for e in entries),
        "shards": entries,
        "prepare_seconds": round(time.perf_counter() - start, 3),
    }
    shards.write_atomic(out / shards.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest
