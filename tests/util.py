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


def small_lm_overrides(*, seq_len: int, batch_size: int, vocab: int = 64,
                       max_seq_len: int = 32) -> list[str]:
    """Config overrides for a 2-layer decoder trained by plain SGD on synthetic data: the settings
    the end-to-end equality tests share (constant learning rate, no clipping or decay)."""
    return ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
            "model.d_ff=64", f"model.vocab_size={vocab}", f"model.max_seq_len={max_seq_len}",
            f"seq_len={seq_len}", f"batch_size={batch_size}", "optim.name=sgd", "optim.lr=0.5",
            "optim.momentum=0.9", "optim.weight_decay=0", "optim.clip_norm=0",
            "optim.warmup_steps=0", "optim.schedule=constant", "data.source=synthetic"]


def full_lm_batch(step: int, batch_size: int, seq_len: int, vocab: int = 64) -> dict:
    """Random tokens with every LM field: one document per row, every target counted."""
    tokens = np.random.default_rng(step).integers(0, vocab, (batch_size, seq_len + 1))
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (batch_size, seq_len)).copy(),
            "segment_ids": ones, "loss_mask": ones}


def assert_trees_close(actual, desired, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same tree structure, and every leaf allclose (the failing leaf's path in the message)."""
    import jax

    from jaxscale.core.trees import path_str

    flat, tree = jax.tree_util.tree_flatten_with_path(actual)
    ref_flat, ref_tree = jax.tree_util.tree_flatten_with_path(desired)
    assert tree == ref_tree
    for (path, a), (_, b) in zip(flat, ref_flat, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path_str(path))


def build_on(overrides, devices=None, model=None):
    """The `tiny` preset with `overrides`, built on its `mesh` over `devices` (default: all)."""
    from jaxscale import config as config_lib
    from jaxscale.core.mesh import make_mesh
    from jaxscale.run.build import build

    cfg = config_lib.load("tiny", list(overrides))
    return build(cfg, model, mesh=make_mesh(cfg.mesh, devices=devices))


def train_steps(run, n: int = 3):
    """`n` steps of `run` from its initial state on its task's training batches, one fixed rng:
    (the final state on the host, each step's loss)."""
    import jax

    pipeline, _ = run.task.pipelines(run.cfg, run.batch_shardings)
    state, losses = run.init_state(), []
    for step in range(n):
        state, metrics = run.train_step(state, pipeline.batch(step), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses
