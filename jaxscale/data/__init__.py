"""Data: tokenizers, sources and the grain pipeline that builds global batches.

`make_pipelines(cfg, batch_sharding)` returns the training and the evaluation pipelines for a
config; sources are a table keyed by `data.source`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax.sharding import NamedSharding

from jaxscale.config import Config, ConfigError
from jaxscale.data.pipeline import DataIterator, DataPipeline, process_rows
from jaxscale.data.sources import (
    PackedWindows,
    PaddedDocuments,
    SyntheticTokens,
    TokenStream,
    load_text_corpus,
)
from jaxscale.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

# Seed of the held-out batches: the same for every run, so eval losses compare across runs.
EVAL_SEED = 0


def _windows(cfg: Config, stream: TokenStream):
    return (PackedWindows if cfg.data.pack else PaddedDocuments)(stream, cfg.seq_len)


def _text(cfg: Config) -> tuple[Any, Any]:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})"
        )
    train, val = load_text_corpus(cfg.data.path, tokenizer, cfg.data.val_fraction)
    return _windows(cfg, train), _windows(cfg, val)


def _synthetic(cfg: Config) -> tuple[Any, Any]:
    vocab = cfg.model.vocab_size
    return (
        SyntheticTokens(cfg.seq_len, vocab, seed=cfg.seed),
        SyntheticTokens(cfg.seq_len, vocab, seed=cfg.seed + 1),
    )


# data.source -> function(cfg) -> (train records, held-out records)
SOURCES: dict[str, Callable[[Config], tuple[Any, Any]]] = {
    "text": _text,
    "synthetic": _synthetic,
}


def make_pipelines(cfg: Config, sharding: NamedSharding) -> tuple[DataPipeline, DataPipeline]:
    """The training pipeline (shuffled with the run's seed) and the held-out one."""
    if cfg.data.source not in SOURCES:
        raise ConfigError(
            f"data.source={cfg.data.source!r} is not valid; choose one of: {', '.join(SOURCES)}"
        )
    train, held_out = SOURCES[cfg.data.source](cfg)
    if len(train) == 0:
        raise ConfigError(
            f"data.path={cfg.data.path!r} yields no training sequence of seq_len={cfg.seq_len}"
        )
    if len(held_out) == 0:
        raise ConfigError(
            f"data.path={cfg.data.path!r} yields no held-out sequence (data.val_fraction="
            f"{cfg.data.val_fraction}); add documents or raise data.val_fraction"
        )
    common = dict(
        global_batch=cfg.batch_size, sharding=sharding, num_threads=cfg.data.num_threads,
        prefetch=cfg.data.prefetch,
    )
    return (
        DataPipeline(train, seed=cfg.seed, shuffle=cfg.data.shuffle, **common),
        DataPipeline(held_out, seed=EVAL_SEED, shuffle=True, **common),
    )


__all__ = [
    "SOURCES", "ByteTokenizer", "DataIterator", "DataPipeline", "HFTokenizer", "PackedWindows",
    "PaddedDocuments", "SyntheticTokens", "TokenStream", "load_text_corpus", "load_tokenizer",
    "make_pipelines", "process_rows",
]
