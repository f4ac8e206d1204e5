"""The `ift-jax` command (also `python -m ift_jax`).

Subcommands are added as the features behind them land; each one here works.
Flag parsing lives here and nowhere in the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

# TensorFlow (tf.data under SeqIO) logs C++ warnings such as cache notices on
# every run; keep errors only, unless the user asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


def _load_tasks(args: argparse.Namespace) -> None:
    from ift_jax.data import sources, vocabularies
    if args.data_dir:
        sources.set_data_dir(args.data_dir)
    if args.vocab:
        vocabularies.set_vocabulary(args.vocab)
    import ift_jax.tasks  # noqa: F401  (registers tasks and mixtures)


def _tasks_list(args: argparse.Namespace) -> int:
    _load_tasks(args)
    from ift_jax.data import inspection
    rows = inspection.list_tasks()
    width = max(len(r.name) for r in rows)
    print(f"{'task':<{width}}  {'splits':<23} {'templates':>9}  {'rendering':<16} "
          f"{'metrics':<20} source")
    for r in rows:
        print(f"{r.name:<{width}}  {','.join(r.splits):<23} {r.num_templates:>9}  "
              f"{r.mode:<16} {','.join(r.metrics):<20} {r.source}")
    import seqio
    print(f"\n{len(rows)} tasks; mixtures: {', '.join(sorted(seqio.MixtureRegistry.names()))}")
    return 0


def _tasks_preview(args: argparse.Namespace) -> int:
    _load_tasks(args)
    from ift_jax.data import inspection
    for i, example in enumerate(inspection.preview(args.name, args.split, args.n)):
        print(f"=== {args.name} [{args.split}] #{i}  id={example['id']}  "
              f"template={example['template']}")
        print(f"--- inputs\n{example['inputs']}\n--- targets\n{example['targets']}")
        print(f"--- references\n{example['references']}\n")
    return 0


def _tasks_stats(args: argparse.Namespace) -> int:
    _load_tasks(args)
    from ift_jax.data import inspection
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    header = "  ".join(f"p{p:<5}" for p in inspection.PERCENTILES)
    for task in inspection.tasks_of(args.name):
        print(f"{task.name} [{args.split}] ({task.source.num_input_examples(args.split)} "
              f"examples; token lengths with EOS, vocabulary {_vocab_name()})")
        print(f"  {'feature':<8} {'limit':>6}  {header}  truncated")
        for s in inspection.length_stats(task, args.split, lengths, args.max_examples):
            cells = "  ".join(f"{s.percentiles[p]:<6}" for p in inspection.PERCENTILES)
            print(f"  {s.feature:<8} {s.max_length:>6}  {cells}  {s.truncated} of {s.count} "
                  f"({100 * s.truncated_share:.1f}%)")
    return 0


def _vocab_name() -> str:
    from ift_jax.data.vocabularies import TASK_VOCABULARY
    return TASK_VOCABULARY.spec


def _tasks_train_spm(args: argparse.Namespace) -> int:
    _load_tasks(args)
    from ift_jax.data import inspection, vocabularies
    texts = []
    for task in inspection.tasks_of(args.name):
        columns = task.source.rendered(args.split)
        texts += columns["inputs"] + columns["targets"]
    path = vocabularies.train_sentencepiece(texts, args.output, args.vocab_size)
    print(f"wrote {path} ({args.vocab_size} pieces from {len(texts)} texts of {args.name})")
    return 0


def _quiet_logging() -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def _shots(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--incontext={text!r}: give shot counts like 0,1,3") from None


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
        raise ValueError("--suites and --config go with --init_from (a model without a "
                         "run); a run is evaluated with the eval settings of its own "
                         "config.json")
    outcome = evaluator.evaluate_checkpoints(args.workdir, args.checkpoints, shots, _mesh(args))
    print(f"{outcome.summary()}; tables in {args.workdir}/report/")
    return 0 if not outcome.unreadable else 1


def _eval_only_config(args: argparse.Namespace):
    """The config of `ift-jax eval --init_from=DIR`: `--config` (default: the embedded
    default) with `init_from`, the benchmark suites or tasks, and no training mixture."""
    import importlib.util
    path = args.config or default_config_path()
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_ift_jax_eval_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.init_from = args.init_from
    config.data.vocab = args.vocab or ""
    config.data.mixture = ""
    config.eval.tasks = args.tasks or ""
    config.eval.suites = args.suites or ""
    if args.incontext:
        config.eval.incontext_shots = args.incontext
    if args.max_examples is not None:
        config.eval.max_examples = args.max_examples
    return config


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
                        help="with --init_from: examples per task (0 = all)")
    parser.set_defaults(run=_eval)


def _report(args: argparse.Namespace) -> int:
    from ift_jax import report
    path = report.write_report(args.workdir)
    print(f"wrote {path}")
    print(report.forgetting_summary(args.workdir))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _quiet_logging()
    import json
    from ift_jax import distributed, evaluator
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    rows = evaluator.predict_rows(args.workdir, evaluator.read_inputs(args.input), args.step,
                                  num_beams=args.num_beams,
                                  max_decode_length=args.max_decode_length, mesh=_mesh(args))
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(lines)
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        sys.stdout.writelines(lines)
    return 0


def _add_report_and_predict_parsers(sub) -> None:
    parser = sub.add_parser("report", help="plots, tables, forgetting and a markdown summary "
                            "of a run in WORKDIR/report/")
    parser.add_argument("--workdir", required=True)
    parser.set_defaults(run=_report)
    parser = sub.add_parser("predict", help="generate from a trained run for the 'inputs' "
                            "of each line of a JSONL file")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input", required=True, help='JSONL, one {"inputs": "..."} per line')
    parser.add_argument("--output", help="JSONL with a 'prediction' added (default: stdout)")
    parser.add_argument("--step", type=int, default=None, help="default: latest checkpoint")
    parser.add_argument("--num_beams", type=int, default=None, help="default: eval.num_beams")
    parser.add_argument("--max_decode_length", type=int, default=None)
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes (default: the run's mesh over "
                             "this host's devices)")
    parser.set_defaults(run=_predict)


def _export(args: argparse.Namespace) -> int:
    from ift_jax import distributed, export
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    run = export.export_hf if args.format == "hf" else export.export_peft
    print(run(args.workdir, args.output, args.step, _mesh(args)))
    return 0


def _add_export_parser(sub) -> None:
    parser = sub.add_parser(
        "export", help="write a run as an HF model (merged) or an HF PEFT LoRA adapter")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--format", choices=("hf", "peft"), required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--step", type=int, default=None, help="default: latest checkpoint")
    parser.add_argument("--mesh", default=None, metavar="D,F,T",
                        help="mesh data,fsdp,tensor sizes to read the run on (default: the "
                             "run's mesh over this host's devices)")
    parser.set_defaults(run=_export)


def _add_tasks_parser(sub) -> None:
    tasks = sub.add_parser("tasks", help="list, preview and measure SeqIO tasks and mixtures")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", help="folder holding the datasets "
                        "(default: $IFT_JAX_DATA_DIR)")
    common.add_argument("--vocab", help="'byte' or a SentencePiece .model path "
                        "(default: $IFT_JAX_VOCAB or byte)")

    listing = tasks_sub.add_parser("list", parents=[common], help="every registered task")
    listing.set_defaults(run=_tasks_list)

    show = tasks_sub.add_parser("preview", parents=[common],
                                help="rendered inputs and targets, with the template used")
    show.add_argument("name")
    show.add_argument("--split", default="validation")
    show.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    show.set_defaults(run=_tasks_preview)

    stats = tasks_sub.add_parser("stats", parents=[common],
                                 help="token-length percentiles and share truncated")
    stats.add_argument("name", help="task or mixture")
    stats.add_argument("--split", default="train")
    stats.add_argument("--inputs_length", type=int, default=512)
    stats.add_argument("--targets_length", type=int, default=128)
    stats.add_argument("--max_examples", type=int, default=None)
    stats.set_defaults(run=_tasks_stats)

    spm = tasks_sub.add_parser("train-spm", parents=[common],
                               help="train a SentencePiece model on a task's or mixture's text")
    spm.add_argument("name", help="task or mixture")
    spm.add_argument("--output", required=True, help="model prefix; writes PREFIX.model")
    spm.add_argument("--vocab_size", type=int, default=8000)
    spm.add_argument("--split", default="train")
    spm.set_defaults(run=_tasks_train_spm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ift-jax", description="Instruction fine-tuning of T5-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train: --config=FILE[:arg] --workdir=DIR [--config.a.b=v]",
                   add_help=False)
    sub.add_parser("sweep", help="run a config's get_sweep() points one after another: "
                   "--config=FILE[:arg] --workdir=ROOT [--dry_run] [--in_process] "
                   "[--config.a.b=v]",
                   add_help=False)

    info = sub.add_parser(
        "model-info", help="params of a T5 preset or HF checkpoint: shapes, axes, counts",
        description="Print every param with its shape and logical axes, and the total. "
                    "With --hf_dir the checkpoint is fully loaded, so this also checks it.")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--model", default="base",
                        help="T5 preset: tiny, small, base, large, xl, xxl (default: base)")
    source.add_argument("--hf_dir", help="HF T5/FLAN-T5/mT5 directory to load")
    info.set_defaults(run=_model_info)
    _add_tasks_parser(sub)
    _add_export_parser(sub)
    _add_eval_parser(sub)
    _add_report_and_predict_parsers(sub)
    return parser


CONFIG_COMMANDS = ("train", "sweep")


def default_config_path() -> str:
    import ift_jax.configs
    return os.path.join(os.path.dirname(ift_jax.configs.__file__), "default.py")


def _parse_config_flags(command: str, argv: Sequence[str]):
    """absl + ml_collections flags: --config=FILE[:arg], --config.a.b=v, --workdir."""
    from absl import flags
    from ml_collections import config_flags
    values = flags.FlagValues()
    try:
        # The override flags (--config.a.b=v) are found in `sys_argv`.
        config_flags.DEFINE_config_file(
            "config", default=default_config_path(), flag_values=values, lock_config=True,
            sys_argv=[f"ift-jax {command}", *argv],
            help_string="config file (get_config(arg)); default: configs/default.py")
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval)",
                            flag_values=values)
        values([f"ift-jax {command}", *argv])
        config = values.config
    except (flags.Error, KeyError, AttributeError) as e:
        raise ValueError(_unknown_key_message(argv) or _flag_error(e)) from None
    if not values.workdir:
        raise ValueError("--workdir is required")
    return config, values.workdir


def _flag_error(error: Exception) -> str:
    """absl's first line, plus the config file's own error when it raised one
    (absl puts that at the end of a traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    first, last = lines[0], lines[-1]
    if "Traceback" in str(error) and last != first:
        return f"{first.rstrip(':')}: {last}"
    return first


def _unknown_key_message(argv: Sequence[str]) -> Optional[str]:
    """Names the first `--config.a.b=v` whose key does not exist, and the valid keys."""
    import importlib.util
    spec_arg = next((a[len("--config="):] for a in argv if a.startswith("--config=")),
                    default_config_path())
    path, _, config_arg = spec_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_ift_jax_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        root = module.get_config(config_arg or None)
    except Exception:  # The config itself is broken; absl's message says more.
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, path = root, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(path[:depth]) or "config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                return f"unknown config key {'.'.join(path)!r}; valid keys of {where}: {valid}"
            node = node[key]
    return None


def _train(argv: Sequence[str]) -> int:
    config, workdir = _parse_config_flags("train", argv)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ift_jax import distributed
    distributed.initialize(auto=os.environ.get("IFT_JAX_DISTRIBUTED") == "auto")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/seqio chatter
    from ift_jax import train
    train.train_and_evaluate(config, workdir)
    return 0


def _sweep(argv: Sequence[str]) -> int:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ift_jax import sweeps
    dry_run, in_process = "--dry_run" in argv, "--in_process" in argv
    argv = [a for a in argv if a not in ("--dry_run", "--in_process")]
    specs = [a[len("--config="):] for a in argv if a.startswith("--config=")]
    roots = [a[len("--workdir="):] for a in argv if a.startswith("--workdir=")]
    unknown = [a for a in argv if not a.startswith(("--config=", "--workdir=", "--config."))]
    if len(specs) != 1 or len(roots) != 1 or unknown:
        raise ValueError("usage: ift-jax sweep --config=FILE[:arg] --workdir=ROOT [--dry_run] "
                         "[--in_process] [--config.a.b=v ...]"
                         + (f"; unexpected {unknown}" if unknown else ""))
    extra = [a for a in argv if a.startswith("--config.")]
    failed = sweeps.run(specs[0], roots[0], extra, dry_run,
                        validate=lambda point_argv: _parse_config_flags("train", point_argv),
                        in_process=main if in_process else None)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    use_compilation_cache()
    if argv and argv[0] in CONFIG_COMMANDS:
        try:
            return (_train if argv[0] == "train" else _sweep)(argv[1:])
        except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
            print(f"ift-jax {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # User mistakes: one line.
        print(f"ift-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
