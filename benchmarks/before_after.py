"""Before/after of a change to ift_jax: two `train_throughput.py` runs, one record.

    # The earlier package, with today's harness (so only ift_jax differs):
    git worktree add /tmp/before <commit> && rm -r /tmp/before/benchmarks
    cp -r benchmarks /tmp/before/benchmarks
    python /tmp/before/benchmarks/train_throughput.py --output_dir=/tmp/ba_before ...
    python benchmarks/train_throughput.py --output_dir=/tmp/ba_after ...   # same flags
    python benchmarks/before_after.py --before_dir=/tmp/ba_before \
        --after_dir=/tmp/ba_after --before_code=<commit> --name=NAME --change="..."

Writes `benchmarks/results/before_after_<NAME>.json` (both runs verbatim, and
per preset/method ours after/before and ours/HF in each run). Each run measures
HF in it too: the HF step time across the two runs shows how much the machine
itself drifted, and ours/HF is the drift-free figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import results_file

HERE = os.path.dirname(os.path.abspath(__file__))


def load_runs(directory: str) -> dict[str, dict]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "train_throughput_*.json"))):
        with open(path) as f:
            runs[os.path.basename(path)[:-len(".json")]] = json.load(f)
    if not runs:
        raise SystemExit(f"no train_throughput_*.json in {directory}")
    return runs


def _median_steps(entry: dict) -> tuple[float | None, float | None]:
    sides = entry["sides"]
    return (sides.get("ours", {}).get("median_step_s"),
            sides.get("hf_eager", {}).get("median_step_s"))


def compare(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per `<preset>_<method>` measured in both: step times and the two ratios."""
    table = {}
    for name, run in after.items():
        earlier = {(e["preset"], e["method"]): e for e in before.get(name, {}).get("entries", [])}
        for entry in run["entries"]:
            old = earlier.get((entry["preset"], entry["method"]))
            if old is None:
                continue
            (ours_before, hf_before), (ours_after, hf_after) = (_median_steps(old),
                                                                _median_steps(entry))
            if None in (ours_before, hf_before, ours_after, hf_after):
                continue
            table[f"{entry['preset']}_{entry['method']}"] = {
                "ours_step_s": {"before": ours_before, "after": ours_after},
                "hf_step_s": {"before": hf_before, "after": hf_after},
                "ours_over_hf_tokens_per_s": {"before": hf_before / ours_before,
                                              "after": hf_after / ours_after},
                "speedup_after_over_before": ours_before / ours_after,
            }
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before_dir", required=True)
    parser.add_argument("--after_dir", required=True)
    parser.add_argument("--before_code", required=True, help="what the before run used")
    parser.add_argument("--after_code", default="ift_jax of the commit that adds the record")
    parser.add_argument("--change", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    before, after = load_runs(args.before_dir), load_runs(args.after_dir)
    table = compare(before, after)
    if not table:
        raise SystemExit("no preset/method was measured (both sides) in both runs")
    record = {"benchmark": "before_after", "change": args.change,
              "before_code": args.before_code, "after_code": args.after_code,
              "comparison": table,
              "speedup_after_over_before": {
                  key: row["speedup_after_over_before"] for key, row in table.items()},
              "before": before, "after": after}
    results_file.write(record, args.output_dir, f"before_after_{args.name}", "before_after.py",
                       argv, quiet=True)
    for key, row in table.items():
        print(f"{key}: ours {row['ours_step_s']['before']:.3f} -> "
              f"{row['ours_step_s']['after']:.3f} s ({row['speedup_after_over_before']:.2f}x); "
              f"ours/HF {row['ours_over_hf_tokens_per_s']['before']:.2f} -> "
              f"{row['ours_over_hf_tokens_per_s']['after']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
