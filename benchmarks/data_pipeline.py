"""Throughput of the SeqIO input pipeline: examples/s and tokens/s, packed.

Measures what the trainer would pull from `ift_jax.data.pipeline` for one host:
rendered, tokenized, packed `[batch, 512]` / `[batch, 128]` numpy batches of
a mixture. Start-up (reading files, rendering templates) is timed apart
from the steady state.

    IFT_JAX_DATA_DIR=../shared/data python benchmarks/data_pipeline.py \\
        --mixture=ift_multitask --batches=200

Writes `benchmarks/results/data_pipeline_<mixture>_<vocab>.json`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

import results_file


def machine() -> dict:
    import tensorflow as tf
    import seqio
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "tensorflow": tf.__version__, "seqio": seqio.__version__}


def count(batch: dict) -> tuple[int, int, int]:
    """(examples, non-pad input tokens, non-pad target tokens) in a packed batch."""
    segments = batch["decoder_segment_ids"]
    examples = sum(len(np.unique(row[row > 0])) for row in segments)
    return (examples, int((batch["encoder_input_tokens"] > 0).sum()),
            int((batch["decoder_target_tokens"] > 0).sum()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default="ift_multitask")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=128)
    parser.add_argument("--vocab", default="byte")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    args = parser.parse_args(argv)

    from ift_jax.data import pipeline, vocabularies
    vocabularies.set_vocabulary(args.vocab)
    import ift_jax.tasks  # noqa: F401

    spec = pipeline.BatchSpec(args.mixture, "train", args.inputs_length, args.targets_length,
                              batch_size=args.batch_size, seed=0)
    start = time.perf_counter()
    batches = pipeline.numpy_batches(spec)
    next(batches)
    startup_s = time.perf_counter() - start

    totals = np.zeros(3, dtype=np.int64)
    start = time.perf_counter()
    for _ in range(args.batches):
        totals += count(next(batches))
    steady_s = time.perf_counter() - start

    examples, input_tokens, target_tokens = (int(x) for x in totals)
    slots = args.batches * args.batch_size * (args.inputs_length + args.targets_length)
    result = {
        "benchmark": "data_pipeline", "mixture": args.mixture, "vocabulary": args.vocab,
        "packed": True, "inputs_length": args.inputs_length,
        "targets_length": args.targets_length, "batch_size": args.batch_size,
        "batches": args.batches, "startup_s": round(startup_s, 2),
        "steady_s": round(steady_s, 2),
        "examples_per_s": round(examples / steady_s, 1),
        "tokens_per_s": round((input_tokens + target_tokens) / steady_s, 1),
        "examples_per_packed_row": round(examples / (args.batches * args.batch_size), 2),
        "non_pad_share": round((input_tokens + target_tokens) / slots, 3),
        "machine": machine(),
    }
    vocab = os.path.splitext(os.path.basename(args.vocab))[0]
    results_file.write(result, args.output_dir, f"data_pipeline_{args.mixture}_{vocab}",
                       "data_pipeline.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
