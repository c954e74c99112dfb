"""Where documents come from: text files, JSON-lines files and Hugging Face `datasets`.

A document is a named piece of text. Its name (a file's path under the corpus root, a JSON-lines
file's path with its line number, a dataset split with its row) gives it a stable key,
`document_key`, which decides whether it is held out for evaluation: the same document lands in
the same split on every machine, whatever order or shard it is read in.

Nothing here imports jax: `jaxscale prepare` runs these readers in worker processes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import pathlib
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from jaxscale.errors import ConfigError

# Files read as JSON lines (one document per line, its text under `text_field`).
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # stable across machines: decides the held-out split
    text: str | bytes


def document_key(name: str) -> int:
    """A stable 32-bit key of a document's name (crc32)."""
    return zlib.crc32(name.encode())


def split_documents(keys: Sequence[int] | np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of held-out documents from their keys (`document_key`).

    A document is held out when its key falls in the lowest `val_fraction` of the key space, so the
    split is the same on every machine and in every shard. With a positive fraction and at least two
    documents, at least one is held out and one kept.
    """
    bucket = np.asarray(keys, dtype=np.int64) % 100_000
    held_out = bucket < int(round(val_fraction * 100_000))
    if val_fraction > 0 and len(bucket) >= 2:
        if not held_out.any():
            held_out[np.argmin(bucket)] = True
        if held_out.all():
            held_out[np.argmax(bucket)] = False
    return held_out


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_text_files() -> list[pathlib.Path]:
    """The Python standard library's own .py files: a real corpus found on every machine."""
    return sorted(p for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts)


def _is_text(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(4096)


def find_text_files(path: str) -> list[pathlib.Path]:
    """Files named by `path`: a file, a directory (searched recursively) or a glob pattern.

    "" names the Python standard library's sources. Binary files (a NUL byte in the first 4 KiB)
    are skipped.
    """
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


def corpus_root(path: str) -> pathlib.Path:
    """The directory that document names are relative to."""
    if not path:
        return stdlib_root()
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    # A glob: the directory part before the first wildcard.
    parts = []
    for part in p.parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return pathlib.Path(*parts) if parts else pathlib.Path(".")


def relative_name(file: pathlib.Path, root: pathlib.Path) -> str:
    return str(file.relative_to(root)) if file.is_relative_to(root) else str(file)


def is_jsonl(file: pathlib.Path) -> bool:
    return file.suffix.lower() in JSONL_SUFFIXES


def json_rows(path: str | pathlib.Path) -> Iterator[tuple[str, object]]:
    """(``"path:LINE"``, the decoded row) per non-blank line of a JSON-lines file (prompt and
    task files); a line that is not JSON raises a ConfigError naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not a JSON object ({e.msg})") from None


def read_file_documents(
    file: pathlib.Path,
    name: str,
    text_field: str = "text",
    byte_range: tuple[int, int] | None = None,
) -> Iterator[Document]:
    """The documents of one file: the whole file, or one per line of a JSON-lines file.

    Args:
      file: the file to read.
      name: its name under the corpus root (documents of a JSON-lines file are ``name:LINE``,
        LINE the byte offset of the line, so a line's name does not depend on how the file is
        split for parallel reading).
      text_field: the JSON key holding a line's text.
      byte_range: JSON lines only: read the lines that *start* in [begin, end).
    """
    if not is_jsonl(file):
        yield Document(name, file.read_bytes())
        return
    begin, end = byte_range or (0, file.stat().st_size)
    with open(file, "rb") as f:
        if begin > 0:
            f.seek(begin - 1)
            f.readline()  # finish the line that straddles `begin`; it belongs to the range before
        while (offset := f.tell()) < end:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{file}: the line at byte {offset} is not a JSON object with a "
                    f"{text_field!r} field (data.text_field)"
                ) from None
            yield Document(f"{name}:{offset}", text)


def text_documents(path: str, text_field: str = "text") -> Iterator[Document]:
    """Every document under `path` (see `find_text_files`), in a stable order."""
    root = corpus_root(path)
    for file in find_text_files(path):
        yield from read_file_documents(file, relative_name(file, root), text_field)


def load_hf_dataset(path: str, split: str = "train", text_field: str = "text"):
    """A Hugging Face dataset: a local data file or directory, or a name `datasets` resolves.

    Local files load with the builder their suffix names (``.jsonl``/``.json`` -> json,
    ``.parquet``, ``.csv``, ``.txt`` -> text); anything else is passed to
    `datasets.load_dataset` as is. `datasets` is optional: ``pip install 'jaxscale[hf]'``.
    """
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.source='hf' needs the 'datasets' package: pip install 'jaxscale[hf]'"
        ) from None
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                ".txt": "text"}
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        files = [p]
    else:
        files = sorted(f for f in p.glob("*") if f.is_file()) if p.is_dir() else []
    suffixes = {f.suffix.lower() for f in files}
    if files and len(suffixes) == 1 and suffixes <= set(builders):
        dataset = datasets.load_dataset(
            builders[suffixes.pop()], data_files=[str(f) for f in files], split=split
        )
    else:
        dataset = datasets.load_dataset(path, split=split)
    if text_field not in dataset.column_names:
        raise ConfigError(
            f"data.text_field={text_field!r} is not a column of data.path={path!r}; columns: "
            f"{', '.join(dataset.column_names)}"
        )
    return dataset


def hf_documents(
    path: str, split: str = "train", text_field: str = "text", rows: range | None = None
) -> Iterator[Document]:
    """The documents of a Hugging Face dataset (see `load_hf_dataset`), named ``SPLIT:ROW``."""
    dataset = load_hf_dataset(path, split, text_field)
    rows = range(len(dataset)) if rows is None else rows
    texts = dataset.select(rows)[text_field] if len(rows) else []
    for i, text in zip(rows, texts, strict=True):
        yield Document(f"{split}:{i}", text)
