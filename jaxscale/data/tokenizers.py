"""Tokenizers: bytes (no files needed) and any Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Protocol

import numpy as np

from jaxscale.config import ConfigError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray) -> str: ...

    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, lossless."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a local tokenizer.json."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ConfigError(
                f"data.tokenizer={path!r} needs the 'tokenizers' package: pip install "
                "'jaxscale[hf]'"
            ) from None
        file = pathlib.Path(path)
        if not file.is_file():
            raise ConfigError(f"data.tokenizer={path!r}: no such tokenizer file")
        self._tok = _Tokenizer.from_file(str(file))
        self._bytes = file.read_bytes()
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self._bytes).hexdigest()


def load_tokenizer(name: str) -> Tokenizer:
    """`byte`, or the path of a tokenizer.json."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)
