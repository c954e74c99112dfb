"""Hugging Face <-> jaxscale: config.json and safetensors checkpoints in and out.

    cfg = convert.hf_to_jaxscale("llama-hf/", "llama-js/")    # config.yaml, checkpoints/0/
    convert.jaxscale_to_hf("runs/finetune", "finetuned-hf/")  # model.safetensors, config.json
    params = convert.load_hf_params("llama-hf/", abstract_params, shardings)  # sharded reads

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel
(`architectures.ARCHITECTURES`). ``checkpoint.init_from=hf:DIR`` trains from a Hugging Face
checkpoint directly. See docs/convert.md.

Modules:
  architectures.py  per-architecture config mapping and tensor tables (no jax)
  layout.py         one parameter's layout in a tensor, and the slices between them (numpy)
  hf_config.py      config.json <-> Config, the architecture-field check (no jax)
  hf.py             safetensors: sharded loading into jax arrays, writing (shards + index)
  checkpoints.py    hf_to_jaxscale, jaxscale_to_hf

Names resolve on first use, so the config side works without importing jax (the CLI validates
before jax starts).
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "ARCHITECTURES": "jaxscale.convert.architectures",
    "model_config_from_hf": "jaxscale.convert.architectures",
    "config_from_hf": "jaxscale.convert.hf_config",
    "read_hf_config": "jaxscale.convert.hf_config",
    "hf_config": "jaxscale.convert.hf_config",
    "first_difference": "jaxscale.convert.hf_config",
    "load_hf_params": "jaxscale.convert.hf",
    "write_safetensors": "jaxscale.convert.hf",
    "hf_to_jaxscale": "jaxscale.convert.checkpoints",
    "jaxscale_to_hf": "jaxscale.convert.checkpoints",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxscale.convert' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
