"""Shared helpers for the tests (importable as `util` from any test module)."""

from __future__ import annotations

import numpy as np

from jaxscale.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer model small enough to compile in about a second."""
    base = dict(
        num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=64,
        max_seq_len=32,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_batch(batch_size: int = 16, seq_len: int = 16, vocab: int = 64, seed: int = 0) -> dict:
    """A batch of random tokens as numpy arrays: inputs and next-token targets."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len + 1))
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
    }
