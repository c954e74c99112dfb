"""Whole checkpoints both ways: a Hugging Face directory -> a jaxscale checkpoint directory
(`hf_to_jaxscale`), and a jaxscale run or checkpoint -> a Hugging Face directory
(`jaxscale_to_hf`)."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import jaxscale
from jaxscale import config as config_lib
from jaxscale.checkpoint import load_params, read_meta, save_params
from jaxscale.config import Config, MeshConfig, ModelConfig
from jaxscale.convert.hf import (
    atomic_write,
    hf_tensors,
    load_hf_params,
    sources,
    write_safetensors,
)
from jaxscale.convert.hf_config import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    choose_architecture,
    config_from_hf,
    hf_config,
    matching_base,
)
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError

HF_CONFIG_COPY = "hf_config.json"  # the original config.json, kept beside a converted checkpoint
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _placed(model: ModelConfig, mesh_cfg: MeshConfig, rules: Any) -> tuple[Any, Any]:
    """The decoder's boxed abstract parameters and their shardings on a mesh of every device."""
    from jaxscale.models.decoder import Decoder

    if model.name != "decoder":
        raise ConfigError(f"model.name={model.name!r}: conversion reads and writes the Linen "
                          "decoder's parameters (model.name=decoder)")
    boxed = jax.eval_shape(Decoder(model).init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
    mesh = make_mesh(mesh_cfg)
    return boxed, shd.state_shardings(boxed, mesh, shd.resolve_rules(rules, mesh))


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def hf_to_jaxscale(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                   config_out: str | pathlib.Path | None = None,
                   overrides: Sequence[str] = ()) -> Config:
    """Convert a Hugging Face checkpoint into a jaxscale checkpoint directory.

    Writes to `out_dir`:
      checkpoints/0/     an orbax checkpoint: "state" holds {"params": ...}, "meta" the config,
                         step 0 and the source; `load_params` and checkpoint.init_from read it
      config.yaml        the full jaxscale config (`config_from_hf`, with `overrides`), whose
                         checkpoint.init_from is that checkpoint directory: ``jaxscale train
                         --config OUT/config.yaml workdir=...`` fine-tunes the model
      hf_config.json     the original config.json, for the way back (`jaxscale_to_hf`)
      tokenizer.json     a copy of the source's, if it has one (data.tokenizer points to it)

    The parameters are read sharded over the config's mesh (every device; override mesh.*),
    so no host holds more than its devices' shards. orbax renames the checkpoint into place
    when it is complete, the other files are replaced atomically, config.yaml last.

    Args:
      config_out: also write the config YAML here.
      overrides: ``key=value`` settings over the derived config (e.g. ``model.scan_layers=false``).

    Returns:
      The config written.
    """
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out_dir).resolve()
    has_tokenizer = (hf_dir / TOKENIZER_FILE).is_file()
    cfg = config_from_hf(hf_dir, overrides, init_from=str(out / "checkpoints"),
                         tokenizer=str(out / TOKENIZER_FILE) if has_tokenizer else None)
    boxed, shardings = _placed(cfg.model, cfg.mesh, cfg.sharding.rules)
    params = load_hf_params(hf_dir, boxed, shardings, model=cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"jaxscale_version": jaxscale.__version__, "step": 0,
            "source": str(hf_dir.resolve()), "config": config_lib.to_dict(cfg)}
    save_params(str(out / "checkpoints"), params, meta)
    if jax.process_index() == 0:
        if has_tokenizer:
            _copy(hf_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
        _copy(hf_dir / CONFIG_FILE, out / HF_CONFIG_COPY)
        text = config_lib.to_yaml(cfg)
        if config_out is not None:
            _write_text(pathlib.Path(config_out), text)
        _write_text(out / "config.yaml", text)
    return cfg


def _owner(checkpoint: pathlib.Path) -> pathlib.Path:
    """The directory that holds a checkpoint directory (or a step directory's)."""
    return checkpoint.parent.parent if (checkpoint / "state").is_dir() else checkpoint.parent


def _original_hf_config(step_dir: pathlib.Path, cfg: Config) -> dict | None:
    """The config.json the run's model came from: the hf_config.json beside its checkpoint
    directory, or that of checkpoint.init_from (``hf:DIR``'s config.json, or the copy beside
    a converted checkpoint)."""
    init = cfg.checkpoint.init_from
    places = [_owner(step_dir) / HF_CONFIG_COPY]
    if init.startswith("hf:"):
        places.append(pathlib.Path(init[3:]) / CONFIG_FILE)
    elif init:
        places.append(_owner(pathlib.Path(init)) / HF_CONFIG_COPY)
    found = next((p for p in places if p.is_file()), None)
    return None if found is None else json.loads(found.read_text())


def jaxscale_to_hf(src: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write a jaxscale model as a Hugging Face checkpoint that transformers loads.

    Args:
      src: a run's workdir (with checkpoints/), a converted directory (`hf_to_jaxscale`), a
        checkpoint directory (its latest step) or one step directory. The config is the one
        saved in the checkpoint.
      out_dir: gets model.safetensors (or shards and model.safetensors.index.json above
        `max_shard_bytes`), config.json and, when the run's data.tokenizer is a tokenizer.json,
        a copy of it.

    Tensors have the Hugging Face names, layouts and the parameters' dtype (bitwise the
    parameters' values; tied models have no lm_head.weight). config.json is the original one
    updated when the model came from Hugging Face (hf_config.json beside the checkpoint, or
    the run's checkpoint.init_from), else a fresh one for the first architecture that fits
    (Llama, Qwen2, GPT-2).

    The parameters are restored over every current device and gathered to the host one tensor
    at a time. Single-process only: the host must address every shard.

    Returns:
      The config.json written.

    Raises:
      ConfigError: a model no supported architecture fits (e.g. mixture of experts).
      CheckpointError: no checkpoint at `src`.
    """
    src, out = pathlib.Path(src), pathlib.Path(out_dir)
    if jax.process_count() > 1:
        raise ConfigError("jaxscale-to-hf runs in one process (it gathers every tensor to it)")
    ckpt = src / "checkpoints" if (src / "checkpoints").is_dir() else src
    step, meta = read_meta(str(ckpt), what="source")
    step_dir = ckpt if (ckpt / "state").is_dir() else ckpt / str(step)
    cfg = config_lib.from_dict(meta["config"])
    model = cfg.model
    base = matching_base(_original_hf_config(step_dir, cfg), model)
    arch = choose_architecture(model, base)
    boxed, shardings = _placed(model, MeshConfig(fsdp=-1), "auto")
    params = load_params(str(step_dir), boxed, shardings, what="source")
    tensors = hf_tensors(sources(arch, model, params))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors, max_shard_bytes=max_shard_bytes)
    config = hf_config(model, cfg.generate.eos_ids, base)
    _write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = pathlib.Path(cfg.data.tokenizer)
    if tokenizer.suffix == ".json" and tokenizer.is_file():
        _copy(tokenizer, out / TOKENIZER_FILE)
    return config

