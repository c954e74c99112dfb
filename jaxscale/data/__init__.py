"""Data: tokenizers, sources, token shards and the grain pipeline that builds global batches.

`make_pipelines(cfg, batch_sharding)` returns the training and the evaluation pipelines for a
config; sources are a table keyed by `data.source`. Names resolve on first use, so the tokenizers,
document readers and `jaxscale prepare` work without importing jax.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jaxscale.config import Config
from jaxscale.errors import ConfigError

if TYPE_CHECKING:
    from jax.sharding import NamedSharding

    from jaxscale.data.pipeline import DataPipeline
    from jaxscale.data.sources import TokenStream

# Seed of the held-out batches: the same for every run, so eval losses compare across runs.
EVAL_SEED = 0

# public name -> module that defines it
_EXPORTS = {
    "ByteTokenizer": "jaxscale.data.tokenizers",
    "HFTokenizer": "jaxscale.data.tokenizers",
    "load_tokenizer": "jaxscale.data.tokenizers",
    "TokenStream": "jaxscale.data.sources",
    "PackedWindows": "jaxscale.data.sources",
    "PaddedDocuments": "jaxscale.data.sources",
    "SyntheticTokens": "jaxscale.data.sources",
    "AdditionWindows": "jaxscale.data.addition",
    "load_text_corpus": "jaxscale.data.sources",
    "load_hf_corpus": "jaxscale.data.sources",
    "open_shards": "jaxscale.data.shards",
    "prepare": "jaxscale.data.prepare",
    "DataIterator": "jaxscale.data.pipeline",
    "DataPipeline": "jaxscale.data.pipeline",
    "process_rows": "jaxscale.data.pipeline",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxscale.data' has no attribute {name!r}")


def _tokenizer(cfg: Config):
    from jaxscale.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})"
        )
    return tokenizer


def _windows(cfg: Config, streams: tuple[TokenStream, TokenStream]) -> tuple[Any, Any]:
    from jaxscale.data.sources import PackedWindows, PaddedDocuments

    kind = PackedWindows if cfg.data.pack else PaddedDocuments
    return kind(streams[0], cfg.seq_len), kind(streams[1], cfg.seq_len)


def _text(cfg: Config) -> tuple[Any, Any]:
    from jaxscale.data.sources import load_text_corpus

    d = cfg.data
    return _windows(cfg, load_text_corpus(d.path, _tokenizer(cfg), d.val_fraction, d.text_field))


def _hf(cfg: Config) -> tuple[Any, Any]:
    from jaxscale.data.sources import load_hf_corpus

    d = cfg.data
    streams = load_hf_corpus(d.path, _tokenizer(cfg), d.val_fraction, d.hf_split, d.text_field)
    return _windows(cfg, streams)


def _shards(cfg: Config) -> tuple[Any, Any]:
    from jaxscale.data.shards import open_shards

    tokenizer = _tokenizer(cfg)
    stream, manifest = open_shards(cfg.data.path)
    prepared = manifest["tokenizer"]
    if prepared["fingerprint"] != tokenizer.fingerprint():
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} is not the tokenizer data.path="
            f"{cfg.data.path!r} was prepared with ({prepared['name']!r}, "
            f"{prepared['fingerprint'][:19]}); set data.tokenizer to that tokenizer"
        )
    return _windows(cfg, stream.split(cfg.data.val_fraction))


def _synthetic(cfg: Config) -> tuple[Any, Any]:
    from jaxscale.data.sources import SyntheticTokens

    vocab = cfg.model.vocab_size
    return (
        SyntheticTokens(cfg.seq_len, vocab, seed=cfg.seed),
        SyntheticTokens(cfg.seq_len, vocab, seed=cfg.seed + 1),
    )


def _addition(cfg: Config) -> tuple[Any, Any]:
    from jaxscale.data.addition import HELD_OUT, TRAIN, AdditionWindows

    common = dict(seq_len=cfg.seq_len, digits=cfg.data.addition_digits,
                  val_fraction=cfg.data.val_fraction, tokenizer=_tokenizer(cfg))
    # The held-out windows do not follow the run's seed, like the held-out batches (EVAL_SEED).
    return (AdditionWindows(seed=cfg.seed, split=TRAIN, **common),
            AdditionWindows(seed=EVAL_SEED, split=HELD_OUT, **common))


# data.source -> function(cfg) -> (train records, held-out records)
SOURCES: dict[str, Callable[[Config], tuple[Any, Any]]] = {
    "text": _text,
    "shards": _shards,
    "hf": _hf,
    "synthetic": _synthetic,
    "addition": _addition,
}


def make_pipelines(
    cfg: Config, sharding: NamedSharding
) -> tuple[DataPipeline, DataPipeline]:
    """The training pipeline (shuffled with the run's seed) and the held-out one."""
    import jax

    from jaxscale.data.pipeline import DataPipeline

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
    row_log = None
    if cfg.data.log_rows:
        row_log = f"{cfg.workdir}/data_rows/process-{jax.process_index():05d}.jsonl"
    return (
        DataPipeline(train, seed=cfg.seed, shuffle=cfg.data.shuffle, row_log=row_log, **common),
        DataPipeline(held_out, seed=EVAL_SEED, shuffle=True, **common),
    )


__all__ = ["EVAL_SEED", "SOURCES", "make_pipelines", *sorted(_EXPORTS)]
