"""`ift-jax study NAME`: the parser and handler (`cli` wires them in; the runner is
`ift_jax.studies_runner`, imported when the command runs)."""

from __future__ import annotations

import argparse
from typing import Callable

from ift_jax import console


def _study(args: argparse.Namespace, main: Callable[[list[str]], int]) -> int:
    console.setup_logging(console.is_verbose())
    from ift_jax import studies_runner
    command = ["ift-jax", "study", args.name, f"--preset={args.preset}",
               f"--workdir={args.workdir}"]
    command += [f"--{k}={getattr(args, k)}" for k in ("init_from", "page_dir")
                if getattr(args, k)]
    command += [f"--{k}" for k in ("page_only", "in_process") if getattr(args, k)]
    return studies_runner.run(args.name, args.preset, args.workdir, init_from=args.init_from,
                              page_dir=args.page_dir, dry_run=args.dry_run,
                              page_only=args.page_only,
                              in_process=main if args.in_process else None, command=command)


def add_parser(sub, main: Callable[[list[str]], int]) -> None:
    """`ift-jax study NAME`; `main` (the CLI's) runs the steps with --in_process."""
    parser = sub.add_parser(
        "study", help="run a study (docs/studies/): its train/eval steps, then its page",
        description="Runs a study's steps (each an ordinary ift-jax train / eval command, "
        "one process each; finished steps are skipped, so a stopped study resumes) and "
        "writes its page, plot and results JSON. Studies: base, forgetting, "
        "multitask_remedy, lora_rank, prompt_vs_scale, icl_vs_finetuned, "
        "dialogsum_flan_t5 (ift_jax/studies/).")
    parser.add_argument("name", metavar="NAME", help="the study")
    parser.add_argument("--workdir", required=True, metavar="ROOT",
                        help="folder of the study's runs (shared by studies: the base "
                             "model is trained once)")
    parser.add_argument("--preset", default="cpu",
                        help="smoke (CI: tiny, seconds), cpu (default) or gpu")
    parser.add_argument("--init_from", default="", metavar="DIR",
                        help="dialogsum_flan_t5 only: the FLAN-T5-base HF directory")
    parser.add_argument("--page_dir", default="", metavar="DIR",
                        help="where the page, plot and JSON go (default: ROOT/NAME/; "
                             "docs/studies for the committed ones)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the steps' commands (marking those done) and stop")
    parser.add_argument("--page_only", action="store_true",
                        help="run nothing; write the page from the steps done so far")
    parser.add_argument("--in_process", action="store_true",
                        help="run the steps in this process (no start-up per step; the "
                             "CPU time shown is then this process's)")
    parser.set_defaults(run=lambda args: _study(args, main))
