"""The `jaxscale` command line.

    jaxscale train --config NAME_OR_PATH [--cpu-devices N] [key=value ...]
        [--coordinator HOST:PORT --num-processes N --process-id I]
    jaxscale prepare INPUT OUT_DIR [--tokenizer byte|tokenizer.json] [--workers N] ...
    jaxscale config show --config NAME_OR_PATH [key=value ...]
    jaxscale inspect --config NAME_OR_PATH [--cpu-devices N] [key=value ...]
    jaxscale plan --config NAME_OR_PATH --devices N [--target h100] [--device-memory 80GB] ...
    jaxscale plot WORKDIR

jax is imported only after the arguments are parsed and the config validated, so that
`--cpu-devices` takes effect and a bad setting fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jaxscale import config as config_lib
from jaxscale.errors import CheckpointError, ConfigError, NonFiniteError, Preempted
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
    "scan_layers,remat}, mesh.{data,fsdp,tensor,sequence,expert,stage}, sharding.rules, "
    "optim.{name,lr,schedule,warmup_steps,weight_decay,clip_norm,grad_accum}, "
    "data.{source,path,tokenizer}, checkpoint.{dir,every,keep,restore_step,init_from}"
)


def set_cpu_devices(count: int | None) -> None:
    """Simulate `count` CPU devices; must run before jax initialises its backends."""
    if count is None:
        return
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default="tiny",
        help=f"preset name ({', '.join(config_lib.presets())}) or a YAML file (default: tiny)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"dotted overrides; main keys: {MAIN_KEYS}")


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
                  remats=[r for r in args.remat.split(",") if r],
                  usable_fraction=args.usable_fraction,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_plan(result))
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxscale.analysis.plot import plot_run

    print(plot_run(args.workdir, args.out))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxscale",
        description="Train Flax models sharded over a device mesh.",
        epilog=(f"presets: {', '.join(config_lib.presets())}\n"
                "example: jaxscale train --config tiny --cpu-devices 8 mesh.fsdp=8 steps=200"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model",
                       epilog=f"presets: {', '.join(config_lib.presets())}\nmain keys: {MAIN_KEYS}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="show the resolved config")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

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
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "inspect", help="compile the train step without running it: shardings, memory, FLOPs, "
                        "collectives, warnings",
        epilog="example: jaxscale inspect --config tiny --cpu-devices 8 mesh.fsdp=8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="inspect for N simulated CPU devices")
    p.add_argument("--warn-replicated-bytes", type=int, default=1 << 20, metavar="BYTES",
                   help="warn about replicated parameters from this size (default: 1 MiB)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
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
    p.add_argument("--remat", default="full,minimal,none", metavar="POLICIES",
                   help="comma-separated remat policies to try, least memory first (default: "
                        "full,minimal,none)")
    p.add_argument("--usable-fraction", type=float, default=0.9,
                   help="share of device memory the step may use (default: 0.9)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plot", help="plot a run's loss and throughput to a PNG")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/loss.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxscale` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
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
