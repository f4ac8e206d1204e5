"""Time to the first training step from an HF checkpoint: ours vs HF transformers + PEFT.

What a researcher waits for at every run (and every sweep point): a fresh
process that loads a T5 checkpoint (`init_from`, random weights of a preset,
`workers.write_random_checkpoint`), builds the method (full fine-tuning, LoRA r=32 on
q,v, prompt tuning with 100 tokens) and finishes its first training step
(inputs 512 / targets 128). Each side runs in its own fresh process; the
phases are timed from the process start (imports included):

- ours: `runs.build_setup` (reads the checkpoint), `model_setup.initialize`, the first
  `jit_train_step` call (compilation included);
- the peer: `from_pretrained`, `get_peft_model`, the first step (eager).

`ours` runs without a compilation cache; `ours_cache_cold` / `ours_cache_warm`
run twice with one fresh persistent cache (what `ift-jax` does by default),
so the second shows a repeated start (a restart, a sweep point, `ift-jax eval`).

    python benchmarks/startup.py --preset=small --methods=full,lora,prompt
    python benchmarks/startup.py --ift_jax_path=.before   # an older package, for before/after

Writes `benchmarks/results/startup_<preset>_<platform>[_<tag>].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import environment
import results_file
import train_throughput
import workers

HERE = os.path.dirname(os.path.abspath(__file__))


def ours_first_step(spec: dict) -> dict:
    """Phase times of ours, in this (fresh) process; `spec["t0"]` is its start."""
    marks = {}
    mark = lambda name: marks.__setitem__(name, time.time() - spec["t0"])  # noqa: E731
    if spec["ift_jax_path"]:  # Ahead of the repository root that `workers` put first.
        sys.path.insert(0, os.path.abspath(spec["ift_jax_path"]))
    import jax
    from ift_jax import model_setup, partitioning, runs, train_step
    marks["ift_jax_from"] = os.path.dirname(model_setup.__file__)
    mark("imports_s")
    config = workers.our_config(spec)
    config.init_from = spec["hf_dir"]
    setup = runs.build_setup(config)
    mark("build_s")
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    init = model_setup.initialize(setup, mesh)
    state, frozen, shardings = init.state, init.frozen, init.shardings
    jax.block_until_ready(state)
    mark("initial_state_s")
    batch_sharding = partitioning.batch_sharding(mesh)
    step = train_step.jit_train_step(setup, shardings, batch_sharding)
    batch = {k: jax.device_put(v, batch_sharding)
             for k, v in workers.load_batches(spec["batches"])[0].items()}
    with partitioning.mesh_context(mesh):
        state, metrics = step(state, frozen, batch, jax.random.key(0))
        loss = float(metrics["loss"])
    mark("first_step_s")
    return {**marks, "loss": loss}


def peer_first_step(spec: dict) -> dict:
    marks = {}
    mark = lambda name: marks.__setitem__(name, time.time() - spec["t0"])  # noqa: E731
    import torch
    import transformers  # noqa: F401
    import peft  # noqa: F401
    mark("imports_s")
    model, _ = workers._peer_model({**spec, "hf_dir": spec["hf_dir"]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    mark("build_s")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["learning_rate"], weight_decay=0.0)
    inputs = workers._peer_inputs(workers.load_batches(spec["batches"])[0], device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16"):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    loss = loss.item()
    mark("first_step_s")
    return {**marks, "loss": loss}


def spawn(side: str, spec: dict, cache_dir: str = "") -> dict:
    """One side in a fresh process, timed from just before it starts; ours with XLA's
    persistent compilation cache in `cache_dir` if given (as `ift-jax` runs), else none."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    spec = {**spec, "t0": time.time()}
    proc = subprocess.run([sys.executable, __file__, "--worker", side, json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    wall = time.time() - spec["t0"]
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        side, spec = argv[1], json.loads(argv[2])
        print(json.dumps((ours_first_step if side == "ours" else peer_first_step)(spec)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--methods", default="full,lora,prompt")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--ift_jax_path", default="",
                        help="a folder holding another ift_jax package for our side "
                             "(before/after comparisons)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also run ours twice with one fresh compilation cache (as "
                             "`ift-jax` uses one): the second run's start-up is a repeat "
                             "run's, e.g. a sweep point with the same shapes")
    parser.add_argument("--tag", default="")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    platform = train_throughput.platform()
    machine = environment.describe(platform)

    import numpy as np
    from ift_jax.models import t5

    config = t5.get_config(args.preset, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as workdir:
        hf_dir = workers.write_random_checkpoint(args.preset, os.path.join(workdir, "hf"))
        np.save(os.path.join(hf_dir, workers.PROMPT_FILE),
                rng.normal(0, 0.5, (100, config.d_model)).astype(np.float32))
        batches = os.path.join(workdir, "batch.npz")
        workers.save_batches(batches, [train_throughput.random_batch(
            args.batch_size, 512, 128, config.vocab_size, seed=0)])
        results = {}
        for method in args.methods.split(","):
            spec = {"preset": args.preset, "method": method, "batch_size": args.batch_size,
                    "dtype": "float32" if platform == "cpu" else "bfloat16",
                    "inputs_length": 512, "targets_length": 128, "lora_rank": 32,
                    "prompt_length": 100, "learning_rate": 1e-4, "seed": 0,
                    "batches": batches, "hf_dir": hf_dir, "peer_own_init": True,
                    "ift_jax_path": args.ift_jax_path}
            results[method] = {"ours": spawn("ours", spec), "hf_eager": spawn("peer", spec)}
            if args.cache:  # A second run finds its programs compiled by the first.
                cache = os.path.join(workdir, f"xla_cache_{method}")
                results[method]["ours_cache_cold"] = spawn("ours", spec, cache)
                results[method]["ours_cache_warm"] = spawn("ours", spec, cache)
            print(method, json.dumps(results[method]), file=sys.stderr, flush=True)
    record = {"benchmark": "startup", "preset": args.preset, "platform": platform,
              "tag": args.tag, "ift_jax_path": args.ift_jax_path or "(installed)",
              "statistic": "seconds from process start to the end of each phase, one run",
              "results": results, "machine": {**machine, "load_at_end": environment.load()}}
    tag = f"_{args.tag}" if args.tag else ""
    results_file.write(record, args.output_dir, f"startup_{args.preset}_{platform}{tag}",
                       "startup.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
