"""Greedy generation from a converted Hugging Face Llama equals transformers' own `generate`,
token for token, on one device and on fsdp=4 x tensor=2 (left-padded prompts of different
lengths)."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxscale.config import MeshConfig
from jaxscale.core.mesh import make_mesh
from jaxscale.generate import Generator

NEW_TOKENS = 32
PROMPTS = [[5, 17, 33, 2, 91, 64, 7], [12, 100, 3]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A small random LlamaForCausalLM (GQA 4/2, rope_theta 500000, untied, fp32) and its
    greedy continuations of PROMPTS by transformers (left padding, as jaxscale pads)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return path, out[:, width:].numpy()


@pytest.mark.parametrize("mesh", [("mesh.fsdp=1",), ("mesh.fsdp=4", "mesh.tensor=2")])
def test_greedy_generation_equals_transformers(llama, mesh):
    path, expected = llama
    one_device = make_mesh(MeshConfig(), jax.devices()[:1]) if len(mesh) == 1 else None
    gen = Generator.load(f"hf:{path}", overrides=list(mesh), mesh=one_device)
    assert gen.mesh.size == (1 if one_device else 8)
    assert gen.tokenizer is None and gen.cfg.generate.eos_ids == ()
    out = gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.stack(out.ids), expected)


def test_a_converted_checkpoint_generates_like_the_hf_directory(llama, tmp_path):
    from jaxscale import convert

    path, expected = llama
    convert.hf_to_jaxscale(path, tmp_path / "converted")
    gen = Generator.load(str(tmp_path / "converted"), overrides=["mesh.fsdp=8"])
    out = gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.stack(out.ids), expected)
