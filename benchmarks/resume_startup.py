"""Start-up of the training stream when a run resumes at a late step, for one host.

What a resumed run waits for before its first step, data side only (the
model's restore is the same either way):

- `seqio_replay` (`data.pipeline=seqio`, before): the tf.data pipeline is
  built, `dataset.skip(step)` computes and drops `step` batches, then the first
  batch comes;
- `indexed_restore` (`data.pipeline=indexed`, after): the tasks are read into
  memory, the position saved at `step` (`ift_jax.data.positions`) is read, then
  the first batch is built;
- `indexed_replay`: the indexed stream without a saved position (a checkpoint
  from before positions were saved) computes and drops `step` batches.

The indexed stream's first batch after a restore and after a replay are checked
equal to the one the uninterrupted stream gives. Also recorded: each stream's
batches/s while consuming, how full the packed rows are (non-padding tokens),
and the time and size of saving a position (paid at every checkpoint).

    IFT_JAX_DATA_DIR=../shared/data python benchmarks/resume_startup.py \\
        --mixture=ift_multitask --step=500

Writes `benchmarks/results/resume_startup_<mixture>_<step>.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import environment
import results_file

HERE = os.path.dirname(os.path.abspath(__file__))


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _fill(batches: list[dict]) -> dict[str, float]:
    """Share of non-padding tokens in the encoder and decoder rows."""
    return {side: float(np.mean([(b[key] != 0).mean() for b in batches]))
            for side, key in (("inputs", "encoder_input_tokens"),
                              ("targets", "decoder_target_tokens"))}


def _consume(batches, count: int) -> tuple[list[dict], float]:
    """`count` batches (kept without their arrays beyond the token rows) and the time."""
    start = time.perf_counter()
    kept = []
    for _ in range(count):
        batch = next(batches)
        kept.append({k: batch[k] for k in ("encoder_input_tokens", "decoder_target_tokens")})
    return kept, time.perf_counter() - start


def run(args) -> dict:
    from ift_jax import model_setup
    from ift_jax.data import indexed, pipeline, positions
    from configs import default
    config = default.get_config()
    config.data.mixture, config.data.cache_dir = args.mixture, args.cache_dir
    model_setup.prepare_data(config)
    spec = pipeline.BatchSpec(args.mixture, "train", args.inputs_length, args.targets_length,
                              batch_size=args.batch_size, pack=True, seed=0, num_epochs=None)
    workdir = tempfile.mkdtemp(prefix="resume_startup_")
    result = {"mixture": args.mixture, "step": args.step, "batch_size": args.batch_size,
              "inputs_length": args.inputs_length, "targets_length": args.targets_length,
              "cache_dir": args.cache_dir or None}

    # Before: SeqIO's pipeline, built, `step` batches computed and dropped, first batch.
    start = time.perf_counter()
    seqio_batches = pipeline.numpy_batches(spec)
    next(seqio_batches)  # The pipeline's work starts with its first element.
    result["seqio_build_s"] = time.perf_counter() - start
    consumed, seconds = _consume(seqio_batches, args.step)
    result["seqio_replay_s"] = time.perf_counter() - start
    result["seqio_batches_per_s"] = args.step / seconds
    result["seqio_fill"] = _fill(consumed)

    # The indexed stream of the run that saves: `step` batches, then its position.
    tasks, result["indexed_load_s"] = _timed(lambda: indexed.load_tasks(spec))
    stream = indexed.IndexedStream(tasks, spec)
    consumed, seconds = _consume(stream, args.step)
    result["indexed_batches_per_s"] = args.step / seconds
    result["indexed_fill"] = _fill(consumed)
    _, result["save_position_s"] = _timed(lambda: positions.save(stream, workdir, args.step,
                                                                 0, 1))
    result["position_bytes"] = os.path.getsize(positions.path(workdir, args.step, 0, 1))
    expected = next(stream)

    def resumed(workdir_for_position: str) -> dict:
        fresh = indexed.IndexedStream(indexed.load_tasks(spec), spec)
        positions.resume(fresh, workdir_for_position, args.step, 0, 1)
        return next(fresh)

    restored, result["indexed_restore_s"] = _timed(lambda: resumed(workdir))
    replayed, result["indexed_replay_s"] = _timed(lambda: resumed(workdir + "_none"))
    for name, batch in (("restore", restored), ("replay", replayed)):
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key], value, err_msg=f"{name} {key}")
    result["first_batches_equal"] = True
    result["speedup_restore_vs_seqio_replay"] = (result["seqio_replay_s"]
                                                 / result["indexed_restore_s"])
    result["machine"] = environment.describe("cpu")
    result["load_at_end"] = environment.load()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="ift_multitask")
    parser.add_argument("--step", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=128)
    parser.add_argument("--cache_dir", default="", help="read tasks from `ift-jax tasks "
                        "cache` output (data.cache_dir)")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))  # `configs`
    record = run(args)
    results_file.write(record, args.output_dir, f"resume_startup_{args.mixture}_{args.step}",
                       "resume_startup.py", argv)


if __name__ == "__main__":
    main()
