"""The benchmark suite in one command: training throughput, packing, decoding, evaluation
throughput, start-up time, the table.

    python benchmarks/run_all.py               # T5 1.1 small, base, large; ~30 min on 2 CPU cores
    python benchmarks/run_all.py --presets=small --steps=3 --dry_run

Runs `train_throughput.py`, `packing.py`, `decoding.py`, `eval_throughput.py` and
`startup.py` one after the other (each measures ours and its peer in the same
run), writes their JSON to `--output_dir`, a `suite_<platform>.json` with what
ran, how, and how long each part took, then regenerates `benchmarks/README.md`
with `make_table.py`.

On a CPU the training batch is the one that makes a step take ~1-15 s (batch
2 for small, 1 for base and large); on a GPU one that fills the device. Pass
`--wait_for_idle_s=1200` to first wait for running test processes, so they do
not slow the measurement.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import environment
import results_file
import train_throughput

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_until_idle(pattern: str, limit_s: float, poll_s: float = 30.0) -> list[str]:
    """Polls for competing processes (e.g. a test run) up to `limit_s`; those still there."""
    deadline = time.time() + limit_s
    busy = environment.competing_processes(pattern)
    while busy and time.time() < deadline:
        print(f"waiting for {len(busy)} '{pattern}' process(es) to finish ...", file=sys.stderr,
              flush=True)
        time.sleep(poll_s)
        busy = environment.competing_processes(pattern)
    return busy


def commands(args) -> dict[str, list[str]]:
    """The suite's scripts with their arguments, by benchmark."""
    py = sys.executable
    default_dir = os.path.join(HERE, "results")
    common = ([] if os.path.abspath(args.output_dir) == default_dir
              else [f"--output_dir={args.output_dir}"])
    steps = [f"--warmup={args.warmup}", f"--steps={args.steps}"]
    # Later parts keep their reserve: the training part gets the deadline minus theirs.
    deadline = ([f"--deadline_s={args.deadline_s - args.reserve_s}"] if args.deadline_s
                else [])
    packing = ([f"--batches={args.packing_batches}"] if args.packing_batches
               else [f"--preset={args.packing_preset}"])
    return {
        "train_throughput": [py, os.path.join(HERE, "train_throughput.py"),
                             f"--presets={args.presets}", f"--lanes={args.lanes}",
                             *steps, *deadline, *common],
        "packing": [py, os.path.join(HERE, "packing.py"), *packing, *steps, *common],
        "decoding": [py, os.path.join(HERE, "decoding.py"), f"--preset={args.decoding_preset}",
                     f"--repeats={args.decoding_repeats}", *common],
        "eval_throughput": [py, os.path.join(HERE, "eval_throughput.py"),
                            f"--preset={args.eval_preset}", *common],
        "startup": [py, os.path.join(HERE, "startup.py"), f"--preset={args.decoding_preset}",
                    *common],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=None,
                        help="training presets; default: small,base,large")
    parser.add_argument("--packing_preset", default="small")
    parser.add_argument("--decoding_preset", default="small")
    parser.add_argument("--decoding_repeats", type=int, default=3)
    parser.add_argument("--eval_preset", default="small",
                        help="eval_throughput.py preset: tiny, small, base")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only",
                        default="train_throughput,packing,decoding,eval_throughput,startup")
    parser.add_argument("--lanes", type=int, default=1,
                        help="training workers at a time (see train_throughput.py)")
    parser.add_argument("--deadline_s", type=float, default=0.0,
                        help="a time limit for the suite (0: none): the training part stops "
                             "starting workers at deadline_s - reserve_s")
    parser.add_argument("--reserve_s", type=float, default=150.0,
                        help="seconds kept for packing, decoding and evaluation under "
                             "--deadline_s")
    parser.add_argument("--packing_batches", default="",
                        help="a `packing.py --save_batches` folder (hosts without seqio)")
    parser.add_argument("--wait_for_idle_s", type=float, default=0.0,
                        help="first wait up to this long for running pytest processes")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--readme", default=os.path.join(HERE, "README.md"),
                        help="the table to regenerate ('' for none)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    platform = train_throughput.platform()
    args.presets = args.presets or train_throughput.DEFAULT_PRESETS[platform]
    env = dict(os.environ)
    env.setdefault("IFT_JAX_DATA_DIR", os.path.join(os.path.dirname(HERE), "..", "shared",
                                                    "data"))
    todo = {k: v for k, v in commands(args).items() if k in args.only.split(",")}
    if args.dry_run:
        for cmd in todo.values():
            print(" ".join(cmd))
        return 0

    still_busy = wait_until_idle("pytest", args.wait_for_idle_s) if args.wait_for_idle_s else []
    parts = {}
    for name, cmd in todo.items():
        start = time.perf_counter()
        code = subprocess.run(cmd, env=env).returncode
        script = os.path.relpath(cmd[1], os.path.dirname(HERE))
        parts[name] = {"command": " ".join(["python", script, *cmd[2:]]), "exit_code": code,
                       "wall_s": round(time.perf_counter() - start, 1)}
    record = {"benchmark": "suite", "platform": platform, "parts": parts,
              "training_presets": args.presets,
              "busy_when_started": still_busy, "machine": environment.describe(platform)}
    results_file.write(record, args.output_dir, f"suite_{platform}", "run_all.py", argv)
    if args.readme:
        from make_table import main as make_table
        make_table([f"--results_dir={args.output_dir}", f"--output={args.readme}"])
    return 0 if all(p["exit_code"] == 0 for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
