"""The `ift-jax` command (also `python -m ift_jax`).

Subcommands are added as the features behind them land; each one here works.
Flag parsing lives here and nowhere in the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence


def _model_info(args: argparse.Namespace) -> int:
    from ift_jax import hf, model_info
    from ift_jax.models import t5

    if args.hf_dir:
        config, params = hf.load_t5(args.hf_dir)
        source = f"HF checkpoint {args.hf_dir} (loaded and checked)"
    else:
        config = t5.get_config(args.model)
        source = f"preset {args.model!r} (shapes only, nothing allocated)"
    boxed = t5.abstract_variables(config)["params"]
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("dtype", "param_dtype")}
    header = f"# {source}\n# T5Config({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
    sys.stdout.write(model_info.format_model_info(boxed, header))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ift-jax", description="Instruction fine-tuning of T5-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "model-info", help="params of a T5 preset or HF checkpoint: shapes, axes, counts",
        description="Print every param with its shape and logical axes, and the total. "
                    "With --hf_dir the checkpoint is fully loaded, so this also checks it.")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--model", default="base",
                        help="T5 preset: tiny, small, base, large, xl, xxl (default: base)")
    source.add_argument("--hf_dir", help="HF T5/FLAN-T5/mT5 directory to load")
    info.set_defaults(run=_model_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # Includes hf.CheckpointError: a user mistake, one line.
        print(f"ift-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
