"""Cached vs uncached tasks: start-up (first batch) and examples/s of the training stream.

Registers each task of a base mixture `--repeat` times (`<task>_rep<k>`, each
with its own copy of the source, so every copy is read and rendered like a
separate dataset: a collection `--repeat` times the size, mixed as
`ift_multitask` is), writes the split it trains on with `ift_jax.data.cache.write`
(timed), then measures the training stream in three fresh processes, one after
the other: SeqIO's (`ift_jax.data.pipeline`) rendering live, SeqIO's reading the
cache (`data.cache_dir`), and the indexed stream (`data.pipeline=indexed`,
`ift_jax.data.indexed`) reading the cache. Both SeqIO sides pull the same packed
batches (checked: the first batches' hash must agree); the indexed stream packs
its own. A `--cache_dir` that already holds a finished write (its `write.json`)
is reused, not written again.

    IFT_JAX_DATA_DIR=../shared/data nice -n 10 python benchmarks/task_cache.py \\
        --preset=multitask --repeat=10
    python benchmarks/task_cache.py --preset=tiny     # seconds; synthetic data

Writes `benchmarks/results/task_cache_<preset>_x<repeat>.json`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import environment
import results_file

PRESETS = {
    # tiny: the validation split (200 examples a task), mixed at equal rates: seconds.
    "tiny": dict(base="synthetic", repeat=2, split="validation", batches=5, batch_size=4,
                 inputs_length=64, targets_length=16),
    "multitask": dict(base="multitask", repeat=10, split="train", batches=200, batch_size=32,
                      inputs_length=512, targets_length=128),
}
HASHED_BATCHES = 3
SIDES = ("uncached", "cached", "indexed")
WRITTEN = "write.json"  # In a cache dir: the timed write that made it.


def base_tasks(base: str) -> tuple[str, ...]:
    from ift_jax.tasks import mixtures
    if base == "synthetic":
        return ("synthetic_sentiment",)
    return mixtures.MULTITASK_TASKS


def register(base: str, repeat: int, split: str = "train") -> str:
    """Registers the repeated tasks and their mixture (ift_multitask's rates when
    training on `split`, else equal rates); its name."""
    import seqio
    from ift_jax.data import instructions
    from ift_jax.tasks import mixtures
    names = []
    for name in base_tasks(base):
        task = seqio.get_mixture_or_task(name)
        source = task.source
        for k in range(repeat):
            records = copy.copy(source.records)
            records._cache, records._lock = {}, threading.Lock()  # Its own reading.
            names.append(f"{name}_rep{k}")
            instructions.register_task(names[-1], records, source.templates,
                                       rendering=source.rendering,
                                       postprocess_fn=task.postprocess_fn,
                                       metric_fns=task.metric_fns)
    mixture = f"bench_{base}_x{repeat}"
    rate = mixtures.examples_proportional(mixtures.EXAMPLES_CAP) if split == "train" else 1.0
    mixtures.register_mixture(mixture, names, rate)
    return mixture


def stream_digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            digest.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:16]


def worker(args) -> dict:
    """One side, in this (fresh) process: start-up to the first batch, then steady batches."""
    import data_pipeline
    from ift_jax.data import cache, indexed, pipeline, vocabularies
    vocabularies.set_vocabulary(args.vocab)
    import ift_jax.tasks  # noqa: F401
    mixture = register(args.base, args.repeat, args.split)
    cache.set_cache_dir(args.cache_dir if args.side in ("cached", "indexed") else None)
    spec = pipeline.BatchSpec(mixture, args.split, args.inputs_length, args.targets_length,
                              batch_size=args.batch_size, seed=0)
    start = time.perf_counter()
    if args.side == "indexed":
        batches = indexed.IndexedStream(indexed.load_tasks(spec), spec)
    else:
        batches = pipeline.numpy_batches(spec)
    first = [next(batches)]
    startup_s = time.perf_counter() - start
    first += list(itertools.islice(batches, HASHED_BATCHES - 1))
    totals = np.zeros(3, dtype=np.int64)
    start = time.perf_counter()
    for batch in itertools.islice(batches, args.batches):
        totals += data_pipeline.count(batch)
    steady_s = time.perf_counter() - start
    return {"startup_s": round(startup_s, 2), "steady_s": round(steady_s, 2),
            "examples_per_s": round(int(totals[0]) / steady_s, 1),
            "tokens_per_s": round(int(totals[1] + totals[2]) / steady_s, 1),
            "first_batches_sha256": stream_digest(first), "load_at_end": environment.load()}


def write_cache(args) -> dict:
    from ift_jax.data import cache, vocabularies
    vocabularies.set_vocabulary(args.vocab)
    import ift_jax.tasks  # noqa: F401
    mixture = register(args.base, args.repeat, args.split)
    start = time.perf_counter()
    rows = cache.write(mixture, args.cache_dir, [args.split], log=lambda _: None)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(args.cache_dir) for f in files)
    return {"mixture": mixture, "tasks": len(rows), "examples": sum(r[2] for r in rows),
            "write_s": round(seconds, 1), "bytes": size}


def run_side(argv: list[str], side: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--side={side}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{side} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="multitask")
    parser.add_argument("--repeat", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batches", type=int, default=None, help="default: the preset's")
    parser.add_argument("--vocab", default="byte")
    parser.add_argument("--cache_dir", default="",
                        help="where the cache goes (default: a temporary folder, removed)")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    parser.add_argument("--side", choices=("write",) + SIDES, default=None,
                        help=argparse.SUPPRESS)  # A worker process's part.
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        part = write_cache(args) if args.side == "write" else worker(args)
        print(json.dumps(part))
        return 0
    machine = environment.describe()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ift_jax_task_cache_")
    inner = [*(a for a in argv if not a.startswith("--cache_dir")), f"--cache_dir={cache_dir}"]
    try:
        done = os.path.join(cache_dir, WRITTEN)
        if os.path.exists(done):
            with open(done) as f:
                written = json.load(f)
        else:
            written = run_side(inner, "write")
            with open(done, "w") as f:
                json.dump(written, f)
        sides = {side: run_side(inner, side) for side in SIDES}
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    record = {
        "benchmark": "task_cache", "preset": args.preset, "base_tasks": args.base,
        "repeat": args.repeat, "split": args.split, "vocabulary": args.vocab, "packed": True,
        "inputs_length": args.inputs_length, "targets_length": args.targets_length,
        "batch_size": args.batch_size, "batches": args.batches, "cache": written,
        "sides": sides,
        "startup_speedup": round(sides["uncached"]["startup_s"]
                                 / max(sides["cached"]["startup_s"], 1e-9), 1),
        "indexed_startup_speedup": round(sides["uncached"]["startup_s"]
                                         / max(sides["indexed"]["startup_s"], 1e-9), 1),
        "same_batches": (sides["uncached"]["first_batches_sha256"]
                         == sides["cached"]["first_batches_sha256"]),
        "machine": machine,
    }
    results_file.write(record, args.output_dir, f"task_cache_{args.preset}_x{args.repeat}",
                       "task_cache.py", argv)
    return 0 if record["same_batches"] else 1


if __name__ == "__main__":
    sys.exit(main())
