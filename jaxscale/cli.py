"""The `jaxscale` command line.

    jaxscale train --config NAME_OR_PATH [--cpu-devices N] [key=value ...]
        [--coordinator HOST:PORT --num-processes N --process-id I]
    jaxscale prepare INPUT OUT_DIR [--tokenizer byte|tokenizer.json] [--workers N] ...
    jaxscale config show --config NAME_OR_PATH [key=value ...]
    jaxscale inspect --config NAME_OR_PATH [--cpu-devices N] [key=value ...]
    jaxscale plan --config NAME_OR_PATH --devices N [--target h100] [--device-memory 80GB] ...
    jaxscale generate --checkpoint RUN|CKPT|hf:DIR (--prompt TEXT | --prompts FILE.jsonl)
        [--output FILE.jsonl] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
        [--seed S] [--cpu-devices N] [key=value ...]
    jaxscale ttc --checkpoint RUN (--tasks FILE.jsonl | --make-tasks N) [--max-n 32]
        [--temperature 0.8] [--seed S] [--scorer logprob|module:function] [--output FILE.json]
        [--plot FILE.png] [--cpu-devices N] [key=value ...]
    jaxscale convert hf-to-jaxscale HF_DIR OUT_DIR [--config-out FILE.yaml] [--cpu-devices N]
        [key=value ...]
    jaxscale convert jaxscale-to-hf RUN_OR_CKPT_DIR OUT_DIR [--max-shard-bytes B]
        [--cpu-devices N]
    jaxscale plot WORKDIR
    jaxscale sweep SPEC --dir SWEEP_DIR [--workers N] [--executor local|ray|slurm] [--dry-run]
        [key=value ...]
    jaxscale fit (SWEEP_DIR | --csv POINTS.csv) [--budget C] [--json OUT.json] [--plots DIR]
        [--compound] [--metric accuracy|loss]
    jaxscale ckpt verify|list DIR
    jaxscale goodput WORKDIR [--out PNG]

Flags and ``key=value`` overrides mix in any order after the subcommand
(``jaxscale train steps=5 --cpu-devices 8 workdir=x``). A bad command line (an unknown flag, a
malformed override, a missing or badly typed argument) is one line on stderr and exit code 2.

jax is imported only after the arguments are parsed and the config validated, so that
`--cpu-devices` takes effect and a bad setting fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from jaxscale import config as config_lib
from jaxscale.errors import CheckpointError, ConfigError, NonFiniteError, Preempted
from jaxscale.run.devices import set_cpu_devices
from jaxscale.validation import did_you_mean
from jaxscale.xla_flags import apply_gpu_flags

# Exit codes (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (traceback printed)
EXIT_CONFIG = 2  # a bad setting or argument: one line on stderr, nothing run
EXIT_NONFINITE = 3  # on_nonfinite=abort stopped the run
EXIT_PREEMPTED = 4  # SIGTERM/SIGINT: a checkpoint committed at the stop step; rerun to resume
EXIT_WATCHDOG = 5  # the hang watchdog ended a stuck run (every thread's stack is in the log)
EXIT_CHECKPOINT = 6  # a checkpoint could not be saved or restored (the message says which)

MAIN_KEYS = (
    "steps, batch_size, seq_len, seed, workdir, log_every, eval_every, on_nonfinite, "
    "model.{num_layers,d_model,num_heads,num_kv_heads,d_ff,vocab_size,dtype,param_dtype,"
    "scan_layers,remat,context_parallel}, model.moe.{num_experts,top_k,dispatch}, "
    "mesh.{data,fsdp,tensor,sequence,expert,stage}, sharding.rules, "
    "optim.{name,lr,schedule,warmup_steps,weight_decay,clip_norm,grad_accum}, "
    "pipeline.{microbatches,schedule,virtual_stages}, "
    "data.{source,path,tokenizer}, checkpoint.{dir,every,keep,restore_step,init_from}"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error` raises a ConfigError (printed by `main`, exit 2)
    instead of printing the usage block and exiting, and long flags are never abbreviated (an
    abbreviation would let a typo such as `--cpu-device` pass for `--cpu-devices`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """--config, and the key=value overrides that `parse_args` collects from anywhere."""
    p.add_argument(
        "--config", default="tiny",
        help=f"preset name ({', '.join(config_lib.presets())}) or a YAML file (default: tiny)",
    )
    # Not a positional nargs="*": that list would end at the first flag after it. The overrides
    # are the tokens argparse leaves over (see parse_args).
    p.set_defaults(overrides=[])
    note = f"key=value overrides (anywhere after the subcommand); main keys: {MAIN_KEYS}"
    p.epilog = f"{p.epilog}\n{note}" if p.epilog else note


def _show_overrides_in_usage(p: argparse.ArgumentParser) -> None:
    """Append [key=value ...] to the usage line (call it once every flag is added)."""
    p.usage = p.format_usage().removeprefix("usage: ").rstrip() + " [key=value ...]"


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="run on N simulated CPU devices")
    g = p.add_argument_group(
        "multi-process", "one process per host (or per test process on localhost); without these "
        "flags the layout is detected from SLURM, Kubernetes JobSet or TPU VM variables")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's index, 0..N-1 (process 0 writes the metrics and logs)")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --config of the commands that load a trained model (generate, ttc)."""
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run's workdir, a checkpoint directory, or hf:HF_DIR")
    p.add_argument("--config", default=None, help="preset or YAML file (default: the "
                   "config.yaml beside the checkpoint, or the Hugging Face config.json)")


def _start_processes(args: argparse.Namespace) -> None:
    """Join the multi-process job, if this is one (before any other jax work)."""
    from jaxscale.run import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           cpu=True if args.cpu_devices is not None else None)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    set_cpu_devices(args.cpu_devices)
    apply_gpu_flags()  # XLA flags that overlap collectives with compute (GPU runs only)
    _start_processes(args)
    from jaxscale.run.loop import train

    train(cfg)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    print(config_lib.to_yaml(config_lib.load(args.config, args.overrides)), end="")
    return EXIT_OK


def cmd_prepare(args: argparse.Namespace) -> int:
    from jaxscale.data.prepare import prepare

    manifest = prepare(
        args.input, args.out_dir, tokenizer=args.tokenizer, source=args.source,
        text_field=args.text_field, hf_split=args.hf_split, shard_mb=args.shard_mb,
        workers=args.workers, progress=False if args.no_progress else None,
    )
    print(f"prepared {manifest['num_docs']:,} documents, {manifest['num_tokens']:,} tokens in "
          f"{manifest['num_shards']} shards: {args.out_dir}/manifest.json")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    set_cpu_devices(args.cpu_devices)
    from jaxscale.analysis.inspection import inspect_config

    print(inspect_config(cfg, replicated_warn_bytes=args.warn_replicated_bytes).format())
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices} must be positive")
    set_cpu_devices(args.devices)  # N simulated devices: the plan compiles for N, allocates none
    from jaxscale.analysis.plan import format_plan, parse_bytes, plan

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    result = plan(cfg, args.devices, args.target, device_memory=memory,
                  remats=None if args.remat is None else [r for r in args.remat.split(",") if r],
                  usable_fraction=args.usable_fraction,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_plan(result))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    overrides = list(args.overrides) + [f"generate.{key}={value}"
                                        for key, value in sampling.items() if value is not None]
    if args.config is not None:
        config_lib.load(args.config, overrides)  # a bad setting fails before jax starts
    set_cpu_devices(args.cpu_devices)
    _start_processes(args)
    from jaxscale.generate import Generator, read_prompts, write_outputs

    gen = Generator.load(args.checkpoint, args.config, overrides, batch_size=args.batch_size)
    if args.prompts is not None:
        prompts = read_prompts(args.prompts, gen.tokenizer)
    elif gen.tokenizer is None:
        raise ConfigError("--prompt TEXT needs a tokenizer (the model has none): use --prompts "
                          'FILE.jsonl with "ids" rows')
    else:
        prompts = [gen.tokenizer.encode(args.prompt)]
    out = gen.generate(prompts)
    if args.output:
        write_outputs(args.output, prompts, out, gen.tokenizer)
    else:
        for prompt, ids in zip(prompts, out.ids, strict=True):
            print(gen.tokenizer.decode(prompt) + gen.tokenizer.decode(ids)
                  if gen.tokenizer is not None else " ".join(map(str, ids)))
    print(f"generated {out.new_tokens} tokens for {len(prompts)} prompts "
          f"({out.prompt_tokens} prompt tokens): prefill {out.prefill_seconds:.3f} s, decode "
          f"{out.decode_seconds:.3f} s, {out.tokens_per_second:,.0f} tokens/s", file=sys.stderr)
    return EXIT_OK


def cmd_ttc(args: argparse.Namespace) -> int:
    from jaxscale import ttc  # numpy only: the checks below run before jax starts

    if (args.tasks is None) == (args.make_tasks is None):
        raise ConfigError("give exactly one of --tasks FILE.jsonl and --make-tasks N")
    ttc.sample_counts(args.max_n)  # --max-n < 1 fails here
    if args.make_tasks is not None and args.make_tasks < 1:
        raise ConfigError(f"--make-tasks {args.make_tasks} must be at least 1")
    tasks = ttc.read_tasks(args.tasks) if args.tasks is not None else None
    ttc.load_scorer(args.scorer)  # a bad --scorer fails before the model loads
    overrides = list(args.overrides)
    if args.config is not None:
        config_lib.load(args.config, overrides)
    set_cpu_devices(args.cpu_devices)
    from jaxscale.generate import Generator

    gen = Generator.load(args.checkpoint, args.config, overrides, batch_size=args.batch_size)
    if tasks is None:
        from jaxscale.data.addition import make_tasks

        tasks = [ttc.Task(**row) for row in make_tasks(
            args.make_tasks, gen.cfg.data.addition_digits, seed=args.task_seed)]
    report = ttc.accuracy_vs_samples(gen, tasks, args.max_n, args.scorer, args.temperature,
                                     args.seed)
    report["checkpoint"] = args.checkpoint
    print(ttc.format_report(report))
    if args.output:
        print(f"wrote {ttc.write_report(args.output, report)}", file=sys.stderr)
    if args.plot:
        try:
            from jaxscale.analysis.plot import plot_ttc

            print(f"wrote {plot_ttc(report, args.plot)}", file=sys.stderr)
        except ImportError:
            print(f"jaxscale: note: --plot {args.plot} skipped: matplotlib is not installed "
                  "(pip install 'jaxscale[plot]')", file=sys.stderr)
    return EXIT_OK


def cmd_hf_to_jaxscale(args: argparse.Namespace) -> int:
    from jaxscale.convert.hf_config import config_from_hf  # no jax: a bad setting fails first

    config_from_hf(args.hf_dir, args.overrides)
    set_cpu_devices(args.cpu_devices)
    from jaxscale.convert import hf_to_jaxscale

    cfg = hf_to_jaxscale(args.hf_dir, args.out_dir, config_out=args.config_out,
                         overrides=args.overrides)
    print(f"converted {args.hf_dir} to {args.out_dir}: config.yaml, checkpoints/0\n"
          f"fine-tune: jaxscale train --config {args.out_dir}/config.yaml workdir=...\n"
          f"({cfg.model.num_layers} layers, d_model {cfg.model.d_model}, parameters in "
          f"{cfg.model.param_dtype})")
    return EXIT_OK


def cmd_jaxscale_to_hf(args: argparse.Namespace) -> int:
    set_cpu_devices(args.cpu_devices)
    from jaxscale.convert import jaxscale_to_hf

    written = jaxscale_to_hf(args.src, args.out_dir, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {written['architectures'][0]} to {args.out_dir}: config.json, safetensors")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxscale.analysis.plot import plot_run

    print(plot_run(args.workdir, args.out))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxscale",
        description="Train Flax models sharded over a device mesh.",
        epilog=(f"presets: {', '.join(config_lib.presets())}\n"
                "example: jaxscale train --config tiny --cpu-devices 8 mesh.fsdp=8 steps=200"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = train = sub.add_parser("train", help="train a model",
                               epilog=f"presets: {', '.join(config_lib.presets())}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("config", help="show the resolved config")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show, parser=show)

    p = sub.add_parser(
        "prepare", help="tokenize a corpus into token shards for data.source=shards",
        epilog="example: jaxscale prepare ~/corpus data/corpus --tokenizer byte --workers 8\n"
               "then:    jaxscale train data.source=shards data.path=data/corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="text source: a directory, file or glob of text and .jsonl "
                                 "files; hf source: a data file, directory or dataset name")
    p.add_argument("out_dir", help="where the shards and manifest.json go (rerun to resume)")
    p.add_argument("--tokenizer", default="byte", help="byte or a tokenizer.json (default: byte)")
    p.add_argument("--source", default="text", choices=("text", "hf"),
                   help="text files or a Hugging Face dataset (default: text)")
    p.add_argument("--text-field", default="text",
                   help="key of a JSON line's or dataset row's text (default: text)")
    p.add_argument("--hf-split", default="train", help="dataset split (hf; default: train)")
    p.add_argument("--shard-mb", type=float, default=64.0,
                   help="input megabytes per shard (default: 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="tokenizer processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare, parser=p)

    p = inspect = sub.add_parser(
        "inspect", help="compile the train step without running it: shardings, memory, FLOPs, "
                        "collectives, warnings",
        epilog="example: jaxscale inspect --config tiny --cpu-devices 8 mesh.fsdp=8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="inspect for N simulated CPU devices")
    p.add_argument("--warn-replicated-bytes", type=int, default=1 << 20, metavar="BYTES",
                   help="warn about replicated parameters from this size (default: 1 MiB)")
    p.set_defaults(func=cmd_inspect, parser=p)

    p = plan = sub.add_parser(
        "plan", help="pick a mesh and remat policy for N devices (compiles for N simulated "
                     "devices; allocates nothing)",
        epilog="example: jaxscale plan --config llama-8b --devices 64 --target h100\n"
               "docs/plan.md explains the memory check and the step-time model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--devices", type=int, required=True, metavar="N", help="devices to plan for")
    p.add_argument("--target", default="h100", help="accelerator: h100, h200, a100, tpu-v4, "
                   "tpu-v5e, tpu-v5p, tpu-v6e (default: h100)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory per device, e.g. 80GB or 74.5GiB (default: the target's)")
    p.add_argument("--remat", default=None, metavar="POLICIES",
                   help="comma-separated remat policies to try, least memory first (default: "
                        "full,minimal,none; none for a model without a remat setting)")
    p.add_argument("--usable-fraction", type=float, default=0.9,
                   help="share of device memory the step may use (default: 0.9)")
    p.set_defaults(func=cmd_plan, parser=p)

    p = generate = sub.add_parser(
        "generate", help="sample from a trained or converted model (KV cache, sharded)",
        epilog="example: jaxscale generate --checkpoint runs/tiny --prompt 'def ' "
               "--max-new-tokens 64 --temperature 0.8\ndocs/generate.md lists every setting",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_args(p)
    p.add_argument("--prompt", default=None, metavar="TEXT", help="one text prompt")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='prompt rows: {"text": ...} or {"ids": [...]}')
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="write one row per "
                   'prompt: "prompt_ids", "ids" (generated) and "text" (default: print)')
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate at most (generate.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (generate.temperature)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the most likely tokens holding mass P; 1 = all")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (generate.seed)")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="prompts per compiled call (default: all at once)")
    _add_device_args(p)
    p.set_defaults(func=cmd_generate, parser=p, overrides=[])

    p = ttc = sub.add_parser(
        "ttc", help="test-time compute: accuracy of best-of-N and majority vote against N",
        epilog="example: jaxscale ttc --checkpoint runs/addition --make-tasks 200 --max-n 32 "
               "--plot ttc.png\ndocs/ttc.md explains the measurement",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_args(p)
    p.add_argument("--tasks", default=None, metavar="FILE.jsonl",
                   help='task rows: {"prompt": "123+456=", "answer": "579"}')
    p.add_argument("--make-tasks", type=int, default=None, metavar="N",
                   help="N addition problems of the held-out test split (data.addition_digits "
                        "of the checkpoint's config) instead of --tasks")
    p.add_argument("--task-seed", type=int, default=0, metavar="S",
                   help="which problems --make-tasks draws (default: 0)")
    p.add_argument("--max-n", type=int, default=32, metavar="N",
                   help="samples per prompt; N = 1, 2, 4, ... up to it are evaluated "
                        "(default: 32)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default: 0.8)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampler seed (default: generate.seed)")
    p.add_argument("--scorer", default="logprob", metavar="logprob|MODULE:FUNCTION",
                   help="best-of-N score: the mean log-probability of the generated tokens, or "
                        "a verifier f(prompt, completion) -> float (default: logprob)")
    p.add_argument("--output", default=None, metavar="FILE.json",
                   help="write the table, the settings and every sample's answer as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="plot accuracy against N and tokens (needs matplotlib)")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="sequences per compiled call (default: all at once)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="run on N simulated CPU devices")
    p.set_defaults(func=cmd_ttc, parser=p, overrides=[])

    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and jaxscale",
                       epilog="docs/convert.md lists the architectures and the mapping",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    convert_sub = p.add_subparsers(dest="convert_command", required=True)
    p = to_jaxscale = convert_sub.add_parser(
        "hf-to-jaxscale", help="a Hugging Face model directory -> config.yaml and an orbax "
                               "checkpoint",
        epilog="example: jaxscale convert hf-to-jaxscale ~/Llama-3.2-1B llama-1b\n"
               "then:    jaxscale train --config llama-1b/config.yaml workdir=runs/ft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="config.json and model.safetensors (or an index and shards)")
    p.add_argument("out_dir", help="gets config.yaml, checkpoints/0/, hf_config.json and "
                                   "tokenizer.json (if the model has one)")
    p.add_argument("--config-out", default=None, metavar="FILE.yaml",
                   help="also write the derived config here")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="read the weights sharded over N simulated CPU devices")
    p.set_defaults(func=cmd_hf_to_jaxscale, parser=p, overrides=[])
    p = convert_sub.add_parser(
        "jaxscale-to-hf", help="a run, checkpoint or step directory -> config.json and "
                               "safetensors that transformers loads",
        epilog="example: jaxscale convert jaxscale-to-hf runs/ft ft-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a run's workdir, a converted directory, a checkpoint directory "
                               "(latest step) or a step directory")
    p.add_argument("out_dir", help="gets config.json, model*.safetensors and tokenizer.json")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9, metavar="B",
                   help="split the safetensors into shards of at most B bytes "
                        "(default: 5000000000)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="restore over N simulated CPU devices")
    p.set_defaults(func=cmd_jaxscale_to_hf, parser=p)

    p = sub.add_parser("plot", help="plot a run's loss and throughput to a PNG")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/loss.png)")
    p.set_defaults(func=cmd_plot, parser=p)
    from jaxscale.checkpoint import cli as ckpt
    from jaxscale.scaling import report, sweep

    sweeps = sweep.add_parser(sub)
    report.add_parser(sub)
    from jaxscale.run import goodput
    goodput.add_parser(sub)
    ckpt.add_parser(sub)
    for p in (train, show, inspect, plan, generate, ttc, to_jaxscale, sweeps):
        _show_overrides_in_usage(p)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; flags and ``key=value`` overrides may come in any order.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
      The namespace of the subcommand's flags; `overrides` lists the ``key=value`` tokens in the
      order given, for the subcommands that take them (train, config show, inspect, plan).

    Raises:
      ConfigError: one line: an unknown flag (with the closest known one), a token that is not
        ``key=value``, or argparse's own complaint (a missing or badly typed argument).
    """
    args, leftover = build_parser().parse_known_args(argv)
    # argparse has no public list of a parser's flags; this mapping is where it keeps them.
    flags = [f for f in args.parser._option_string_actions if f.startswith("--")]
    overrides = []
    for token in leftover:
        if token.startswith("-") and len(token) > 1:
            name = token.partition("=")[0]
            raise ConfigError(f"unrecognized argument {token!r}" + did_you_mean(name, flags))
        if not hasattr(args, "overrides"):  # prepare, plot: no overrides
            raise ConfigError(f"unrecognized argument {token!r} (see '{args.parser.prog} --help')")
        if "=" not in token or token.startswith("="):
            raise ConfigError(f"override {token!r} is not of the form key=value")
        overrides.append(token)
    if hasattr(args, "overrides"):
        args.overrides = overrides
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxscale` console script; returns the exit code."""
    try:
        args = parse_args(argv)
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"jaxscale: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT


if __name__ == "__main__":
    sys.exit(main())
