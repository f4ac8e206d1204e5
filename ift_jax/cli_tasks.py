"""`ift-jax tasks ...`: list, preview, measure, train a vocabulary on and cache the
registered SeqIO tasks and mixtures (the parsers and their handlers; `cli` wires
them in)."""

from __future__ import annotations

import argparse


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


def _tasks_cache(args: argparse.Namespace) -> int:
    _load_tasks(args)
    from ift_jax.data import cache
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    rows = cache.write(args.name, args.output, splits)
    print(f"cached {len(rows)} task splits of {args.name} ({sum(r[2] for r in rows)} examples, "
          f"vocabulary {_vocab_name()}) in {args.output}; train with "
          f"--config.data.cache_dir={args.output}")
    return 0


def add_parser(sub) -> None:
    """`ift-jax tasks ACTION`: list, preview, stats, train-spm, cache."""
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

    cached = tasks_sub.add_parser("cache", parents=[common],
                                  help="write a task's or mixture's tokenized examples for "
                                       "data.cache_dir")
    cached.add_argument("name", help="task or mixture")
    cached.add_argument("--output", required=True, help="cache folder (local or gs://)")
    cached.add_argument("--splits", default=None, metavar="S,S,...",
                        help="splits to write (default: every split of each task)")
    cached.set_defaults(run=_tasks_cache)
