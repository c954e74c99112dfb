"""The `jaxscale` command line.

    jaxscale train --config NAME_OR_PATH [--cpu-devices N] [key=value ...]
    jaxscale config show --config NAME_OR_PATH [key=value ...]
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
from jaxscale.errors import ConfigError, NonFiniteError

# Exit codes (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (traceback printed)
EXIT_CONFIG = 2  # a bad setting or argument: one line on stderr, nothing run
EXIT_NONFINITE = 3  # on_nonfinite=abort stopped the run

MAIN_KEYS = (
    "steps, batch_size, seq_len, seed, workdir, log_every, eval_every, on_nonfinite, "
    "model.{num_layers,d_model,num_heads,num_kv_heads,d_ff,vocab_size,dtype,param_dtype,"
    "scan_layers,remat}, mesh.{data,fsdp,tensor,sequence,expert,stage}, sharding.rules, "
    "optim.{name,lr,schedule,warmup_steps,weight_decay,clip_norm,grad_accum}, "
    "data.{source,path,tokenizer}, checkpoint.{dir,every,keep}"
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


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    set_cpu_devices(args.cpu_devices)
    from jaxscale.train import train

    train(cfg)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    print(config_lib.to_yaml(config_lib.load(args.config, args.overrides)), end="")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxscale.plot import plot_run

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


if __name__ == "__main__":
    sys.exit(main())
