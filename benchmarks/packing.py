"""Useful (non-pad) tokens/s on DialogSum: our packed batches vs the peer's padded ones.

The same model (`--preset`, full fine-tuning, fp32 on CPU), the same batch
shape `[B, 512]` / `[B, 128]`, the same data: the DialogSum train split
rendered by our templates (`ift_jax.data.pipeline`, `get_dataset` with
`pack=True` for ours, `pack=False` for the peer: one example per row, padded
and truncated). The useful tokens per batch are counted over
`--stat_batches` batches of each stream; the step time of ours on packed
batches and of HF T5 (`attention_mask`, pad labels -100) on padded batches is
measured in the same run, each in its own process (`workers.py`). Ours on
padded batches is measured too, which splits the gain into packing and step
speed.

    IFT_JAX_DATA_DIR=../shared/data python benchmarks/packing.py --preset=small

Token lengths depend on the vocabulary. FLAN-T5's `spiece.model` cannot be
fetched here, so by default a 16k SentencePiece model is trained on the
DialogSum train texts in the run (a few seconds; ~1.5 tokens per
whitespace word, close to T5's vocabulary on this English text);
`--vocab=PATH` uses a given `.model`, `--vocab=byte` bytes.

Writes `benchmarks/results/packing_<task>_<preset>_<platform>.json`.

A machine without TensorFlow/seqio (the GPU image) times batches made
elsewhere: `--save_batches=DIR` builds the streams, their token counts and
the vocabulary's description into DIR and stops; `--batches=DIR` times them.

    python benchmarks/packing.py --batch_size=128 --save_batches=.bench_data/packing
    python benchmarks/packing.py --batches=.bench_data/packing      # on the GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import environment
import results_file
import train_throughput
import workers

STREAMS_FILE = "streams.json"


def train_vocabulary(task: str, out_dir: str, size: int) -> str:
    """A SentencePiece model (T5 special ids) trained on the task's rendered train
    inputs and targets (an instruction task: `ift_jax.data.instructions`)."""
    import seqio
    from ift_jax.data import vocabularies

    columns = seqio.get_mixture_or_task(task).source.rendered("train")
    texts = columns["inputs"] + columns["targets"]
    return vocabularies.train_sentencepiece(texts, os.path.join(out_dir, f"{task}_spm"), size)


def useful_tokens(batch: dict) -> tuple[int, int, int]:
    """(non-pad input tokens, non-pad target tokens, examples) in one batch."""
    segments = batch.get("decoder_segment_ids")
    targets = batch["decoder_target_tokens"]
    examples = (sum(len(np.unique(row[row > 0])) for row in segments) if segments is not None
                else int((targets > 0).any(axis=1).sum()))
    return int((batch["encoder_input_tokens"] > 0).sum()), int((targets > 0).sum()), examples


def stream(args, pack: bool) -> tuple[list[dict], dict]:
    """The first `warmup + steps` batches to time, and token counts over `stat_batches`."""
    from ift_jax.data import pipeline
    spec = pipeline.BatchSpec(args.task, "train", args.inputs_length, args.targets_length,
                              batch_size=args.batch_size, pack=pack, seed=0, num_epochs=None)
    iterator = pipeline.numpy_batches(spec)
    timed, totals = [], np.zeros(3, np.int64)
    for i in range(max(args.stat_batches, args.warmup + args.steps)):
        batch = next(iterator)
        if i < args.warmup + args.steps:
            timed.append(batch)
        if i < args.stat_batches:
            totals += useful_tokens(batch)
    n = args.stat_batches
    slots = n * args.batch_size * (args.inputs_length + args.targets_length)
    counts = {"batches_counted": n, "input_tokens_per_batch": totals[0] / n,
              "target_tokens_per_batch": totals[1] / n,
              "useful_tokens_per_batch": (totals[0] + totals[1]) / n,
              "examples_per_batch": totals[2] / n,
              "useful_share": float((totals[0] + totals[1]) / slots)}
    return timed, counts


def _check_vocabulary_fits(vocab: str, preset: str) -> None:
    from ift_jax.data import vocabularies
    from ift_jax.models import t5
    size, model_size = vocabularies.make_vocabulary(vocab).vocab_size, t5.get_config(
        preset).vocab_size
    if size > model_size:
        raise ValueError(f"vocabulary {vocab!r} has {size} ids but preset {preset!r} embeds "
                         f"{model_size}; use a larger preset or --vocab=byte")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="dialogsum")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default: train_throughput's batch for the preset and device")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=128)
    parser.add_argument("--stat_batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", default="train:16000",
                        help="train:SIZE (SentencePiece on the task's train split), a "
                             ".model path, or byte")
    parser.add_argument("--ours_padded", action=argparse.BooleanOptionalAction, default=True,
                        help="also time ours on the padded batches (splits the gain into "
                             "packing and step speed)")
    parser.add_argument("--save_batches", default="",
                        help="only build the packed and padded batches and their token "
                             "counts into this folder")
    parser.add_argument("--batches", default="",
                        help="time the batches of a --save_batches folder (no seqio needed)")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    args = parser.parse_args(argv)
    args.platform = train_throughput.platform()
    args.dtype = "float32" if args.platform == "cpu" else "bfloat16"
    if args.batches:  # The batches' own shape and vocabulary.
        with open(os.path.join(args.batches, STREAMS_FILE)) as f:
            saved = json.load(f)
        for key in ("task", "preset", "batch_size", "inputs_length", "targets_length",
                    "vocab"):
            setattr(args, key, saved[key])
        args.saved = saved
    args.batch_size = args.batch_size or train_throughput.DEFAULT_BATCH[args.platform][
        args.preset]
    return args


def measure(args, batch_paths: dict, workdir: str) -> dict:
    hf_dir = workers.write_random_checkpoint(args.preset, os.path.join(workdir, "hf"))
    spec = {"preset": args.preset, "method": "full", "dtype": args.dtype,
            "batch_size": args.batch_size, "inputs_length": args.inputs_length,
            "targets_length": args.targets_length, "lora_rank": 32, "prompt_length": 100,
            "learning_rate": 1e-4, "seed": 0, "warmup": args.warmup, "steps": args.steps,
            "platform": args.platform, "init_from": hf_dir}  # Both sides start from it.
    sides = {"ours_packed": workers.spawn("ours", {**spec, "batches": batch_paths["packed"]},
                                          workdir, "ours_packed")}
    if args.ours_padded:
        sides["ours_padded"] = workers.spawn("ours", {**spec, "batches": batch_paths["padded"]},
                                             workdir, "ours_padded")
    sides["hf_eager_padded"] = workers.spawn(
        "peer", {**spec, "batches": batch_paths["padded"], "hf_dir": hf_dir}, workdir,
        "hf_padded")
    return sides


def main(argv=None) -> int:
    # Temporary workdir: vocabulary, batches, HF export.
    return environment.main_in_workdir(run, parse_args(argv), argv, "ift_jax_packing_")


def build_streams(args, out_dir: str) -> tuple[dict, dict]:
    """The packed and padded batches to time (`.npz` in `out_dir`) and their token counts."""
    from ift_jax.data import vocabularies
    import ift_jax.tasks  # noqa: F401  (registers the tasks)

    vocab = args.vocab
    if vocab.startswith("train:"):
        vocabularies.set_vocabulary("byte")  # Reading raw texts needs no vocabulary.
        vocab = train_vocabulary(args.task, out_dir, int(vocab.split(":")[1]))
    vocabularies.set_vocabulary(vocab)
    _check_vocabulary_fits(vocab, args.preset)
    counts, batch_paths = {}, {}
    for name, pack in (("packed", True), ("padded", False)):
        timed, counts[name] = stream(args, pack)
        batch_paths[name] = os.path.join(out_dir, f"{name}.npz")
        workers.save_batches(batch_paths[name], timed)
    return counts, batch_paths


def run(args, machine: dict, workdir: str, argv) -> None:
    if args.batches:
        counts = args.saved["token_counts"]
        batch_paths = {name: os.path.join(args.batches, f"{name}.npz")
                       for name in ("packed", "padded")}
    else:
        out_dir = args.save_batches or workdir
        os.makedirs(out_dir, exist_ok=True)
        counts, batch_paths = build_streams(args, out_dir)
        if args.save_batches:
            with open(os.path.join(out_dir, STREAMS_FILE), "w") as f:
                json.dump({"task": args.task, "preset": args.preset,
                           "batch_size": args.batch_size,
                           "inputs_length": args.inputs_length,
                           "targets_length": args.targets_length, "vocab": args.vocab,
                           "token_counts": counts, "command": " ".join(sys.argv)}, f, indent=2)
            for name in os.listdir(out_dir):  # Only the batches travel.
                if name.endswith((".model", ".vocab")):
                    os.remove(os.path.join(out_dir, name))
            print(f"wrote {out_dir}")
            return
    sides = measure(args, batch_paths, workdir)
    feeds = {"ours_packed": "packed", "ours_padded": "padded", "hf_eager_padded": "padded"}
    for name, side in sides.items():
        if "error" not in side:
            side["useful_tokens_per_s"] = (counts[feeds[name]]["useful_tokens_per_batch"]
                                           / side["median_step_s"])
            side["peak_memory_bytes"] = side.get("device_peak_bytes") or side["peak_rss_bytes"]
    peer = sides["hf_eager_padded"]
    ratios = {f"{name}_over_peer_padded": side["useful_tokens_per_s"] / peer["useful_tokens_per_s"]
              for name, side in sides.items()
              if name != "hf_eager_padded" and "error" not in side and "error" not in peer}
    record = {
        "benchmark": "packing", "task": args.task, "split": "train", "preset": args.preset,
        "method": "full", "platform": args.platform, "precision": args.dtype,
        "vocabulary": args.vocab if not args.vocab.startswith("train:") else (
            f"SentencePiece unigram, {args.vocab.split(':')[1]} pieces, trained in this run "
            f"on the {args.task} train split (FLAN-T5's spiece.model is not available here)"),
        "batch_size": args.batch_size, "inputs_length": args.inputs_length,
        "targets_length": args.targets_length, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "token_counts": counts, "sides": sides,
        "useful_tokens": "non-pad input + target tokens (packed: every segment's tokens)",
        "ratios": ratios,
        "batches_made_by": args.saved["command"] if args.batches else "this run",
        "machine": {**machine, "load_at_end": environment.load()},
    }
    if "ours_padded" in sides:  # Same weights (seed) and first padded batch on both sides.
        record["loss_check_padded"] = train_throughput.loss_check(sides["ours_padded"], peer,
                                                                   args.dtype)
    results_file.write(record, args.output_dir,
                       f"packing_{args.task}_{args.preset}_{args.platform}", "packing.py", argv)


if __name__ == "__main__":
    sys.exit(main())
