"""Sampling from a trained decoder: prefill and decode with a key/value cache, over the mesh.

    gen = Generator.load("runs/tiny")                 # a run's workdir, a checkpoint or hf:PATH
    out = gen.generate([gen.tokenizer.encode("def ")], max_new_tokens=32, temperature=0.8)
    out.ids[0], out.logprobs[0], out.tokens_per_second

Prompts of different lengths are left-padded into one batch: each row's positions start at 0 at
its first token and the cache's segment ids hide the padding (`Attention` with decode=True in
`jaxscale.models.decoder`). The parameters keep their training shardings and the cache follows
the rules (batch over the batch axes, kv heads over tensor), so whatever mesh trained the model
samples from it. The prompt runs once (prefill); then one jitted `lax.while_loop` samples a token,
appends it to the cache and stops when every row has produced an end-of-sequence id or
`max_new_tokens`, with no host round trip per token.

Sampling: greedy at temperature 0, else softmax(logits / temperature) restricted to the top-k
tokens and to the smallest set holding top_p of the mass. The random numbers of step t are
``fold_in(key(seed), t)`` drawn for the whole [batch, vocab] array, so a seed gives the same
tokens on every mesh, and a prompt repeated in one batch gets independent samples.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale import config as config_lib
from jaxscale.config import Config, GenerateConfig
from jaxscale.core import sharding as shd
from jaxscale.core.mesh import make_mesh
from jaxscale.errors import ConfigError
from jaxscale.models.decoder import Decoder

PAD_ID = 0  # the token id of left padding (hidden by segment id 0, never attended)
_LENGTH_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer compilations)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Generator.generate` returns, per prompt in the order given."""

    ids: list[np.ndarray]  # the generated ids only, through the first end-of-sequence id
    logprobs: list[np.ndarray]  # log p(id) of each generated id under the model (temperature 1)
    prompt_tokens: int  # prompt tokens over all prompts (padding not counted)
    new_tokens: int  # generated tokens over all prompts
    prefill_seconds: float  # the prompts' forward passes (compilation excluded)
    decode_seconds: float  # the sampling loops (compilation excluded)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  *, greedy: bool, top_k: int, nucleus: bool) -> jax.Array:
    """One token id per row: argmax when `greedy`, else a draw from the tempered softmax kept
    to the `top_k` most likely ids (0 = all) and, when `nucleus`, to the most likely ids whose
    mass reaches `top_p` (the id that crosses it included)."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if nucleus:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the ids ranked above
        kept = jnp.where(before_BV < top_p, sorted_BV, jnp.inf)
        logits_BV = jnp.where(logits_BV < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf,
                              logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
    """[rows, length] tokens, positions and segment ids of left-padded prompts (rows past the
    prompts are padding only)."""
    tokens = np.full((rows, length), PAD_ID, np.int32)
    positions = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    for row, ids in enumerate(prompts):
        n = len(ids)
        tokens[row, length - n:] = ids
        positions[row, length - n:] = np.arange(n)
        segments[row, length - n:] = 1
    return {"tokens": tokens, "positions": positions, "segments": segments}


class Generator:
    """Samples from the built-in decoder with its parameters sharded over `mesh`.

    Args:
      cfg: the model's Config (`cfg.model` the decoder, `cfg.generate` the default sampling
        settings, `cfg.mesh` and `cfg.sharding` the layout).
      params: the parameters (unboxed arrays, any placement: they are put on their shardings).
      mesh: default `cfg.mesh` over all devices.
      tokenizer: encodes text prompts and decodes outputs; default `cfg.data.tokenizer`'s
        (none when the model was trained on data.source=synthetic with the byte tokenizer).
      batch_size: rows per call of the compiled programs; 0 = every prompt at once.
    """

    def __init__(self, cfg: Config, params: Any = None, mesh: Mesh | None = None, *,
                 tokenizer: Any = "config", batch_size: int = 0):
        if cfg.model.name != "decoder":
            raise ConfigError(f"generation runs the built-in decoder (model.name='decoder'), "
                              f"not model.name={cfg.model.name!r}")
        if cfg.mesh.stage * cfg.mesh.dcn_stage > 1:
            raise ConfigError("generation does not pipeline: sample with mesh.stage=1 (a "
                              "checkpoint reshards onto any mesh)")
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg.mesh)
        self.rules = shd.resolve_rules(cfg.sharding.rules, self.mesh)
        model_cfg = dataclasses.replace(cfg.model, remat="none", dropout=0.0)
        self.model = Decoder(model_cfg, decode=True)
        self.batch_size = batch_size
        boxed = jax.eval_shape(Decoder(model_cfg).init, jax.random.key(0),
                               jnp.zeros((1, 1), jnp.int32))["params"]
        self.abstract_params = nn.unbox(boxed)
        self.param_shardings = shd.state_shardings(boxed, self.mesh, self.rules)
        self.params = None if params is None else jax.device_put(params, self.param_shardings)
        if tokenizer == "config":  # none for a model of random tokens (data.source=synthetic)
            from jaxscale.data.tokenizers import load_tokenizer

            synthetic = cfg.data.source == "synthetic" and cfg.data.tokenizer == "byte"
            tokenizer = None if synthetic else load_tokenizer(cfg.data.tokenizer)
        self.tokenizer = tokenizer
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def load(cls, checkpoint: str, config: str | None = None, overrides: Sequence[str] = (), *,
             mesh: Mesh | None = None, batch_size: int = 0) -> Generator:
        """A Generator for a run's workdir, a checkpoint (or step) directory, or ``hf:PATH``.

        The config is `config` when given, else the config.yaml found at or above the checkpoint
        (a run's workdir, a converted checkpoint) or the Hugging Face config.json; `overrides`
        (``key=value``, e.g. the mesh) apply on top.
        """
        if checkpoint.startswith("hf:"):
            from jaxscale import convert

            cfg = (config_lib.load(config, overrides) if config
                   else convert.config_from_hf(checkpoint[3:], overrides))
            gen = cls(cfg, mesh=mesh, batch_size=batch_size)
            gen.params = convert.load_hf_params(checkpoint[3:], gen.abstract_params,
                                                gen.param_shardings)
            return gen
        from jaxscale.checkpoint import checkpoint_dir, load_params

        root = pathlib.Path(checkpoint)
        if not root.exists():
            raise ConfigError(f"--checkpoint {checkpoint!r}: no such directory")
        if config is None:
            found = next((d / "config.yaml" for d in (root, root.parent, root.parent.parent)
                          if (d / "config.yaml").is_file()), None)
            if found is None:
                raise ConfigError(f"--checkpoint {checkpoint!r}: no config.yaml in it or above "
                                  "it; pass --config")
            config = str(found)
        cfg = config_lib.load(config, overrides)
        path = checkpoint_dir(cfg) if (root / "config.yaml").is_file() else str(root)
        if (root / "checkpoints").is_dir():
            path = str(root / "checkpoints")
        gen = cls(cfg, mesh=mesh, batch_size=batch_size)
        gen.params = load_params(path, gen.abstract_params, gen.param_shardings,
                                 what="--checkpoint")
        return gen

    # -- sampling ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], settings: GenerateConfig | None = None,
                 **changes: Any) -> Generation:
        """Sample a continuation of every prompt (lists of token ids).

        Args:
          prompts: token ids per prompt (non-empty, within the vocabulary).
          settings: default `cfg.generate`; `changes` replace its fields (``temperature=0.8``).
        """
        if self.params is None:
            raise ValueError("Generator has no parameters: pass params or use Generator.load")
        settings = dataclasses.replace(settings or self.cfg.generate, **changes)
        config_lib.validate(dataclasses.replace(self.cfg, generate=settings))
        prompts = [self._check_prompt(i, p, settings) for i, p in enumerate(prompts)]
        if not prompts:
            return Generation([], [], 0, 0, 0.0, 0.0)
        rows = self.batch_size or len(prompts)
        ids, logprobs, prefill_s, decode_s = [], [], 0.0, 0.0
        for start in range(0, len(prompts), rows):
            chunk = prompts[start:start + rows]
            out, lp, seconds = self._generate_batch(chunk, rows, settings, start)
            ids += out
            logprobs += lp
            prefill_s += seconds[0]
            decode_s += seconds[1]
        return Generation(ids, logprobs, sum(map(len, prompts)), sum(map(len, ids)),
                          prefill_s, decode_s)

    def _check_prompt(self, i: int, prompt: Sequence[int], settings: GenerateConfig) -> np.ndarray:
        m = self.cfg.model
        ids = np.asarray(prompt, np.int32).reshape(-1)
        if not ids.size:
            raise ConfigError(f"prompt {i} is empty")
        bad = ids[(ids < 0) | (ids >= m.vocab_size)]
        if bad.size:
            raise ConfigError(f"prompt {i} holds token id {int(bad[0])} outside the vocabulary "
                              f"[0, {m.vocab_size})")
        if len(ids) > m.max_seq_len:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens, above model.max_seq_len="
                              f"{m.max_seq_len}")
        if len(ids) + settings.max_new_tokens > m.max_seq_len:
            raise ConfigError(
                f"prompt {i} has {len(ids)} tokens; with generate.max_new_tokens="
                f"{settings.max_new_tokens} that is {len(ids) + settings.max_new_tokens}, above "
                f"model.max_seq_len={m.max_seq_len}; lower max_new_tokens")
        return ids

    def _batch_rows(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the devices the batch is split over."""
        spec = shd.batch_sharding(self.mesh, self.rules).spec
        axes = spec[0] if spec else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        parts = math.prod(self.mesh.shape[a] for a in axes)
        return -(-rows // parts) * parts

    def _generate_batch(self, prompts, rows, settings, offset):
        longest = max(map(len, prompts))
        length = -(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET
        length = min(length, self.cfg.model.max_seq_len - settings.max_new_tokens)
        batch = left_pad(prompts, self._batch_rows(rows), length)
        prefill, decode = self._programs(batch["tokens"].shape, settings)
        put = lambda x: jax.device_put(x, self._replicated)
        start = time.perf_counter()
        logits, cache = prefill(self.params, *map(put, batch.values()))
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - start
        lengths = np.zeros(len(batch["tokens"]), np.int32)
        lengths[:len(prompts)] = list(map(len, prompts))
        eos = np.asarray(settings.eos_ids or (-1,), np.int32)
        key = jax.random.fold_in(jax.random.key(settings.seed), offset)
        start = time.perf_counter()
        out = decode(self.params, cache, logits, put(lengths), put(eos), key,
                     np.float32(settings.temperature or 1.0), np.float32(settings.top_p))
        tokens, logp = jax.device_get(out)
        decode_s = time.perf_counter() - start
        ids, lps = [], []
        stops = set(settings.eos_ids)
        for row in range(len(prompts)):
            n = next((t + 1 for t, x in enumerate(tokens[row]) if int(x) in stops),
                     settings.max_new_tokens)
            ids.append(tokens[row, :n])
            lps.append(logp[row, :n])
        return ids, lps, (prefill_s, decode_s)

    def _programs(self, shape: tuple[int, int], s: GenerateConfig):
        """The compiled prefill and decode programs for a [rows, prompt length] batch."""
        key = (shape, s.max_new_tokens, s.temperature == 0, s.top_k, s.top_p < 1, len(s.eos_ids))
        if key not in self._compiled:
            self._compiled[key] = self._compile(shape, s)
        return self._compiled[key]

    def _compile(self, shape: tuple[int, int], s: GenerateConfig):
        rows, length = shape
        new = s.max_new_tokens
        model, mesh, rules = self.model, self.mesh, self.rules
        boxed = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((rows, length + new), jnp.int32))["cache"]
        cache_abstract = nn.unbox(boxed)
        cache_shardings = jax.tree.map(
            lambda names, a: shd.named_sharding(mesh, names, rules, a.shape, what="the cache"),
            shd.logical_axes_of(boxed), cache_abstract)
        logits_sharding = NamedSharding(
            mesh, shd.logical_to_spec(("batch", "act_vocab"), rules, what="the logits",
                                      mesh_axis_names=mesh.axis_names))

        def run(params, cache, tokens, positions, segments):
            logits, variables = model.apply({"params": params, "cache": cache}, tokens,
                                            positions, segments, mutable=["cache"])
            return logits[:, -1].astype(jnp.float32), variables["cache"]

        def prefill(params, tokens, positions, segments):
            with shd.activation_sharding(mesh, rules):
                cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache_abstract)
                return run(params, cache, tokens, positions, segments)

        def decode(params, cache, logits, lengths, eos, key, temperature, top_p):
            def sample_step(carry):
                t, cache, logits, tokens, logp, done = carry
                token = sample_logits(logits, jax.random.fold_in(key, t), temperature, top_p,
                                      greedy=s.temperature == 0, top_k=s.top_k,
                                      nucleus=s.top_p < 1)
                lp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
                token = jnp.where(done, PAD_ID, token)
                tokens = tokens.at[:, t].set(token)
                logp = logp.at[:, t].set(jnp.where(done, 0.0, lp))
                done = done | jnp.isin(token, eos)
                logits, cache = run(params, cache, token[:, None], (lengths + t)[:, None],
                                    jnp.ones_like(token)[:, None])
                return t + 1, cache, logits, tokens, logp, done

            def more(carry):
                t, done = carry[0], carry[-1]
                return (t < new) & ~jnp.all(done)

            with shd.activation_sharding(mesh, rules):
                carry = (jnp.int32(0), cache, logits, jnp.full((rows, new), PAD_ID, jnp.int32),
                         jnp.zeros((rows, new), jnp.float32), jnp.zeros((rows,), bool))
                carry = jax.lax.while_loop(more, sample_step, carry)
            return carry[3], carry[4]

        param_abstract = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            self.abstract_params, self.param_shardings)
        ints = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._replicated)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self._replicated)
        prefill_exe = jax.jit(prefill, out_shardings=(logits_sharding, cache_shardings)).lower(
            param_abstract, ints(shape), ints(shape), ints(shape)).compile()
        cache_in = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                cache_abstract, cache_shardings)
        logits_in = jax.ShapeDtypeStruct((rows, self.cfg.model.vocab_size), jnp.float32,
                                         sharding=logits_sharding)
        decode_exe = jax.jit(decode,
                             out_shardings=(self._replicated, self._replicated)).lower(
            param_abstract, cache_in, logits_in, ints((rows,)), ints((max(len(s.eos_ids), 1),)),
            jax.random.key(0), scalar, scalar).compile()
        return prefill_exe, decode_exe


def read_prompts(path: str, tokenizer: Any) -> list[np.ndarray]:
    """Prompts from a JSON-lines file: each row ``{"text": ...}`` (encoded by `tokenizer`) or
    ``{"ids": [...]}`` (token ids, for models without a tokenizer)."""
    from jaxscale.data.documents import json_rows

    prompts = []
    for where, row in json_rows(path):
        if not isinstance(row, dict) or ("text" in row) == ("ids" in row):
            raise ConfigError(f'{where}: a prompt row holds exactly one of "text" and "ids"')
        if "ids" in row:
            prompts.append(np.asarray(row["ids"], np.int32))
        elif tokenizer is None:
            raise ConfigError(f'{where}: a "text" prompt needs a tokenizer (the model has '
                              'none: give "ids")')
        else:
            prompts.append(np.asarray(tokenizer.encode(row["text"]), np.int32))
    if not prompts:
        raise ConfigError(f"{path}: holds no prompts")
    return prompts


def write_outputs(path: str, prompts: Sequence[np.ndarray], out: Generation,
                  tokenizer: Any) -> None:
    """One JSON line per prompt: "prompt_ids", "ids" (the generated ids), and "text" (the
    generated text) when there is a tokenizer; written to a temporary file, then renamed."""
    import json

    from jaxscale.run.hooks import write_atomic

    lines = []
    for prompt, ids in zip(prompts, out.ids, strict=True):
        row = {"prompt_ids": [int(x) for x in prompt], "ids": [int(x) for x in ids]}
        if tokenizer is not None:
            row["text"] = tokenizer.decode(np.asarray(ids))
        lines.append(json.dumps(row))
    write_atomic(pathlib.Path(path), "".join(line + "\n" for line in lines))


__all__ = ["PAD_ID", "Generation", "Generator", "left_pad", "read_prompts", "sample_logits",
           "write_outputs"]
