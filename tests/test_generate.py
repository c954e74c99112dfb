"""Generation: the key/value cache reproduces the full forward pass, greedy decoding equals the
argmax of repeated full passes on any mesh, sampling is reproducible by seed across meshes, the
samplers keep to their supports, and bad prompts fail in one line."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale import config as config_lib
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError
from jaxscale.generate import Generator, left_pad, read_prompts, sample_logits
from jaxscale.models.decoder import Decoder

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "model.vocab_size=64", "model.max_seq_len=48", "seq_len=16",
         "data.source=synthetic"]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], list(range(20, 37))]  # 5, 2 and 17 tokens


def _config(*overrides):
    return config_lib.load("tiny", SMALL + list(overrides))


def _params(cfg):
    variables = Decoder(cfg.model).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    return nn.unbox(variables["params"])


def _generator(cfg, params, devices):
    return Generator(cfg, params, make_mesh(cfg.mesh, jax.devices()[:devices]))


def _greedy_by_full_passes(cfg, params, prompt, steps):
    """Greedy continuation by a full causal pass over the sequence so far for every token (in
    a fixed buffer: the positions after the last token do not change its logits)."""
    forward = jax.jit(lambda p, t: Decoder(cfg.model).apply({"params": p}, t))
    seq = np.zeros((1, cfg.model.max_seq_len), np.int32)
    seq[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        seq[0, n] = int(jnp.argmax(forward(params, seq)[0, n - 1]))
    return seq[0, len(prompt):len(prompt) + steps].tolist()


@pytest.mark.parametrize("layout", ["model.scan_layers=true model.position=rope",
                                    "model.scan_layers=false model.position=learned"])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(layout):
    cfg = _config(*layout.split(), "model.qkv_bias=true")
    params = _params(cfg)
    full_model, cached_model = Decoder(cfg.model), Decoder(cfg.model, decode=True)
    batch = left_pad([np.asarray(p) for p in PROMPTS], 3, 20)
    prefix = 4  # the first 4 slots in one call, then one slot per call
    cache = nn.unbox(cached_model.init(jax.random.key(0), jnp.zeros((3, 20), jnp.int32))["cache"])
    cache = jax.tree.map(jnp.zeros_like, cache)
    step = jax.jit(lambda cache, *inputs: cached_model.apply(
        {"params": params, "cache": cache}, *inputs, mutable=["cache"]))
    pieces = []
    for start, stop in [(0, prefix)] + [(t, t + 1) for t in range(prefix, 20)]:
        sl = lambda x, start=start, stop=stop: jnp.asarray(x[:, start:stop])
        logits, variables = step(cache, sl(batch["tokens"]), sl(batch["positions"]),
                                 sl(batch["segments"]))
        cache = variables["cache"]
        pieces.append(logits)
    incremental = np.concatenate(pieces, axis=1)
    for row, prompt in enumerate(PROMPTS):
        expected = np.asarray(full_model.apply({"params": params}, jnp.asarray([prompt]))[0])
        got = incremental[row, 20 - len(prompt):]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def setup():
    cfg = _config()
    return cfg, _params(cfg)


@pytest.mark.parametrize("mesh", [("mesh.fsdp=1",), ("mesh.fsdp=4", "mesh.tensor=2")])
def test_greedy_generation_equals_repeated_full_passes(setup, mesh):
    cfg, params = setup
    cfg = _config(*mesh)
    gen = _generator(cfg, params, cfg.mesh.fsdp * cfg.mesh.tensor)
    out = gen.generate(PROMPTS, max_new_tokens=12)
    for prompt, ids, logprobs in zip(PROMPTS, out.ids, out.logprobs, strict=True):
        assert ids.tolist() == _greedy_by_full_passes(cfg, params, prompt, 12)
        assert logprobs.shape == (12,) and np.all(logprobs < 0)
    assert out.new_tokens == 36 and out.prompt_tokens == 24
    assert out.decode_seconds > 0 and out.tokens_per_second > 0


def test_the_cache_is_sharded_by_the_rules(setup):
    cfg, params = setup
    cfg = _config("mesh.fsdp=4", "mesh.tensor=2")
    gen = _generator(cfg, params, 8)
    gen.generate(PROMPTS, max_new_tokens=4)
    (prefill, _), = gen._compiled.values()
    cache_shardings = prefill.output_shardings[1]["layers"]["attn"]
    # [layers, batch, slots, kv heads, head dim]: batch over fsdp, kv heads over tensor
    assert cache_shardings["cached_key"].spec == jax.sharding.PartitionSpec(
        None, ("data", "fsdp"), None, "tensor", None)
    key = prefill.output_shardings[1]["layers"]["attn"]["cached_key"]
    shard = key.shard_shape((2, 4, 32, 2, 8))
    assert shard == (2, 1, 32, 1, 8)  # 4 rows over 4 fsdp devices, 2 kv heads over 2


def test_sampling_is_reproducible_across_meshes_and_seeds_differ(setup):
    cfg, params = setup
    one = _generator(_config(), params, 1)
    eight = _generator(_config("mesh.fsdp=4", "mesh.tensor=2"), params, 8)
    settings = dict(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.95)
    a = one.generate(PROMPTS, seed=3, **settings)
    b = eight.generate(PROMPTS, seed=3, **settings)
    c = one.generate(PROMPTS, seed=4, **settings)
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
    np.testing.assert_allclose(np.stack(a.logprobs), np.stack(b.logprobs), rtol=1e-5)
    assert [x.tolist() for x in a.ids] != [x.tolist() for x in c.ids]
    # the same prompt twice in one batch draws two different samples
    twice = one.generate([PROMPTS[0], PROMPTS[0]], seed=3, **settings)
    assert twice.ids[0].tolist() != twice.ids[1].tolist()
    # top_k=1 is greedy whatever the temperature
    greedy = one.generate(PROMPTS, max_new_tokens=10)
    top1 = one.generate(PROMPTS, max_new_tokens=10, temperature=2.0, top_k=1, seed=9)
    assert [x.tolist() for x in top1.ids] == [x.tolist() for x in greedy.ids]


def test_generation_stops_after_an_end_of_sequence_id(setup):
    cfg, params = setup
    gen = _generator(cfg, params, 1)
    greedy = gen.generate(PROMPTS, max_new_tokens=12)
    eos = int(greedy.ids[0][2])  # the third token of the first prompt's continuation
    out = gen.generate(PROMPTS, max_new_tokens=12, eos_ids=(eos,))
    first = greedy.ids[0].tolist().index(eos)
    assert out.ids[0].tolist() == greedy.ids[0][:first + 1].tolist()
    for full, stopped in zip(greedy.ids, out.ids, strict=True):
        cut = full.tolist().index(eos) + 1 if eos in full.tolist() else 12
        assert stopped.tolist() == full[:cut].tolist()
    assert out.new_tokens == sum(len(x) for x in out.ids)


def test_the_samplers_keep_to_their_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    draw = lambda **kw: np.asarray(sample_logits(logits, keys, jnp.float32(1.0),
                                                 jnp.float32(kw.pop("top_p", 1.0)), **kw))
    everything = draw(greedy=False, top_k=0, nucleus=False)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert abs(np.mean(everything == 0) - 0.5) < 0.03
    assert set(draw(greedy=False, top_k=2, nucleus=False).tolist()) == {0, 1}
    # top_p=0.7: ids 0 (0.5) and 1 (crosses 0.7 at 0.8) are kept, 2 and 3 are not
    nucleus = draw(greedy=False, top_k=0, nucleus=True, top_p=0.7)
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(np.mean(nucleus == 0) - 0.5 / 0.8) < 0.03
    assert set(draw(greedy=True, top_k=0, nucleus=False).tolist()) == {0}


def test_bad_prompts_fail_in_one_line(setup):
    cfg, params = setup
    gen = _generator(cfg, params, 1)
    with pytest.raises(ConfigError, match=r"^prompt 1 has 49 tokens, above model.max_seq_len=48$"):
        gen.generate([[1, 2], [3] * 49], max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"^prompt 0 has 40 tokens; with "
                       r"generate.max_new_tokens=10 that is 50, above model.max_seq_len=48; "
                       r"lower max_new_tokens$"):
        gen.generate([[3] * 40], max_new_tokens=10)
    with pytest.raises(ConfigError, match=r"^prompt 0 is empty$"):
        gen.generate([[]], max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"^prompt 0 holds token id 64 outside the vocabulary "
                       r"\[0, 64\)$"):
        gen.generate([[1, 64]], max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"^generate.top_p=0.0 must be in \(0, 1\]$"):
        gen.generate([[1]], top_p=0.0)
    with pytest.raises(ConfigError, match=r"^generation does not pipeline: sample with "
                       r"mesh.stage=1 \(a checkpoint reshards onto any mesh\)$"):
        Generator(_config("mesh.stage=2", "mesh.fsdp=1", "pipeline.microbatches=2"), params)


def test_prompt_files_and_their_errors(tmp_path):
    from jaxscale.data.tokenizers import ByteTokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "ab"}\n\n{"ids": [1, 2, 3]}\n')
    got = read_prompts(str(path), ByteTokenizer())
    assert [x.tolist() for x in got] == [[97, 98], [1, 2, 3]]
    for text, message in [
        ('{"text": "a", "ids": [1]}\n', r'prompts.jsonl:1: a prompt row holds exactly one of '
                                        r'"text" and "ids"$'),
        ('{"ids": [1]}\nnot json\n', r"prompts.jsonl:2: not a JSON object \(Expecting value\)$"),
        ("\n", r"prompts.jsonl: holds no prompts$"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_prompts(str(path), ByteTokenizer())
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r'prompts.jsonl:1: a "text" prompt needs a tokenizer'):
        read_prompts(str(path), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run of a small byte-level model: its workdir holds config.yaml and a
    checkpoint."""
    from jaxscale.run.loop import train

    workdir = tmp_path_factory.mktemp("run")
    corpus = workdir / "corpus"
    corpus.mkdir()
    for i in range(100):
        (corpus / f"doc{i}.txt").write_text(f"def add_{i}(a, b):\n    return a + b\n" * 20)
    cfg = config_lib.load("tiny", [
        "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.d_ff=64", "model.max_seq_len=64", "seq_len=16", "batch_size=8", "steps=2",
        "eval_batches=1", "progress=false", f"workdir={workdir}", f"data.path={corpus}",
        "mesh.fsdp=8"])
    state = train(cfg)
    return workdir, nn.unbox(state.params)


def test_cli_generates_from_a_run_like_the_python_api(trained, tmp_path):
    workdir, params = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "def "}\n{"ids": [100, 101, 102]}\n')
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "generate", "--checkpoint", str(workdir),
         "--prompts", str(prompts), "--output", str(out), "--max-new-tokens", "8",
         "--cpu-devices", "4", "mesh.fsdp=2", "mesh.tensor=2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "generated 16 tokens for 2 prompts (7 prompt tokens)" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in rows] == [[100, 101, 102, 32], [100, 101, 102]]
    cfg = config_lib.load(str(pathlib.Path(workdir) / "config.yaml"), ["mesh.fsdp=1"])
    gen = _generator(cfg, params, 1)
    expected = gen.generate([r["prompt_ids"] for r in rows], max_new_tokens=8)
    assert [r["ids"] for r in rows] == [x.tolist() for x in expected.ids]
    assert rows[0]["text"] == gen.tokenizer.decode(expected.ids[0])
    loaded = Generator.load(str(workdir), overrides=["mesh.fsdp=1"],
                            mesh=make_mesh(cfg.mesh, jax.devices()[:1]))
    again = loaded.generate([r["prompt_ids"] for r in rows], max_new_tokens=8)
    assert [x.tolist() for x in again.ids] == [r["ids"] for r in rows]


def test_cli_bad_arguments_fail_in_one_line(trained, tmp_path):
    workdir, _ = trained
    from jaxscale import cli

    for argv, message in [
        (["generate", "--checkpoint", str(workdir)],
         "give exactly one of --prompt TEXT and --prompts FILE.jsonl"),
        (["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"],
         f"--checkpoint {str(tmp_path / 'nowhere')!r}: no such directory"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x"],
         f"--checkpoint {str(tmp_path)!r}: no config.yaml in it or above it; pass --config"),
    ]:
        with pytest.raises(ConfigError) as e:
            cli.parse_args(argv).func(cli.parse_args(argv))
        assert str(e.value) == message
