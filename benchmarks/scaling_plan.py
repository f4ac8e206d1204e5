"""The scaling table of docs/scaling.md: `ift-jax plan` over FLAN-T5 sizes, methods and
topologies, with the memory levers off and on.

    python benchmarks/scaling_plan.py [--sizes=base,large,xl,xxl]
        [--methods=full,lora,qlora,prompt] [--topologies=v4-8,v4-32,v5e-16,h100]
        [--levers=on,scan,off] [--budget_s=1200] [--output_dir=benchmarks/results]
        [--doc=docs/scaling.md]

Every cell is compiled (abstract weights, fake CPU devices; one subprocess per
topology and levers setting, `ift_jax.plan`), never typed. Cells are planned in
order, levers `on` first (each compiles one scanned layer: fast), until `--budget_s`
of wall time is spent; the rest are listed as not planned, with why.
Levers: `off` = no remat, unrolled layers, frozen weights in float32; `on` =
`model.remat=full`, `model.scan_layers=True`, `peft.frozen_dtype=bfloat16`; `scan` =
`off` but with scanned layers: the memory levers (remat, bf16 frozen weights) off at
the compile time of one layer (an unrolled step takes minutes on a 2-core machine:
FLAN-T5-large LoRA 252 s; a scanned one 6-32 s at any size).
Settings of every cell: configs/flan_t5.py (task multitask: batch 32, 512 input
and 128 target tokens, bf16 compute), mesh data=1, fsdp=all devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import results_file  # benchmarks/ is the script's folder, on sys.path.
from ift_jax import plan
from ift_jax.configs import flan_t5

GiB = 1024 ** 3
# In the table's order.
LEVERS = {"on": dict(remat="full", scan_layers=True, frozen_dtype="bfloat16"),
          "scan": dict(remat="none", scan_layers=True, frozen_dtype="float32"),
          "off": dict(remat="none", scan_layers=False, frozen_dtype="float32")}


def _config(size: str, method: str, levers: str) -> dict:
    c = flan_t5.get_config(f"size={size},method={method},task=multitask")
    lever = LEVERS[levers]
    c.model.remat, c.model.scan_layers = lever["remat"], lever["scan_layers"]
    c.peft.frozen_dtype = lever["frozen_dtype"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c.to_dict()


def _plan_topology(name: str, cells: list, deadline: float) -> list:
    """Plans `cells` [(size, method, levers)] on topology `name` until `deadline`."""
    top = plan.TOPOLOGIES[name]
    env = plan.subprocess_env(top.devices)
    request = json.dumps({"configs": [_config(*cell) for cell in cells], "mesh": None})
    proc = subprocess.Popen([sys.executable, "-m", "ift_jax.plan"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    proc.stdin.write(request)
    proc.stdin.close()
    rows = []
    for cell in cells:
        line = proc.stdout.readline() if time.monotonic() < deadline else ""
        if not line:
            break
        result = json.loads(line)
        size, method, levers = cell
        # Plan's own `levers` (hints when it does not fit) keep their name in `hints`.
        result["hints"] = result.pop("levers", [])
        row = {**result, "size": size, "method": method, "levers": levers, "topology": name,
               "memory_bytes": top.memory_bytes}
        if "error" not in result:
            row["fits"] = result["peak_bytes"] <= top.memory_bytes
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("size", "method", "levers", "topology",
                                                    "peak_bytes", "compile_s", "error")}),
              flush=True)
    proc.kill()
    proc.wait()
    return rows


def _gib(b) -> str:
    return f"{b / GiB:.1f}"


def _tflop(flops) -> str:
    return f"{flops / 1e12:.2f}" if flops else "–"


def table(rows: list, show_run: bool = False) -> str:
    """Markdown rows. TFLOP/step/device is the method's training FLOPs (what MFU counts);
    XLA's count includes remat's recompute but counts a scanned stack's body once."""
    lines = ["| model | method | levers | topology | params | opt. state | activations+temp "
             "| peak (GiB/device) | fits | TFLOP/step/device | XLA's TFLOP count "
             "| compile (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['method']} | {r['levers']} | {r['topology']} "
                         f"| error: {r['error']} ||||||||")
            continue
        fits = "yes" if r["fits"] else f"no (+{_gib(r['peak_bytes'] - r['memory_bytes'])})"
        lines.append(
            f"| {r['size']} | {r['method']} | {r['levers']} | {r['topology']} "
            f"| {_gib(r['params_bytes'])} | {_gib(r['optimizer_bytes'])} "
            f"| {_gib(r['activations_bytes'])} | {_gib(r['peak_bytes'])} | {fits} "
            f"| {_tflop(r.get('model_flops'))} | {_tflop(r['flops'])}"
            f"{' (one layer: scanned)' if r.get('scanned') else ''} | {r['compile_s']:.0f}"
            f"{' (' + str(r.get('run', 0) + 1) + ')' if show_run else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="base,large,xl,xxl")
    parser.add_argument("--methods", default="full,lora,qlora,prompt")
    parser.add_argument("--topologies", default="v4-8,v4-32,v5e-16,h100")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--budget_s", type=float, default=1200.0)
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--doc", default="docs/scaling.md")
    parser.add_argument("--add", action="store_true",
                        help="add this run's cells to the results JSON's: its rows for cells "
                             "not planned now stay, credited to the run that planned them")
    args = parser.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    start = time.monotonic()
    deadline = start + args.budget_s
    rows, missing = [], []
    # Levers outermost: the fast `on` and `scan` cells (one scanned layer to compile) of
    # every topology come before the slow `off` ones, so a budget cuts the slowest cells.
    for levers in split(args.levers):
        cells = [(s, m, levers) for s in split(args.sizes) for m in split(args.methods)]
        for name in split(args.topologies):
            done = _plan_topology(name, cells, deadline) if time.monotonic() < deadline else []
            rows += done
            missing += [(*cell, name) for cell in cells[len(done):]]
    path = os.path.join(args.output_dir, "scaling_plan.json")
    previous = _read(path) if args.add else None
    record = {"rows": rows, "not_planned": [dict(zip(CELL, m)) for m in missing],
              "budget_s": args.budget_s, "wall_s": round(time.monotonic() - start, 1),
              "machine": f"{os.cpu_count()} CPU cores (fake devices)"}
    results_file.write(record, args.output_dir, "scaling_plan", "scaling_plan.py", argv,
                       quiet=True)
    record = _read(path)  # With the date and command the results file adds.
    if previous:
        record = _added(previous, record)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
    _write_doc(args.doc, record)
    return 0


CELL = ("size", "method", "levers", "topology")


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in CELL)


def _runs(record: dict) -> list:
    return record.get("runs") or [{k: record[k] for k in ("command", "date", "wall_s",
                                                            "budget_s", "machine")}]


def _added(previous: dict, record: dict) -> dict:
    """`record`'s rows plus `previous`'s for the cells `record` did not plan."""
    old_runs = _runs(previous)
    for row in previous["rows"]:
        row.setdefault("run", 0)
    new_run = len(old_runs)
    planned = {_key(r) for r in record["rows"]}
    rows = [r for r in previous["rows"] if _key(r) not in planned]
    rows += [{**r, "run": new_run} for r in record["rows"]]
    done = {_key(r) for r in rows}
    missing = {_key(m): m for m in previous["not_planned"] + record["not_planned"]
               if _key(m) not in done}
    return {**record, "rows": rows, "not_planned": list(missing.values()),
            "runs": old_runs + _runs(record)}


def _write_doc(path: str, record: dict) -> None:
    """Replaces the generated part of the doc (between the markers) with the table."""
    begin, end = "<!-- scaling_plan:begin -->", "<!-- scaling_plan:end -->"
    missing = record["not_planned"]
    runs = _runs(record)
    note = (f"\n\nNot planned within the budgets ({len(missing)} cells): "
            + ", ".join("/".join(m[k] for k in CELL) for m in missing) if missing else "")
    made = "; ".join(f"`{r['command']}` on {r['date']} ({r['machine']}, {r['wall_s']:.0f} s)"
                     + (f" (rows marked {i + 1})" if len(runs) > 1 else "")
                     for i, r in enumerate(runs))
    order = list(LEVERS)
    rows = sorted(record["rows"], key=lambda r: (order.index(r["levers"]), r["topology"],
                                                 r["size"], r["method"]))
    generated = f"{begin}\nGenerated by {made}.\n\n{table(rows, len(runs) > 1)}{note}\n{end}"
    with open(path) as f:
        doc = f.read()
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + generated + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + generated + "\n"
    with open(path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    sys.exit(main())
