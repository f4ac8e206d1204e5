"""Start-up of the training stream when a run resumes at a late step, for one host.

What a resumed run waits for before its first step, data side only (the
model's restore is the same either way), each in a fresh process after the
tasks are registered:

- `seqio_replay` (`data.pipeline=seqio`, before): the tf.data pipeline is
  built, `step` batches are computed and dropped, then the next batch comes;
- `indexed_restore` (`data.pipeline=indexed`, after): the tasks are read into
  memory, the position saved at `step` (`ift_jax.data.positions`) is read, then
  the next batch is built;
- `indexed_replay`: the indexed stream without a saved position (a checkpoint
  from before positions were saved) computes and drops `step` batches.

A first process (`save`) consumes `step` batches of the indexed stream, saves
its position and the batch that follows; the restored and replayed streams must
give that batch. Also recorded: each stream's batches/s while consuming, how
full the packed rows are (share of non-padding tokens), and the time and size
of saving a position (paid at every checkpoint). With `--cache_dir` (written by
`ift-jax tasks cache MIXTURE --output=DIR --splits=train`) every process reads
the tasks from the cache.

    IFT_JAX_DATA_DIR=../shared/data python benchmarks/resume_startup.py \\
        --mixture=ift_multitask --step=500 [--cache_dir=DIR]

Writes `benchmarks/results/resume_startup_<mixture>_<step>[_cached].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import environment
import results_file

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("save", "seqio_replay", "indexed_restore", "indexed_replay")


def _fill(batches: list[dict]) -> dict[str, float]:
    """Share of non-padding tokens in the encoder and decoder rows."""
    return {side: round(float(np.mean([(b[key] != 0).mean() for b in batches])), 4)
            for side, key in (("inputs", "encoder_input_tokens"),
                              ("targets", "decoder_target_tokens"))}


def _consume(batches, count: int) -> dict:
    """Takes `count` batches; their rate and how full they are."""
    start = time.perf_counter()
    kept = []
    for _ in range(count):
        batch = next(batches)
        kept.append({k: batch[k] for k in ("encoder_input_tokens", "decoder_target_tokens")})
    seconds = time.perf_counter() - start
    return {"batches_per_s": round(count / seconds, 2), "fill": _fill(kept)}


def phase(args) -> dict:
    """One phase in this (fresh) process; its record."""
    from ift_jax import model_setup
    from ift_jax.data import indexed, pipeline, positions
    from configs import default
    config = default.get_config()
    config.data.mixture, config.data.cache_dir = args.mixture, args.cache_dir
    model_setup.prepare_data(config)
    spec = pipeline.BatchSpec(args.mixture, "train", args.inputs_length, args.targets_length,
                              batch_size=args.batch_size, pack=True, seed=0, num_epochs=None)
    expected_file = os.path.join(args.workdir, "expected.npz")
    start = time.perf_counter()
    if args.phase == "seqio_replay":
        batches = pipeline.numpy_batches(spec)
        next(batches)  # The pipeline's work starts with its first element.
        record = {"build_s": round(time.perf_counter() - start, 2),
                  **_consume(batches, args.step - 1)}
        next(batches)
        return {**record, "start_s": round(time.perf_counter() - start, 2)}
    stream = indexed.IndexedStream(indexed.load_tasks(spec), spec)
    loaded = round(time.perf_counter() - start, 2)
    if args.phase == "save":
        record = {"load_s": loaded, **_consume(stream, args.step)}
        saving = time.perf_counter()
        positions.save(stream, args.workdir, args.step, 0, 1)
        record["save_position_s"] = round(time.perf_counter() - saving, 4)
        record["position_bytes"] = os.path.getsize(positions.path(args.workdir, args.step, 0, 1))
        np.savez(expected_file, **next(stream))
        return record
    where = args.workdir if args.phase == "indexed_restore" else args.workdir + "_none"
    restored = positions.resume(stream, where, args.step, 0, 1)
    batch = next(stream)
    record = {"load_s": loaded, "start_s": round(time.perf_counter() - start, 2),
              "restored": restored}
    expected = np.load(expected_file)
    record["batch_equal"] = all(np.array_equal(batch[k], expected[k]) for k in expected.files)
    return record


def run_phase(argv: list[str], name: str, workdir: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                           f"--phase={name}", f"--workdir={workdir}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="ift_multitask")
    parser.add_argument("--step", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=128)
    parser.add_argument("--cache_dir", default="", help="read tasks from `ift-jax tasks "
                        "cache` output (data.cache_dir)")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))  # `configs`
    if args.phase:
        print(json.dumps(phase(args)))
        return 0
    machine = environment.describe("cpu")
    workdir = tempfile.mkdtemp(prefix="resume_startup_")
    phases = {name: run_phase(argv, name, workdir) for name in PHASES}
    record = {"mixture": args.mixture, "step": args.step, "batch_size": args.batch_size,
              "inputs_length": args.inputs_length, "targets_length": args.targets_length,
              "cache_dir": args.cache_dir or None, "phases": phases,
              "restore_vs_seqio_replay": round(phases["seqio_replay"]["start_s"]
                                               / phases["indexed_restore"]["start_s"], 2),
              "first_batches_equal": (phases["indexed_restore"]["batch_equal"]
                                      and phases["indexed_replay"]["batch_equal"]
                                      and phases["indexed_restore"]["restored"]),
              "machine": machine, "load_at_end": environment.load()}
    name = f"resume_startup_{args.mixture}_{args.step}" + ("_cached" if args.cache_dir else "")
    results_file.write(record, args.output_dir, name, "resume_startup.py", argv)
    return 0 if record["first_batches_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
