"""The `ift-jax` command (also `python -m ift_jax`).

Subcommands are added as the features behind them land; each one here works.
Flag parsing lives here (and, for `train` / `sweep`, in `ift_jax.run_flags`)
and nowhere in the library.

Errors: a `UserError` (`ift_jax.errors`) is printed as one line
`ift-jax COMMAND: error: ...` with exit status 2; anything else is a bug (ours,
or in a user's own task or metric function) and keeps its traceback. `--verbose` (any command) or
`IFT_JAX_VERBOSE=1` keeps the libraries' start-up logging (`ift_jax.console`).

Only stdlib, `console`, `errors` and the parsers of `cli_tasks` and
`cli_study` are imported up here (and, in `main`, `sweep_points`: a sweep's point
asks to die with its sweep before anything else); everything that
imports jax, TensorFlow or absl is imported inside the commands, so `main` can
quiet those libraries before they load (jax sets TF_CPP_MIN_LOG_LEVEL=1 on
import, for one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from ift_jax import cli_study, cli_tasks, console, errors


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


def _quiet_logging() -> None:
    console.setup_logging(console.is_verbose())


def _shots(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise errors.ConfigError(f"--incontext={text!r}: give shot counts like 0,1,3") from None


def _mesh(args: argparse.Namespace):
    from ift_jax import runs
    return runs.parse_mesh(args.mesh) if getattr(args, "mesh", None) else None


def _eval(args: argparse.Namespace) -> int:
    _quiet_logging()
    from ift_jax import distributed, evaluator
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    shots = _shots(args.incontext) if args.incontext is not None else None
    if args.init_from:
        config = _eval_only_config(args)
        results = evaluator.evaluate_model(config, args.workdir, _mesh(args))
        print(f"evaluated {args.init_from} on {len(results)} tasks as step 0 of "
              f"{args.workdir}; tables in {args.workdir}/report/")
        return 0
    if args.suites is not None or args.config:
        raise errors.ConfigError("--suites and --config go with --init_from (a model without a "
                                 "run); a run is evaluated with the eval settings of its own "
                                 "config.json")
    outcome = evaluator.evaluate_checkpoints(args.workdir, args.checkpoints, shots, _mesh(args))
    print(f"{outcome.summary()}; tables in {args.workdir}/report/")
    return 0 if not outcome.unreadable else 1


def _init_from_config(init_from: str, vocab: Optional[str], config_path: Optional[str] = None):
    """A config for a model with no training run: `config_path` (default: the embedded
    default) with `init_from`, its vocabulary and no training mixture."""
    from ift_jax import config_files
    from ift_jax.data import sentencepiece_file
    config = config_files.load(config_path or default_config_path())
    config.init_from = init_from
    config.data.vocab = vocab or _vocab_of(init_from)
    spec = config.data.vocab or os.path.join(init_from, "spiece.model")
    if spec != "byte":
        sentencepiece_file.check(spec)  # Before the model is read.
    config.data.mixture = ""
    return config


def _eval_only_config(args: argparse.Namespace):
    """The config of `ift-jax eval --init_from=DIR`: `_init_from_config` of `--config`
    with the benchmark suites or tasks."""
    from ift_jax import suites
    for suite in suites.parse(args.suites or ""):  # Unknown names and missing data first.
        suites.check_data(suite)
    config = _init_from_config(args.init_from, args.vocab, args.config)
    config.eval.tasks = args.tasks or ""
    config.eval.suites = args.suites or ""
    if args.incontext:
        config.eval.incontext_shots = args.incontext
    if args.max_examples is not None:
        config.eval.max_examples = config.eval.suite_max_examples = args.max_examples
    return config


def _vocab_of(init_from: str) -> str:
    """The vocabulary of a model to evaluate: its `spiece.model` (HF directory), or the
    `data.vocab` of an ift_jax workdir."""
    if os.path.exists(os.path.join(init_from, "spiece.model")):
        return ""  # model_setup.vocabulary_spec finds it.
    saved = os.path.join(init_from, "config.json")
    if os.path.isdir(os.path.join(init_from, "checkpoints")) and os.path.exists(saved):
        with open(saved) as f:
            return json.load(f).get("data", {}).get("vocab") or ""
    raise errors.ConfigError(f"--init_from={init_from} has no spiece.model; pass --vocab=byte "
                             f"or --vocab=PATH/spiece.model (the model's SentencePiece file)")


def _add_eval_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="decode and score a run's checkpoints (skips those already "
        "evaluated), or an HF model with --init_from",
        description="Evaluate a run's checkpoints on the run's configured mesh over this "
        "job's devices, or (with --init_from) a model with no training run, written as "
        "step 0 of --workdir.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoints", default="all", help="all | latest | STEP")
    parser.add_argument("--incontext", default=None, metavar="K,K,...",
                        help="also evaluate the untuned starting model with K train "
                             "exemplars per input, e.g. 0,1,3 (default: eval.incontext_shots)")
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes to evaluate on, e.g. 1,4,2 "
                             "(default: the run's mesh over this job's devices)")
    parser.add_argument("--init_from", default=None, metavar="DIR",
                        help="evaluate this model (an HF T5 directory or an ift_jax "
                             "workdir) instead of a run's checkpoints")
    parser.add_argument("--suites", default=None, metavar="S,S,...",
                        help="with --init_from: benchmark suites, e.g. mmlu_5shot,bbh_direct")
    parser.add_argument("--tasks", default=None, metavar="T,T,...",
                        help="with --init_from: tasks or mixtures to evaluate")
    parser.add_argument("--config", default=None,
                        help="with --init_from: config file for the eval settings "
                             "(default: configs/default.py)")
    parser.add_argument("--vocab", default=None,
                        help="with --init_from: vocabulary (default: the model's "
                             "spiece.model)")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="with --init_from: examples per task and suite task (0 = all)")
    parser.set_defaults(run=_eval)


def _report(args: argparse.Namespace) -> int:
    from ift_jax import report
    path = report.write_report(args.workdir)
    print(f"wrote {path}")
    print(report.forgetting_summary(args.workdir))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _quiet_logging()
    if args.init_from or args.adapter:
        return _predict_adapters(args)
    if not args.workdir:
        raise errors.ConfigError("give --workdir=RUN, or --init_from=BASE [--adapter=NAME=DIR]")
    from ift_jax import distributed, evaluator, input_rows
    input_rows.check_output(args.output, args.input)
    inputs = input_rows.read_rows(args.input)
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    rows = evaluator.predict_rows(args.workdir, inputs, args.step,
                                  num_beams=args.num_beams,
                                  max_decode_length=args.max_decode_length, mesh=_mesh(args))
    input_rows.write_rows(rows, args.output, "predictions")
    return 0


def _predict_adapters(args: argparse.Namespace) -> int:
    """`predict --init_from=BASE --adapter=NAME=DIR ...`: rows of any adapters in one batch."""
    from ift_jax import input_rows, serving
    if args.workdir or not args.init_from or args.step is not None or args.mesh or (
            args.num_beams or 1) > 1:
        raise errors.ConfigError("--adapter goes with --init_from=BASE (not --workdir, --step "
                                 "or --mesh) and decodes greedily (no --num_beams)")
    input_rows.check_output(args.output, args.input)
    adapters = serving.parse_adapters(args.adapter or [])
    rows = input_rows.read_rows(args.input, check=serving.row_check(list(adapters)))
    config = _init_from_config(args.init_from, args.vocab)
    input_rows.write_rows(serving.predict_rows(config, adapters, rows,
                                               max_decode_length=args.max_decode_length),
                          args.output, "predictions")
    return 0


def _score_run(args: argparse.Namespace):
    """(the run to score, its step): `--workdir`'s checkpoint or `--init_from`'s model."""
    from ift_jax import runs
    if bool(args.workdir) == bool(args.init_from):
        raise errors.ConfigError("give one of --workdir=RUN (its checkpoints) or --init_from="
                                 "DIR (an HF T5 directory, t5x checkpoint or ift_jax workdir)")
    if args.workdir and args.vocab or args.init_from and args.step is not None:
        raise errors.ConfigError("--step goes with --workdir (a run's checkpoint), --vocab with "
                                 "--init_from (a run scores with its own data.vocab)")
    mesh = _mesh(args)
    if args.workdir:
        return runs.Run.open(args.workdir, mesh_override=mesh), args.step
    config = _init_from_config(args.init_from, args.vocab)
    return runs.Run.from_config(
        config, None, runs.run_mesh(config.get("mesh"), mesh) if mesh else None), 0


def _score(args: argparse.Namespace) -> int:
    _quiet_logging()
    import jax

    from ift_jax import distributed, evaluator, input_rows
    input_rows.check_output(args.output, args.input)
    rows = input_rows.read_rows(args.input, ("inputs", "targets"))
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    run, step = _score_run(args)
    try:
        if args.inputs_length:
            run.config.data.inputs_length = args.inputs_length
        scored = evaluator.score_rows(run, rows, step)
    finally:
        run.close()
    if jax.process_index() != 0:
        return 0
    per_token = sum(r["log_likelihood"] for r in scored) / sum(r["tokens"] for r in scored)
    input_rows.write_rows(scored, args.output, "scores",
                          f"; log-likelihood per target token over all rows {per_token:.4f}")
    return 0


def _add_score_parser(sub) -> None:
    parser = sub.add_parser(
        "score", help="log-likelihood of given targets for given inputs (t5x's score mode)",
        description="For each line {\"inputs\": ..., \"targets\": ...} of a JSONL file, "
        "the log-likelihood of the targets given the inputs (sum over the target tokens "
        "with EOS, per token, perplexity, argmax hits), in length-bucketed batches on the "
        "model's mesh.")
    parser.add_argument("--workdir", default=None, help="a run: score its checkpoint")
    parser.add_argument("--init_from", default=None, metavar="DIR",
                        help="or a model with no run: an HF T5 directory, t5x checkpoint "
                             "or ift_jax workdir")
    parser.add_argument("--input", required=True,
                        help='JSONL, one {"inputs": "...", "targets": "..."} per line')
    parser.add_argument("--output", help="JSONL with the scores added (default: stdout)")
    parser.add_argument("--step", type=int, default=None,
                        help="with --workdir: default the latest checkpoint; 0 = the "
                             "starting model")
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes (default: the run's mesh)")
    parser.add_argument("--vocab", default=None,
                        help="with --init_from: vocabulary (default: its spiece.model)")
    parser.add_argument("--inputs_length", type=int, default=None,
                        help="inputs are cut to this many tokens (default: data."
                             "inputs_length of the run, or of configs/default.py)")
    parser.set_defaults(run=_score)


def _add_report_and_predict_parsers(sub) -> None:
    parser = sub.add_parser("report", help="plots, tables, forgetting and a markdown summary "
                            "of a run in WORKDIR/report/")
    parser.add_argument("--workdir", required=True)
    parser.set_defaults(run=_report)
    parser = sub.add_parser("predict", help="generate from a trained run, or a base model "
                            "with per-row adapters, for the 'inputs' of each line of a JSONL "
                            "file")
    parser.add_argument("--workdir", help="a run: its checkpoint")
    parser.add_argument("--init_from", metavar="BASE", help="or a base model (HF T5 dir, t5x "
                        "checkpoint or ift_jax workdir) serving the --adapter's")
    parser.add_argument("--adapter", action="append", metavar="NAME=DIR",
                        help="with --init_from, repeatable: an HF PEFT LoRA or prompt-tuning "
                        "adapter that rows name in their 'adapter' field (none: the base)")
    parser.add_argument("--vocab", help="with --init_from: vocabulary (default: its spiece."
                        "model)")
    parser.add_argument("--input", required=True, help='JSONL, one {"inputs": "..."} per line'
                        ' (with --adapter, optionally "adapter": NAME)')
    parser.add_argument("--output", help="JSONL with a 'prediction' added (default: stdout)")
    parser.add_argument("--step", type=int, default=None, help="default: latest checkpoint")
    parser.add_argument("--num_beams", type=int, default=None, help="default: eval.num_beams")
    parser.add_argument("--max_decode_length", type=int, default=None)
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes (default: the run's mesh over "
                             "this host's devices)")
    parser.set_defaults(run=_predict)


def _inspect_prompt(args: argparse.Namespace) -> int:
    _quiet_logging()
    from ift_jax import prompt_neighbors
    result = prompt_neighbors.write(args.workdir, args.step, args.k, args.metric)
    sys.stdout.write(prompt_neighbors.markdown(result))
    print(f"wrote {args.workdir}/report/{prompt_neighbors.MARKDOWN_FILE} and .json")
    return 0


def _add_inspect_prompt_parser(sub) -> None:
    parser = sub.add_parser(
        "inspect-prompt", help="nearest vocabulary tokens of each position of a prompt-tuning "
        "run's soft prompt", description="Per prompt position, the k vocabulary embeddings "
        "nearest it, as decoded tokens with their distances; also written to "
        "WORKDIR/report/prompt_neighbors.{md,json}.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None,
                        help="default: the latest checkpoint; 0 = the initial prompt")
    parser.add_argument("--k", type=int, default=5, help="neighbors per position (default 5)")
    parser.add_argument("--metric", choices=("cosine", "l2"), default="cosine")
    parser.set_defaults(run=_inspect_prompt)


def _export(args: argparse.Namespace) -> int:
    _quiet_logging()
    from ift_jax import distributed, export
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    run = export.export_hf if args.format == "hf" else export.export_peft
    print(run(args.workdir, args.output, args.step, _mesh(args), overwrite=args.overwrite))
    return 0


def _add_export_parser(sub) -> None:
    parser = sub.add_parser(
        "export", help="write a run as an HF model (merged) or an HF PEFT LoRA adapter")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--format", choices=("hf", "peft"), required=True)
    parser.add_argument("--output", required=True,
                        help="folder to write: new or empty, or an earlier export with "
                             "--overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the export already in --output (never a folder that "
                             "holds anything else)")
    parser.add_argument("--step", type=int, default=None, help="default: latest checkpoint")
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes to read the run on (default: the "
                             "run's mesh over this host's devices)")
    parser.set_defaults(run=_export)


def _convert(args: argparse.Namespace) -> int:
    import shutil

    from ift_jax import hf, t5x_checkpoint
    from ift_jax.data import sentencepiece_file
    from ift_jax.models import t5
    overrides = {k: getattr(args, k) for k in ("feed_forward_proj",
                                              "relative_attention_max_distance")
                 if getattr(args, k) is not None}
    if args.vocab:
        sentencepiece_file.check(args.vocab)
    config, params = t5x_checkpoint.load_t5x(args.t5x_checkpoint, **overrides)
    if args.vocab:
        sentencepiece_file.check_fits(args.vocab, config.vocab_size)
    hf.save_t5(args.output, config, params)
    if args.vocab:  # Where init_from=HF_DIR with an empty data.vocab looks for it.
        shutil.copyfile(args.vocab, os.path.join(args.output, "spiece.model"))
    step = t5x_checkpoint.checkpoint_step(args.t5x_checkpoint)
    print(f"wrote {args.output}: HF T5 ({t5.param_count(config):,} params) from t5x "
          f"checkpoint {args.t5x_checkpoint}" + (f" (step {step})" if step is not None else ""))
    return 0


def _add_convert_parser(sub) -> None:
    parser = sub.add_parser(
        "convert", help="write a t5x checkpoint (FLAN-T5's release format) as an HF directory",
        description="Reads the params of a t5x checkpoint (msgpack index + TensorStore "
                    "arrays; see ift_jax/t5x_checkpoint.py) and writes an HF T5 directory "
                    "that transformers and --config.init_from load.")
    parser.add_argument("--t5x_checkpoint", required=True,
                        help="a checkpoint_<step> folder (or a t5x model dir: its latest)")
    parser.add_argument("--output", required=True, help="HF directory to write")
    parser.add_argument("--format", choices=("hf",), default="hf",
                        help="hf: config.json + model.safetensors (default)")
    parser.add_argument("--vocab", help="SentencePiece .model to copy in as spiece.model "
                        "(FLAN-T5: cc_all.32000.100extra/sentencepiece.model)")
    parser.add_argument("--feed_forward_proj", default=None,
                        help="gated activation when not gelu, e.g. gated-silu "
                             "(the weights cannot show it)")
    parser.add_argument("--relative_attention_max_distance", type=int, default=None,
                        help="default 128, t5x's (the weights cannot show it)")
    parser.set_defaults(run=_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ift-jax", description="Instruction fine-tuning of T5-family models in JAX.",
        epilog="`ift-jax COMMAND --help` describes a command; --verbose (any command) keeps "
               "the start-up logging of TensorFlow, XLA and absl.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train: --config=FILE[:arg] --workdir=DIR [--config.a.b=v]",
                   add_help=False)
    sub.add_parser("sweep", help="run a config's get_sweep() points one after another: "
                   "--config=FILE[:arg] --workdir=ROOT [--dry_run] [--in_process] "
                   "[--config.a.b=v]",
                   add_help=False)
    sub.add_parser("plan", help="compile a config's training step ahead of time for a "
                   "topology and report per-device memory, FLOPs and whether it fits: "
                   "--config=FILE[:arg] [--mesh=D,F,T] [--devices=N | --topology=v4-8|v4-32|"
                   "v5e-16|h100|h200]", add_help=False)

    info = sub.add_parser(
        "model-info", help="params of a T5 preset or HF checkpoint: shapes, axes, counts",
        description="Print every param with its shape and logical axes, and the total. "
                    "With --hf_dir the checkpoint is fully loaded, so this also checks it.")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--model", default="base",
                        help="T5 preset: tiny, small, base, large, xl, xxl (default: base)")
    source.add_argument("--hf_dir", help="HF T5/FLAN-T5/mT5 directory to load")
    info.set_defaults(run=_model_info)
    cli_tasks.add_parser(sub)
    _add_export_parser(sub)
    _add_convert_parser(sub)
    _add_eval_parser(sub)
    _add_report_and_predict_parsers(sub)
    _add_score_parser(sub)
    cli_study.add_parser(sub, main)
    _add_inspect_prompt_parser(sub)
    return parser


CONFIG_COMMANDS = ("train", "sweep", "plan")
PLAN_USAGE = ("usage: ift-jax plan --config=FILE[:arg] [--config.a.b=v ...] "
              "[--mesh=DATA,FSDP,TENSOR] [--devices=N | --topology=NAME]")


def default_config_path() -> str:
    from ift_jax import config_files
    return config_files.default_path()


def _parse_config_flags(command: str, argv: Sequence[str]):
    """(config, workdir) of a `train` argv, checked (`run_flags.parse_train`)."""
    del command  # Sweep points are `ift-jax train` command lines too.
    from ift_jax import run_flags
    parsed = run_flags.parse_train(argv)
    return parsed.config, parsed.workdir


def _train(argv: Sequence[str]) -> int:
    from ift_jax import run_flags
    if run_flags.wants_help(argv):
        sys.stdout.write(run_flags.train_help(argv))
        return 0
    parsed = run_flags.parse_train(argv)
    console.setup_logging(console.is_verbose())
    from ift_jax import config_checks, distributed
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    import jax
    config_checks.validate_for_devices(parsed.config, jax.device_count(), jax.process_count())
    from ift_jax import train
    # Passed only when given (tests stand in for train_and_evaluate with fewer arguments).
    extra = ({"allow_config_changes": parsed.allow_config_changes}
             if parsed.allow_config_changes else {})
    if parsed.start_over:
        extra["start_over"] = True
    train.train_and_evaluate(parsed.config, parsed.workdir, **extra)
    return 0


PLAN_FLAGS = ("--mesh", "--devices", "--topology")


def split_plan_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """`ift-jax plan`'s own flags (`{"--topology": "v4-8", ...}`) and the train flags."""
    values = {name: a.split("=", 1)[1] for a in argv for name in PLAN_FLAGS
              if a.startswith(name + "=")}
    return values, [a for a in argv if not a.startswith(tuple(f + "=" for f in PLAN_FLAGS))]


def _plan(argv: Sequence[str]) -> int:
    """`ift-jax plan`: the training step compiled ahead of time for a topology."""
    from ift_jax import plan, run_flags
    values, rest = split_plan_flags(argv)
    if run_flags.wants_help(rest):
        sys.stdout.write(PLAN_USAGE + "\ntopologies: " + ", ".join(
            f"{t.name} ({t.devices} devices, {t.memory_bytes / plan.GiB:.0f} GiB)"
            for t in plan.TOPOLOGIES.values()) + "\n")
        return 0
    if "--devices" in values and "--topology" in values:
        raise errors.ConfigError(f"give --devices or --topology, not both; {PLAN_USAGE}")
    console.setup_logging(console.is_verbose())
    config = run_flags.parse_train(rest, require_workdir=False).config
    mesh = None
    if "--mesh" in values:
        sizes = values["--mesh"].split(",")
        if len(sizes) != 3 or not all(s.strip().lstrip("-").isdigit() for s in sizes):
            raise errors.ConfigError(f"--mesh={values['--mesh']!r} must be three sizes "
                                     f"DATA,FSDP,TENSOR (one may be -1), e.g. --mesh=1,-1,1")
        mesh = dict(zip(("data", "fsdp", "tensor"), (int(s) for s in sizes)))
    devices = values.get("--devices")
    if devices is not None and not devices.isdigit():
        raise errors.ConfigError(f"--devices={devices!r} must be a device count, e.g. 8")
    result = plan.plan(config, devices=int(devices) if devices else None,
                       topology=values.get("--topology"), mesh_sizes=mesh)
    print(result.summary())
    return 0 if result.fits is not False else 1


SWEEP_FLAGS = ("--dry_run", "--in_process")


def _sweep(argv: Sequence[str]) -> int:
    from ift_jax import run_flags, sweeps
    if run_flags.wants_help(argv):
        spec, _ = run_flags.config_spec([a for a in argv if a not in run_flags.HELP_FLAGS])
        points = sweeps.load_points(spec) if sweeps.has_sweep(spec) else []
        sys.stdout.write(run_flags.sweep_help(argv, [(sweeps.point_name(p), sweeps.overrides(p))
                                                     for p in points]))
        return 0
    console.setup_logging(console.is_verbose())
    dry_run, in_process = "--dry_run" in argv, "--in_process" in argv
    only = [name for a in argv if a.startswith("--points=")
            for name in a[len("--points="):].split(",") if name]
    argv = [a for a in argv if a not in SWEEP_FLAGS and not a.startswith("--points=")]
    specs = [a[len("--config="):] for a in argv if a.startswith("--config=")]
    roots = [a[len("--workdir="):] for a in argv if a.startswith("--workdir=")]
    unknown = [a for a in argv if not a.startswith(("--config=", "--workdir=", "--config."))]
    if len(specs) != 1 or len(roots) != 1 or unknown:
        raise errors.ConfigError(
            "usage: ift-jax sweep --config=FILE[:arg] --workdir=ROOT [--dry_run] "
            "[--in_process] [--points=NAME,...] [--config.a.b=v ...]"
            + (f"; unexpected {unknown}" if unknown else ""))
    extra = [a for a in argv if a.startswith("--config.")]
    failed = sweeps.run(specs[0], roots[0], extra, dry_run,
                        validate=lambda point_argv: _parse_config_flags("train", point_argv),
                        in_process=main if in_process else None, only=only)
    if failed:
        print(f"ift-jax sweep: {failed} point(s) failed; see {roots[0]}/sweep_summary.md",
              file=sys.stderr)
        return 1
    if not dry_run:
        print(f"sweep summary: {roots[0]}/sweep_summary.md")
    return 0


CACHE_ENV = "IFT_JAX_COMPILATION_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "ift_jax", "xla")


def use_compilation_cache() -> Optional[str]:
    """Turns on XLA's persistent compilation cache; its folder, or None when off.

    A run compiles its train step (T5 small on 2 CPU cores: ~8 s; large on a
    GPU: more), and every sweep point, restart after preemption or `ift-jax
    eval` compiles the same programs again: with the cache each is compiled
    once per machine. `$IFT_JAX_COMPILATION_CACHE` names the folder (default
    `~/.cache/ift_jax/xla`; `off` turns it off); a cache the user set up
    (`JAX_COMPILATION_CACHE_DIR`, `jax_compilation_cache_dir`) is left as it is.
    """
    import jax
    own = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if own:
        return own
    path = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
    if path.lower() in ("", "off", "0", "false", "none"):
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


# What the CLI reports as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns its exit status (0 ok, 1 failed points, 2 user error).

    Called without `argv` (the `ift-jax` process itself) it also filters the
    libraries' native start-up noise from stderr (`console`); with an argv (tests,
    in-process sweeps) it leaves file descriptors alone.
    """
    whole_process = argv is None
    if whole_process:
        from ift_jax import sweep_points  # Stdlib only: before the libraries load.
        sweep_points.die_with_sweep()
    argv = list(sys.argv[1:] if argv is None else argv)
    console.quiet(console.verbose_requested(argv), filter_stderr=whole_process)
    use_compilation_cache()
    if argv and argv[0] in CONFIG_COMMANDS:
        try:
            return {"train": _train, "sweep": _sweep, "plan": _plan}[argv[0]](argv[1:])
        except USER_ERRORS as e:
            print(f"ift-jax {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed.
        return e.code if isinstance(e.code, int) else 0
    try:
        return args.run(args)
    except USER_ERRORS as e:  # User mistakes: one line.
        print(f"ift-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
