"""jaxscale.convert: Hugging Face checkpoints in and out.

Tiny randomly initialised transformers models (Llama with GQA, Llama 3 rope scaling, tied Llama,
Qwen2 with q/k/v biases, GPT-2) are saved with save_pretrained; jaxscale's logits on them equal
transformers' on one device and on fsdp=4 x tensor=2, scanned and unrolled; the way back is
bitwise; sharded loading reads slices; fine-tuning from hf: starts at transformers' loss.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
import yaml
from safetensors import safe_open

from jaxscale import config as config_lib
from jaxscale.analysis.metrics import read_jsonl
from jaxscale.checkpoint import load_params, save_params
from jaxscale.config import MeshConfig, ModelConfig
from jaxscale.convert import (
    config_from_hf,
    first_difference,
    hf_to_jaxscale,
    jaxscale_to_hf,
    load_hf_params,
    model_config_from_hf,
)
from jaxscale.convert import hf as hf_lib
from jaxscale.convert.hf_config import choose_architecture
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.data import make_pipelines
from jaxscale.errors import CheckpointError, ConfigError
from jaxscale.models.decoder import Decoder
from jaxscale.run.loop import train

transformers.logging.set_verbosity_error()

VOCAB, SEQ, BATCH = 128, 16, 4
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
HF_MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, rope_theta=500000.0)),
    "llama3_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
}
MESHES = {"one_device": (MeshConfig(), 1), "fsdp4_tensor2": (MeshConfig(fsdp=4, tensor=2), 8)}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.1^2) (norm scales 1 + that), so biases and norms all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1 if re.search(r"norm|ln_", name) and p.ndim == 1
                    and "bias" not in name else noise)
    return model.eval()


def tokens(vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (BATCH, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory, the torch model, transformers' logits on `tokens()`)."""
    out = {}
    for name, make in HF_MODELS.items():
        model = randomize(make())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        with torch.no_grad():
            logits = model(torch.tensor(tokens(), dtype=torch.long)).logits.numpy()
        out[name] = (path, model, logits)
    return out


def placement(model: ModelConfig, mesh_name: str):
    """(abstract boxed params, shardings, mesh, rules) of the decoder on a named mesh."""
    mesh_cfg, n = MESHES[mesh_name]
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    rules = shd.resolve_rules("auto", mesh)
    boxed = jax.eval_shape(Decoder(model).init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
    return boxed, shd.state_shardings(boxed, mesh, rules), mesh, rules


@functools.cache
def forward(model: ModelConfig, mesh_name: str):
    _, _, mesh, rules = placement(model, mesh_name)

    @jax.jit
    def fn(params, tokens_BT):
        with shd.activation_sharding(mesh, rules):
            return Decoder(model).apply({"params": params}, tokens_BT)

    return fn


def hf_model_config(path, **changes) -> ModelConfig:
    model, _ = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return dataclasses.replace(model, attention="xla", **changes)


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a directory's model.safetensors or of the shards its index names."""
    files = sorted(path.glob("model*.safetensors"))
    assert files, f"no safetensors in {path}"
    out = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


# --------------------------------------------------------------------------------------------
# Logits equal transformers'.


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", HF_MODELS)
def test_logits_equal_transformers(hf_models, name, scan, mesh_name):
    path, _, expected = hf_models[name]
    model = hf_model_config(path, scan_layers=scan)
    boxed, shardings, _, _ = placement(model, mesh_name)
    params = load_hf_params(path, boxed, shardings)
    logits = np.asarray(forward(model, mesh_name)(params, jnp.asarray(tokens())))
    assert np.abs(logits - expected).max() < 1e-4


def test_derived_model_configs(hf_models):
    llama = hf_model_config(hf_models["llama3_rope"][0])
    assert (llama.num_kv_heads, llama.rope_theta, llama.rope_scaling, llama.rope_factor,
            llama.rope_original_max_len, llama.norm_eps, llama.tie_embeddings) == (
        2, 500000.0, "llama3", 8.0, 16, 1e-6, False)
    qwen = hf_model_config(hf_models["qwen2"][0])
    assert (qwen.qkv_bias, qwen.use_bias) == (True, False)
    gpt2 = hf_model_config(hf_models["gpt2"][0])
    assert (gpt2.norm, gpt2.mlp, gpt2.position, gpt2.tie_embeddings, gpt2.use_bias,
            gpt2.d_ff, gpt2.max_seq_len) == ("layernorm", "gelu", "learned", True, True, 128, 32)
    cfg = config_from_hf(hf_models["gpt2"][0])
    assert cfg.generate.eos_ids == (50256,) and cfg.seq_len == 32
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.data.source) == (
        "float32", "float32", "synthetic")  # no tokenizer.json


# --------------------------------------------------------------------------------------------
# Both ways, bitwise.


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """name -> the hf_to_jaxscale output directory."""
    out = {}
    for name, (path, _, _) in hf_models.items():
        out[name] = tmp_path_factory.mktemp(f"{name}_js")
        hf_to_jaxscale(path, out[name])
    return out


@pytest.mark.parametrize("name", HF_MODELS)
def test_round_trip_is_bitwise(hf_models, converted, tmp_path, name):
    path, model, _ = hf_models[name]
    out = converted[name]
    cfg = config_lib.load(str(out / "config.yaml"))
    assert cfg.checkpoint.init_from == str(out / "checkpoints")
    assert json.loads((out / "hf_config.json").read_text()) == json.loads(
        (path / "config.json").read_text())
    written = jaxscale_to_hf(out, tmp_path / "hf")
    assert_same_tensors(read_safetensors(tmp_path / "hf"), read_safetensors(path))
    assert written == json.loads((path / "config.json").read_text())
    reloaded = type(model).from_pretrained(tmp_path / "hf")
    original = model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for key, value in reloaded.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


def test_converted_checkpoint_loads_with_load_params(hf_models, converted):
    path = hf_models["llama"][0]
    model = hf_model_config(path)
    boxed, shardings, _, _ = placement(model, "fsdp4_tensor2")
    direct = load_hf_params(path, boxed, shardings)
    restored = load_params(str(converted["llama"] / "checkpoints"), boxed, shardings)
    for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(restored),
                    strict=True):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_is_bitwise(tmp_path):
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    cfg = hf_to_jaxscale(tmp_path / "hf", tmp_path / "js")
    assert (cfg.model.param_dtype, cfg.model.dtype) == ("bfloat16", "float32")
    boxed, shardings, _, _ = placement(cfg.model, "fsdp4_tensor2")
    embed = load_hf_params(tmp_path / "hf", boxed, shardings)["embed"]["embedding"]
    assert embed.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(embed).view(np.int16),
                          model.model.embed_tokens.weight.view(torch.int16).numpy())
    jaxscale_to_hf(tmp_path / "js", tmp_path / "back")
    back = read_safetensors(tmp_path / "back")
    assert back["lm_head.weight"].dtype == np.dtype("bfloat16")
    assert_same_tensors(back, read_safetensors(tmp_path / "hf"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_checkpoints_both_ways(hf_models, tmp_path):
    path, model, expected = hf_models["llama"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / hf_lib.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg_model = hf_model_config(path)
    boxed, shardings, _, _ = placement(cfg_model, "fsdp4_tensor2")
    single, sharded = (load_hf_params(p, boxed, shardings) for p in (path, tmp_path / "sharded"))
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # ...and written sharded: shards of at most ~20 KB, an index, transformers loads it.
    hf_to_jaxscale(tmp_path / "sharded", tmp_path / "js")
    jaxscale_to_hf(tmp_path / "js", tmp_path / "out", max_shard_bytes=20_000)
    ours = json.loads((tmp_path / "out" / hf_lib.INDEX_FILE).read_text())
    files = sorted(set(ours["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "out" / hf_lib.SINGLE_FILE).exists()
    assert files == sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert ours["metadata"]["total_size"] == sum(
        x.nbytes for x in read_safetensors(tmp_path / "out").values())
    assert_same_tensors(read_safetensors(tmp_path / "out"), read_safetensors(path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = reloaded(torch.tensor(tokens(), dtype=torch.long)).logits.numpy()
    assert np.array_equal(logits, expected)


class _RecordingSlice:
    def __init__(self, name, inner, log):
        self.name, self.inner, self.log = name, inner, log

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        x = self.inner[index]
        self.log.append((self.name, x.shape))
        return x


def test_sharded_loading_reads_only_slices(hf_models, monkeypatch):
    path = hf_models["llama"][0]
    reads = []
    real = hf_lib.safe_open

    class Recording:
        def __init__(self, file, framework):
            self.inner = real(file, framework=framework)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return _RecordingSlice(name, self.handle.get_slice(name), reads)

    monkeypatch.setattr(hf_lib, "safe_open", Recording)
    model = hf_model_config(path)
    boxed, shardings, _, _ = placement(model, "fsdp4_tensor2")
    params = load_hf_params(path, boxed, shardings)
    full = read_safetensors(path)
    sharded_tensors = set()
    for source, leaf in hf_lib.sources(choose_architecture(model), model, params):
        for shard in leaf.addressable_shards:
            assert shard.data.shape == leaf.sharding.shard_shape(leaf.shape)
        if not leaf.sharding.is_fully_replicated:
            sharded_tensors |= set(source.names())
    assert len(sharded_tensors) == 16  # embed, lm_head, 2 x (q, k, v, o, gate, up, down)
    for name, shape in reads:
        if name in sharded_tensors:
            assert np.prod(shape) < full[name].size, (name, shape)
    assert {name for name, _ in reads} == set(full)


# --------------------------------------------------------------------------------------------
# A jaxscale model (no Hugging Face origin) written for transformers.

NATIVE = {
    # Llama with biases everywhere, head_dim above d_model / num_heads, linear rope scaling
    "llama_biases": dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=True,
                         head_dim=16, num_kv_heads=2, rope_scaling="linear", rope_factor=2.0),
    "qwen2_tied": dict(norm="rmsnorm", mlp="swiglu", position="rope", qkv_bias=True,
                       tie_embeddings=True, rope_theta=1e6),
    "gpt2_untied": dict(norm="layernorm", mlp="gelu", position="learned", use_bias=True,
                        num_kv_heads=0, tie_embeddings=False),
}


@pytest.mark.parametrize("name", NATIVE)
def test_jaxscale_model_loads_in_transformers(tmp_path, name):
    cfg = config_lib.load("tiny", [
        "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
        f"model.vocab_size={VOCAB}", "model.max_seq_len=32", "model.attention=xla",
        "data.source=synthetic", "seq_len=16", "generate.eos_ids=[3,5]",
        *[f"model.{k}={v}" for k, v in NATIVE[name].items()]])
    boxed, shardings, _, _ = placement(cfg.model, "one_device")
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape).astype(x.dtype)), nn.unbox(boxed))
    meta = {"config": config_lib.to_dict(cfg), "step": 0}
    head = params.get("lm_head", {})
    if "bias" in head:  # model.use_bias gives the untied head a bias Hugging Face's lacks
        save_params(str(tmp_path / "nonzero"), params, meta)
        with pytest.raises(CheckpointError, match=re.escape(
                "parameter 'lm_head/bias' is not zero, and Hugging Face's model has no such "
                "tensor (its lm_head has no bias)")):
            jaxscale_to_hf(tmp_path / "nonzero", tmp_path / "unwritten")
        head["bias"] = jnp.zeros_like(head["bias"])
    save_params(str(tmp_path / "ckpt"), params, meta)
    written = jaxscale_to_hf(tmp_path / "ckpt" / "0", tmp_path / "hf")
    assert written["eos_token_id"] == [3, 5]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == written["architectures"][0]
    with torch.no_grad():
        expected = reloaded(torch.tensor(tokens(), dtype=torch.long)).logits.numpy()
    logits = np.asarray(forward(cfg.model, "one_device")(params, jnp.asarray(tokens())))
    assert np.abs(logits - expected).max() < 1e-4
    assert first_difference(hf_model_config(tmp_path / "hf"), cfg.model) is None


def test_a_model_no_architecture_fits_is_one_line():
    with pytest.raises(ConfigError) as e:
        choose_architecture(ModelConfig(norm="layernorm", mlp="swiglu"))
    assert str(e.value) == (
        "the model (norm=layernorm, mlp=swiglu, position=rope, use_bias=False, qkv_bias=False, "
        "moe.num_experts=0) fits no supported Hugging Face architecture: LlamaForCausalLM needs "
        "model.norm=rmsnorm; Qwen2ForCausalLM needs q/k/v biases only (model.qkv_bias=true, "
        "model.use_bias=false); GPT2LMHeadModel needs model.mlp=gelu")
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no mixture-of-experts layers"):
        choose_architecture(config_lib.load("tiny-moe").model)


# --------------------------------------------------------------------------------------------
# Fine-tuning from hf:.


def test_finetune_from_hf_starts_at_the_transformers_loss(tmp_path):
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**LLAMA, "vocab_size": 256}, rope_theta=500000.0)))
    model.save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(pathlib.Path(config_lib.__file__).parent.rglob("*.py"))
    for i, source in enumerate(sources):  # 20 to 120 bytes: many windows end in padding
        (corpus / f"doc{i}.txt").write_text(source.read_text()[:20 + 37 * i % 100])
    overrides = ["steps=5", f"batch_size={2 * BATCH}", f"seq_len={SEQ}", "data.source=text",
                 f"data.path={corpus}", "data.tokenizer=byte", "data.pack=false",
                 f"workdir={tmp_path / 'run'}", "log_every=1", "eval_every=0", "eval_batches=1",
                 "progress=false", f"checkpoint.init_from=hf:{tmp_path / 'hf'}"]
    cfg = config_from_hf(tmp_path / "hf", overrides)
    state = train(cfg)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert int(state.step) == 5 and len(losses) == 5

    sharding = jax.sharding.NamedSharding(make_mesh(MeshConfig(), jax.devices()[:1]),
                                          jax.sharding.PartitionSpec())
    batch = make_pipelines(cfg, sharding)[0].local_batch(0)
    with torch.no_grad():
        logits = model(torch.tensor(batch["inputs"], dtype=torch.long),
                       position_ids=torch.tensor(batch["positions"], dtype=torch.long)).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                           torch.tensor(batch["targets"].reshape(-1),
                                                        dtype=torch.long), reduction="none")
    mask = torch.tensor(batch["loss_mask"].reshape(-1), dtype=torch.float32)
    assert 0 < mask.sum() < mask.numel()  # padding is masked out
    expected = float((ce * mask).sum() / mask.sum())
    assert abs(losses[0] - expected) / expected < 1e-4

    # The fine-tuned run goes back to a Hugging Face directory with the original's config.
    jaxscale_to_hf(tmp_path / "run", tmp_path / "finetuned")
    assert json.loads((tmp_path / "finetuned" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())
    tuned = read_safetensors(tmp_path / "finetuned")
    params = jax.device_get(state.params)
    assert np.array_equal(tuned["model.layers.1.mlp.down_proj.weight"],
                          np.asarray(params["layers"]["mlp"]["wo"]["kernel"][1]).T)


def test_init_from_hf_checks_the_model(hf_models, tmp_path):
    path = hf_models["llama"][0]
    cfg = config_from_hf(path, [f"workdir={tmp_path}", "model.num_layers=3",
                                f"checkpoint.init_from=hf:{path}", "steps=1", "seq_len=16",
                                "batch_size=8", "progress=false"])
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    assert str(e.value) == (
        f"checkpoint.init_from='hf:{path}' does not fit the model: its config.json gives "
        "model.num_layers=2, the run has model.num_layers=3")


# --------------------------------------------------------------------------------------------
# Bad inputs: one line each.


def _hf_copy(src: pathlib.Path, dst: pathlib.Path, *, drop: str = "", config: dict | None = None,
             rename: tuple[str, str] | None = None, add: dict | None = None) -> pathlib.Path:
    """A copy of a Hugging Face directory, without tensor `drop`, with config.json changes,
    with a prefix of every tensor name replaced, or with tensors added."""
    dst.mkdir()
    tensors = {k: v for k, v in read_safetensors(src).items() if k != drop}
    if rename:
        tensors = {k.replace(*rename, 1): v for k, v in tensors.items()}
    tensors |= add or {}
    safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"),
                                metadata={"format": "pt"})
    hf = json.loads((src / "config.json").read_text()) | (config or {})
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def test_gpt2_reads_names_without_the_transformer_prefix(hf_models, tmp_path):
    path = hf_models["gpt2"][0]
    mask = np.tril(np.ones((1, 1, 32, 32), bool))  # the causal-mask buffers old versions saved
    bare = _hf_copy(path, tmp_path / "bare", rename=("transformer.", ""),
                    add={"h.0.attn.bias": mask, "h.0.attn.masked_bias": np.float32([-1e4])})
    assert "wte.weight" in read_safetensors(bare)
    model = hf_model_config(path)
    boxed, shardings, _, _ = placement(model, "fsdp4_tensor2")
    for a, b in zip(*(jax.tree_util.tree_leaves(load_hf_params(p, boxed, shardings))
                      for p in (path, bare)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _load(path: pathlib.Path):
    model = hf_model_config(path)
    boxed, shardings, _, _ = placement(model, "one_device")
    return load_hf_params(path, boxed, shardings)


def test_missing_tensor_is_named(hf_models, tmp_path):
    bad = _hf_copy(hf_models["llama"][0], tmp_path / "bad",
                   drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError) as e:
        _load(bad)
    assert str(e.value) == (f"Hugging Face checkpoint '{bad}': tensor "
                            "'model.layers.1.mlp.up_proj.weight' is missing (parameter "
                            "'layers/mlp/wi_up/kernel' reads it)")


def test_shape_mismatch_names_the_tensor_and_both_shapes(hf_models, tmp_path):
    path = hf_models["llama"][0]
    bad = _hf_copy(path, tmp_path / "bad", config={"intermediate_size": 48})
    model = hf_model_config(bad)
    boxed, shardings, _, _ = placement(model, "one_device")
    with pytest.raises(CheckpointError) as e:
        load_hf_params(bad, boxed, shardings, what="checkpoint.init_from")
    assert str(e.value) == (f"checkpoint.init_from='hf:{bad}': tensor "
                            "'model.layers.0.mlp.gate_proj.weight' has shape [64, 32] but the "
                            "model expects [48, 32] (parameter 'layers/mlp/wi_gate/kernel')")


def test_unexpected_tensor_is_named(hf_models, tmp_path):
    path = hf_models["llama"][0]
    tied = _hf_copy(path, tmp_path / "tied", config={"tie_word_embeddings": True})
    _load(tied)  # a tied checkpoint that still holds lm_head.weight: it is ignored
    bad = _hf_copy(path, tmp_path / "bad",
                   add={"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(CheckpointError) as e:
        _load(bad)
    assert str(e.value) == (f"Hugging Face checkpoint '{bad}': tensor "
                            "'model.layers.0.self_attn.o_proj.bias' has no place in the "
                            "LlamaForCausalLM model its config.json describes")


def test_missing_files_are_one_line(hf_models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as e:
        hf_to_jaxscale(empty, tmp_path / "out")
    assert str(e.value) == (f"Hugging Face checkpoint '{empty}' has no config.json (a Hugging "
                            "Face model directory holds config.json and model.safetensors)")
    shutil.copy(hf_models["llama"][0] / "config.json", empty)
    with pytest.raises(CheckpointError) as e:
        hf_to_jaxscale(empty, tmp_path / "out")
    assert str(e.value) == (f"Hugging Face checkpoint '{empty}' has no model.safetensors or "
                            "model.safetensors.index.json (only safetensors checkpoints are "
                            "read: save_pretrained(..., safe_serialization=True))")
    with pytest.raises(CheckpointError, match=re.escape("'hf:/nonexistent': no such directory")):
        load_hf_params("/nonexistent", {}, {}, what="checkpoint.init_from")


LLAMA_JSON = {"architectures": ["LlamaForCausalLM"], **LLAMA}


@pytest.mark.parametrize("hf, line", [
    ({"architectures": ["BertForMaskedLM"]},
     "config.json: architectures ['BertForMaskedLM'] is not supported; supported: "
     "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ({**LLAMA_JSON, "attention_bias": True},
     "config.json: attention_bias=True is not supported (jaxscale has biases in every dense "
     "layer (attention_bias and mlp_bias both true) or in none)"),
    ({**LLAMA_JSON, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "config.json: rope_type='yarn' is not supported (supported: default, linear, llama3)"),
    ({**LLAMA_JSON, "hidden_act": "gelu"},
     "config.json: hidden_act='gelu' is not supported (jaxscale's swiglu MLP is silu-gated)"),
    ({**LLAMA_JSON, "architectures": ["MistralForCausalLM"], "sliding_window": 32},
     "config.json: sliding_window=32 is not supported (below max_position_embeddings=64; "
     "jaxscale attends over the whole context)"),
    ({**LLAMA_JSON, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "config.json: use_sliding_window=True is not supported (jaxscale attends over the whole "
     "context)"),
    ({"architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 4,
      "vocab_size": 128, "n_positions": 32, "scale_attn_by_inverse_layer_idx": True},
     "config.json: scale_attn_by_inverse_layer_idx=True is not supported (jaxscale's attention "
     "has no such option)"),
    ({"architectures": ["GPT2LMHeadModel"], "activation_function": "relu"},
     "config.json: activation_function='relu' is not supported (jaxscale's gelu is the tanh "
     "approximation: gelu_new, gelu_pytorch_tanh)"),
    ({**LLAMA_JSON, "torch_dtype": "float64"},
     "config.json: dtype='float64' is not supported (jaxscale stores float32, bfloat16, "
     "float16)"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 32},
     "config.json: LlamaForCausalLM needs the key 'num_attention_heads'"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_configs_are_one_line(hf, line):
    with pytest.raises(ConfigError) as e:
        model_config_from_hf(hf)
    assert str(e.value) == line


def test_mistral_without_a_window_reads_like_llama():
    model, extra = model_config_from_hf({**LLAMA_JSON, "architectures": ["MistralForCausalLM"],
                                         "sliding_window": None, "eos_token_id": [1, 2]})
    assert model == model_config_from_hf(LLAMA_JSON)[0] and extra["eos_ids"] == (1, 2)


# --------------------------------------------------------------------------------------------
# The command line.


def test_cli_converts_both_ways(hf_models, tmp_path):
    path = hf_models["qwen2"][0]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "jaxscale.cli", "convert", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = run("hf-to-jaxscale", str(path), str(tmp_path / "js"), "--cpu-devices", "2",
                    "--config-out", str(tmp_path / "model.yaml"), "model.scan_layers=false")
    assert code == 0, out
    assert (tmp_path / "js" / "checkpoints" / "0" / "state").is_dir()
    written = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert written == yaml.safe_load((tmp_path / "js" / "config.yaml").read_text())
    assert written["model"]["scan_layers"] is False and written["model"]["qkv_bias"] is True
    code, out = run("jaxscale-to-hf", str(tmp_path / "js"), str(tmp_path / "hf"))
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors"]
    assert_same_tensors(read_safetensors(tmp_path / "hf"), read_safetensors(path))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jaxscale import cli

    assert cli.main(["convert", "hf-to-jaxscale", str(tmp_path / "none"), str(tmp_path)]) == 6
    assert capsys.readouterr().err == (f"jaxscale: error: Hugging Face checkpoint "
                                       f"'{tmp_path / 'none'}': no such directory\n")
    assert cli.main(["convert", "jaxscale-to-hf", str(tmp_path), str(tmp_path), "x=1"]) == 2
    assert "unrecognized argument 'x=1'" in capsys.readouterr().err
