"""The PEFT trade-off table, measured: every method of configs/sweeps/peft_methods.py.

    python benchmarks/peft_tradeoffs.py --preset=small

For each point of the sweep `configs/sweeps/peft_methods.py:tiny` (every
method of `peft.METHODS`, and DoRA), one process (so memory figures are its
own) that:

1. trains the point as `ift-jax sweep` would (`run_flags.parse_train` of its
   `--config.*` overrides, `train.train_and_evaluate`), with the preset's step
   count, and evaluates it at the end (the sweep's task and metric);
2. times the run's own compiled train step (`train_step.jit_train_step`, the
   run's data) after a warm-up: median step time, and the process's peak RSS
   over those steps (`environment.reset_peak_rss` after the warm-up, so
   compilation is out);
3. reads the last checkpoint back (`runs.Run`) and times greedy decoding of one
   batch with the run's model (unmerged), and with the adapter merged into a
   plain T5 (`runs.plain_params`) where the method merges.

Trainable params come from the run's `summary.json`, checkpoint bytes from the
files of its last checkpoint on disk. The table (`docs/peft_tradeoffs.md`,
`.csv`, `.png`) and the JSON under `benchmarks/results/` are written from the
measurements only. CPU figures on a shared machine; the GPU column is left to
a GPU run of this script (`--output_name` keeps the files apart).

Presets: `tiny` (4 steps: the smoke test), `small` (the sweep's tiny T5,
d_model 128, trained 30 steps per method).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import environment
import results_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SWEEP = os.path.join(ROOT, "configs", "sweeps", "peft_methods.py") + ":tiny"
PRESETS = {"tiny": {"steps": 4, "timed_steps": 2, "decode_repeats": 1},
           "small": {"steps": 30, "timed_steps": 3, "decode_repeats": 2}}
COLUMNS = ("method", "trainable_params", "trainable_share", "checkpoint_bytes",
           "peak_rss_gib", "step_ms", "eval_metric", "eval_value", "decode_unmerged_ms",
           "decode_merged_ms")


def _bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def _median_s(fn, repeats: int) -> float:
    fn()  # Warm-up: compilation.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _point_config(point: dict, workdir: str, preset: dict):
    from ift_jax import run_flags, sweeps
    steps = preset["steps"]
    extra = [f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps}",
             f"--config.eval.every={steps}", "--config.train.log_every=1"]
    return run_flags.parse_train([f"--config={SWEEP}", f"--workdir={workdir}",
                                  *sweeps.overrides(point), *extra]).config


def _time_steps(config, timed: int) -> tuple[float, int]:
    """Median seconds of the run's compiled train step, and the peak RSS over the timed
    steps (after a 2-step warm-up)."""
    import jax

    from ift_jax import model_setup, partitioning, runs, train_step
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    init = model_setup.initialize(setup, mesh)
    state, frozen = init.state, init.frozen
    sharding = partitioning.batch_sharding(mesh)
    step_fn = train_step.jit_train_step(setup, init.shardings, sharding)
    batches = train_step.global_batches(model_setup.train_batches(config), sharding)
    times = []
    with partitioning.mesh_context(mesh):
        for i in range(2 + timed):
            if i == 2:
                environment.reset_peak_rss()
            batch = next(batches)
            start = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch, jax.random.key(i))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), environment.peak_rss_bytes()


def _decode_times(workdir: str, repeats: int) -> tuple[float, object]:
    """(unmerged seconds, merged seconds or the reason the method cannot merge) of
    greedy decoding one batch of the run's validation-length inputs."""
    import jax
    import numpy as np

    from ift_jax import decoding, partitioning, peft, runs
    from ift_jax.models import t5
    run = runs.Run.open(workdir, mesh=partitioning.make_mesh([1, 1, 1], jax.devices()[:1]))
    try:
        params, _ = run.params()
        params = runs.host_params(params)
    finally:
        run.close()
    config = run.config
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (8, config.data.inputs_length))
    tokens[:, -1] = 1
    length = config.eval.max_decode_length

    def decode(model, p):
        return lambda: jax.block_until_ready(decoding.greedy(
            model, p, tokens, max_decode_length=length)[0])
    unmerged = _median_s(decode(run.setup.eval_model, params), repeats)
    try:
        plain = runs.plain_params(run.setup, params)
    except peft.PeftError as e:
        return unmerged, f"cannot merge: {e}"
    return unmerged, _median_s(decode(t5.Transformer(run.setup.t5_config),
                                      jax.tree.map(jax.numpy.asarray, plain)), repeats)


def measure(point: dict, workdir: str, preset: dict) -> dict:
    """Steps 1-3 of the module doc for one sweep point."""
    from ift_jax import report, sweeps, train
    config = _point_config(point, workdir, preset)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    step_s, peak = _time_steps(config, preset["timed_steps"])
    unmerged, merged = _decode_times(workdir, preset["decode_repeats"])
    checkpoints = os.path.join(workdir, "checkpoints")
    last = max((d for d in os.listdir(checkpoints) if d.isdigit()), key=int)
    evals = report.load_eval(workdir)["steps"]
    task, scores = next(iter(evals[max(evals)].items()))
    metric = report.primary_metric(scores)
    params = summary["params"]
    return {"method": sweeps.point_name(point), "overrides": sweeps.overrides(point),
            "trainable_params": params["trainable"], "total_params": params["total"],
            "checkpoint_bytes": _bytes_on_disk(os.path.join(checkpoints, last)),
            "checkpoint_step": int(last), "peak_rss_bytes": peak, "step_s": step_s,
            "eval_task": task, "eval_metric": metric, "eval_value": scores[metric],
            "train_loss": summary.get("train", {}).get("loss"),
            "decode_unmerged_s": unmerged,
            "decode_merged_s": merged if isinstance(merged, float) else None,
            "merge_note": merged if isinstance(merged, str) else ""}


def _row(m: dict) -> dict:
    if "error" in m:
        return {"method": m["method"], **{c: "failed (error in the JSON)" for c in COLUMNS[1:2]},
                **{c: "" for c in COLUMNS[2:]}}
    return {"method": m["method"], "trainable_params": m["trainable_params"],
            "trainable_share": f"{100 * m['trainable_params'] / m['total_params']:.2f}%",
            "checkpoint_bytes": m["checkpoint_bytes"],
            "peak_rss_gib": f"{m['peak_rss_bytes'] / 2 ** 30:.2f}",
            "step_ms": f"{1000 * m['step_s']:.0f}", "eval_metric": m["eval_metric"],
            "eval_value": f"{m['eval_value']:.2f}",
            "decode_unmerged_ms": f"{1000 * m['decode_unmerged_s']:.0f}",
            "decode_merged_ms": (f"{1000 * m['decode_merged_s']:.0f}"
                                 if m["decode_merged_s"] is not None else "cannot merge")}


def write_table(record: dict, out_base: str) -> list[str]:
    """`out_base`.md/.csv/.png from a measured record."""
    rows = [_row(m) for m in record["methods"]]
    measured = [m for m in record["methods"] if "error" not in m]
    with open(out_base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    first = measured[0]
    machine = record["machine"]
    lines = [
        "# PEFT trade-offs, measured", "",
        f"Generated by `{record['command']}` on {record['date'][:10]}; do not edit by hand.",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPU(s) "
        f"(shared; load average {record['load_before'][0]:.1f} before, "
        f"{record['load_after'][0]:.1f} after), JAX {machine.get('jax', '?')}.", "",
        f"Every method of `configs/sweeps/peft_methods.py` (its `tiny` preset: the embedded "
        f"default's T5 with d_model 128, from scratch, byte vocabulary, "
        f"{record['preset']['steps']} steps on `{first['eval_task']}`), one process per "
        f"method. Columns: trainable params (and their share of the model); bytes on disk "
        f"of the last checkpoint (only the trainable subtree and its optimizer state are "
        f"saved); peak RSS of the process over {record['preset']['timed_steps']} timed "
        f"train steps after a warm-up (host memory on CPU: the JAX runtime and the frozen "
        f"weights included); median step time of the run's compiled train step; the "
        f"evaluation's `{first['eval_metric']}` after training (a few steps of a tiny "
        f"model: the numbers show the machinery, not the methods' quality); greedy decode "
        f"latency of one batch of 8 x {record['inputs_length']} input tokens, "
        f"{record['decode_tokens']} new tokens at most, with the run's model (unmerged) "
        f"and with the adapter merged into a plain T5 (LoRA family, IA3, full; the others "
        f"cannot merge).", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "GPU: not measured here; run `python benchmarks/peft_tradeoffs.py "
              "--preset=small --output_name=peft_tradeoffs_gpu` on a GPU host to add its "
              "table (figures are never typed in by hand).", "",
              f"![trade-offs]({os.path.basename(out_base)}.png)", ""]
    with open(out_base + ".md", "w") as f:
        f.write("\n".join(lines))
    _plot(measured, out_base + ".png")
    return [out_base + ext for ext in (".md", ".csv", ".png")]


def _plot(methods: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = [m["method"] for m in methods]
    panels = [("trainable params", [m["trainable_params"] for m in methods], True),
              ("checkpoint bytes", [m["checkpoint_bytes"] for m in methods], True),
              ("step time (ms)", [1000 * m["step_s"] for m in methods], False),
              (f"eval {methods[0]['eval_metric']}", [m["eval_value"] for m in methods], False)]
    fig = Figure(figsize=(13, 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, (title, values, log) in zip(axes, panels):
        ax.bar(names, values, color="tab:blue")
        ax.set(title=title, yscale="log" if log else "linear")
        ax.tick_params(axis="x", rotation=60)
    ax = axes[4]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [1000 * m["decode_unmerged_s"] for m in methods], 0.4,
           label="unmerged")
    ax.bar([i + 0.2 for i in x], [1000 * (m["decode_merged_s"] or 0) for m in methods], 0.4,
           label="merged (0: cannot merge)")
    ax.set(title="decode latency (ms)", xticks=list(x))
    ax.set_xticklabels(names, rotation=60)
    ax.legend(fontsize=8)
    ax = axes[5]
    ax.bar(names, [m["peak_rss_bytes"] / 2 ** 30 for m in methods], color="tab:gray")
    ax.set(title="peak RSS over train steps (GiB)")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _run_points(args, root: str) -> list[dict]:
    from ift_jax import sweeps
    points = sweeps.load_points(SWEEP)
    if args.methods:
        keep = args.methods.split(",")
        points = [p for p in points if sweeps.point_name(p) in keep]
    measured = []
    for point in points:
        name = sweeps.point_name(point)
        out = os.path.join(root, f"{name}.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--preset={args.preset}",
               f"--_measure={name}", f"--_root={root}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:  # Recorded, and the table says so; the others go on.
            measured.append({"method": name, "error": proc.stderr[-3000:]})
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        with open(out) as f:
            measured.append({**json.load(f), "process_wall_s": time.perf_counter() - start})
        print(f"{name}: {json.dumps(_row(measured[-1]))}", flush=True)
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--methods", default="", help="comma-separated subset (default all)")
    parser.add_argument("--output_name", default="peft_tradeoffs",
                        help="docs/<name>.{md,csv,png} and benchmarks/results/<name>_<preset>"
                             ".json")
    parser.add_argument("--docs_dir", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--_measure", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args._measure:  # One point, in its own process.
        from ift_jax import sweeps
        point = next(p for p in sweeps.load_points(SWEEP)
                     if sweeps.point_name(p) == args._measure)
        result = measure(point, os.path.join(args._root, args._measure), preset)
        with open(os.path.join(args._root, f"{args._measure}.json"), "w") as f:
            json.dump(result, f)
        return 0

    import jax
    machine = environment.describe(jax.default_backend())
    root = tempfile.mkdtemp(prefix="peft_tradeoffs_")
    load_before = os.getloadavg()
    methods = _run_points(args, root)
    from ift_jax import run_flags
    config = run_flags.parse_train([f"--config={SWEEP}", "--workdir=/tmp/unused"]).config
    record = {"benchmark": "peft_tradeoffs", "preset": {"name": args.preset, **preset},
              "sweep": os.path.relpath(SWEEP, ROOT), "methods": methods,
              "inputs_length": config.data.inputs_length,
              "decode_tokens": config.eval.max_decode_length,
              "load_before": load_before, "load_after": os.getloadavg(),
              "machine": {**machine, "jax_device": jax.devices()[0].device_kind}}
    path = results_file.write(record, args.output_dir, f"{args.output_name}_{args.preset}",
                              "peft_tradeoffs.py", argv, quiet=True)
    with open(path) as f:
        record = json.load(f)
    written = write_table(record, os.path.join(args.docs_dir, args.output_name))
    print("wrote", path, *written)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
