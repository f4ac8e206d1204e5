"""Training step throughput and MFU, ours vs HF transformers + PEFT, in one run.

For each preset and method (full fine-tuning, LoRA r=32 on q and v, prompt
tuning with 100 virtual tokens) both sides train on the same batch of random
tokens (inputs 512 / targets 128, every position real: no padding, so both
do the same work) from the same initial weights, with AdamW over the
trainable params and gradient clipping at 1.0; each side runs in its own
process (`workers.py`) so its peak memory is its own. As in fine-tuning, both
load one checkpoint of the preset (random weights written here,
`workers.write_random_checkpoint`); LoRA: the peer gets our initial A and B,
as prompt tuning gets our initial prompt.

    python benchmarks/train_throughput.py --presets=small,base --methods=full,lora,prompt

Per configuration: median step time over `--steps` steps after `--warmup`
steps (the first one compiles), tokens/s counting input+target tokens
(`batch × (512 + 128)`; prompt positions are not tokens), MFU, peak memory,
param and optimizer-state bytes, and ours/peer ratios. The first-step loss of
both sides is compared (same weights and batch: fp32 agrees to ~1e-7), and so
are the later steps' losses, which shows the peer does the same math
(forward, backward, clipping, AdamW).

MFU = FLOPs per token × tokens/s ÷ peak. FLOPs per token are the ones the
trainer logs MFU with, `model_setup.training_flops_per_token` of the method
(its docstring has the formula): forward + input gradients for every matmul
weight, weight gradients only for trainable ones, so ~6·N for full
fine-tuning and ~4·N for LoRA (plus the adapters' own matmuls) and prompt
tuning (with the encoder over 100 more positions); attention's score/value
products included, elementwise work not. `mfu_6n` uses 6·N of the plain
model over the same positions. The peak is measured in the same run: the
median rate of an `[n, n] @ [n, n]` matmul with jnp and with torch; MFU uses
the larger.

Precision: fp32 on CPU; on GPU bf16 compute with fp32 master weights (ours:
`model.dtype=bfloat16`; the peer: `torch.autocast(bfloat16)`), and the peer
both eager and `torch.compile`d.

Writes `benchmarks/results/train_throughput_<preset>_<platform>.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import time

import numpy as np

import environment
import results_file
import workers

# A step of ~1-15 s on a 2-core CPU keeps both cores busy without making the
# suite slow; on one GPU, the largest powers of two that fit both sides in fp32
# master weights + bf16 compute (80 GB).
DEFAULT_BATCH = {"cpu": {"tiny": 2, "small": 2, "base": 1, "large": 1},
                 "gpu": {"tiny": 64, "small": 128, "base": 64, "large": 16}}
# Large is in on CPU too: one step at batch 1 takes ~15 s on a 2-core EPYC for both
# sides (train_throughput_large_cpu.json), well inside a minute.
DEFAULT_PRESETS = {"cpu": "small,base,large", "gpu": "small,base,large"}
DEFAULT_PEERS = {"cpu": "eager", "gpu": "eager,compile"}
# Relative first-step loss difference on the same weights and batch: fp32 agrees to
# ~1e-7; bf16 compute rounds differently on each side (op order, fused kernels).
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
MIN_JOB_S = 20.0  # A worker started with less time left cannot finish set-up and steps.


def platform() -> str:
    """'gpu' or 'cpu': the backend JAX would use, without initializing it here."""
    try:
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def random_batch(batch: int, inputs_length: int, targets_length: int, vocab: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Full-length random tokens (ids 2.., no pad or EOS) in t5x feature names."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, vocab, (batch, targets_length)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, vocab, (batch, inputs_length)
                                                 ).astype(np.int32),
            "decoder_input_tokens": np.concatenate(
                [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones_like(targets, np.float32)}


def summarize(result: dict, tokens_per_step: int, peak_flops: float) -> dict:
    """Adds tokens/s, MFU (of ours' FLOPs per token) and the peak memory to a worker result."""
    if "error" in result:
        return result
    tokens_per_s = tokens_per_step / result["median_step_s"]
    memory = result.get("device_peak_bytes") or result.get("peak_rss_bytes")
    return {**result, "tokens_per_s": tokens_per_s,
            "peak_memory_bytes": memory,
            "peak_memory_kind": ("device peak_bytes_in_use" if result.get("device_peak_bytes")
                                 else "process peak RSS over the timed steps")}


def loss_check(ours: dict, peer: dict, dtype: str = "float32") -> dict:
    if "error" in ours or "error" in peer:
        return {"ok": False, "reason": "a side failed"}
    rels = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], peer["losses"])]
    return {"ours_first_loss": ours["losses"][0], "peer_first_loss": peer["losses"][0],
            "relative_difference": rels[0], "tolerance": LOSS_TOLERANCE[dtype],
            "ok": rels[0] <= LOSS_TOLERANCE[dtype],
            # Same start, batches and optimizer: later losses follow the same path too
            # (up to fp32 rounding that AdamW's normalization can amplify).
            "max_relative_difference_all_steps": max(rels),
            "same_trainable_params": ours["trainable_params"] == peer["trainable_params"]}


def measure_peak(args, workdir: str) -> dict:
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    result = workers.spawn("matmul", {"size": args.matmul_size, "repeats": 10,
                                      "dtype": dtype, "platform": args.platform},
                           workdir, "matmul")
    if "error" not in result:
        result["peak_flops_per_s"] = max(result["jax_flops_per_s"],
                                         result["torch_flops_per_s"])
        result["used"] = "max of jax and torch"
    return result


def base_spec(args, preset: str, method: str, batch_path: str, init_from: str) -> dict:
    return {"preset": preset, "method": method, "dtype": args.dtype, "init_from": init_from,
            "batch_size": args.batch[preset], "inputs_length": args.inputs_length,
            "targets_length": args.targets_length, "lora_rank": args.lora_rank,
            "prompt_length": args.prompt_length, "learning_rate": 1e-4, "seed": 0,
            "warmup": args.warmup, "steps": args.steps, "batches": batch_path,
            "platform": args.platform}


@dataclasses.dataclass
class Job:
    """One worker process: ours for (preset, method), or a peer mode that needs ours'
    exported weights first."""
    preset: str
    method: str
    side: str  # "ours", "hf_eager" or "hf_compile".
    spec: dict

    @property
    def name(self) -> str:
        return f"{self.preset}_{self.method}_{self.side}"


def jobs_in_order(args, batch_paths: dict, workdir: str, init_from: dict) -> list[Job]:
    """Every (preset, method) with ours and the eager peer first, preset by preset, then
    the `torch.compile`d peers: what a deadline cuts is the least wanted."""
    presets, methods = args.presets.split(","), args.methods.split(",")
    modes = args.peers.split(",")
    jobs = []
    for first in (True, False):
        for preset in presets:
            for method in methods:
                spec = base_spec(args, preset, method, batch_paths[preset], init_from[preset])
                hf_dir = os.path.join(workdir, f"{preset}_{method}_hf")
                if first:
                    jobs.append(Job(preset, method, "ours", {**spec, "export_dir": hf_dir}))
                for mode in modes:
                    if (mode == modes[0]) == first:
                        jobs.append(Job(preset, method, f"hf_{mode}", {
                            **spec, "hf_dir": hf_dir, "compile": mode == "compile"}))
    return jobs


def run_jobs(jobs: list[Job], workdir: str, lanes: int, deadline: float, on_done) -> None:
    """Runs `jobs` in order, `lanes` at a time (a peer only once ours of its preset and
    method is done), each with the time left to `deadline` as its timeout; a job that
    cannot start with `MIN_JOB_S` left is recorded as not run. `on_done(job, result)`
    is called in this thread after each one, so results can be written as they come.
    """
    results: dict[str, dict] = {}
    pending = list(jobs)
    running: dict[concurrent.futures.Future, Job] = {}

    def ours_of(job: Job) -> dict | None:
        return results.get(f"{job.preset}_{job.method}_ours")

    with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= lanes:
                    break
                ours = ours_of(job)
                if job.side != "ours" and ours is None:
                    continue  # Its weights are still being made.
                pending.remove(job)
                left = deadline - time.time()
                if job.side != "ours" and "error" in ours:
                    result = {"error": "ours failed, so no shared weights"}
                elif left < MIN_JOB_S:
                    result = {"error": f"not run: {left:.0f} s left before the deadline"}
                else:
                    kind = "ours" if job.side == "ours" else "peer"
                    running[pool.submit(workers.spawn, kind, job.spec, workdir, job.name,
                                        min(left, workers.TIMEOUT_S))] = job
                    continue
                results[job.name] = result
                on_done(job, result)
            if not running:
                continue
            done, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results[job.name] = future.result()
                on_done(job, results[job.name])


def entry(args, preset: str, method: str, batch: int, results: dict, peak: dict) -> dict:
    tokens = batch * (args.inputs_length + args.targets_length)
    peak_flops = peak.get("peak_flops_per_s")
    sides = {k: summarize(v, tokens, peak_flops) for k, v in results.items()}
    ours = sides["ours"]
    flops = ours.get("flops_per_token") or {}
    for side in sides.values():
        if "error" not in side and flops and peak_flops:
            side["mfu"] = flops["executed"] * side["tokens_per_s"] / peak_flops
            side["mfu_6n"] = flops["six_n"] * side["tokens_per_s"] / peak_flops
    ratios, checks = {}, {}
    for name, side in sides.items():
        if name == "ours":
            continue
        checks[name] = loss_check(ours, side, args.dtype)
        if "error" not in ours and "error" not in side:
            ratios[name] = {"tokens_per_s": ours["tokens_per_s"] / side["tokens_per_s"],
                            "peak_memory": ours["peak_memory_bytes"] / side["peak_memory_bytes"]}
    return {"preset": preset, "method": method, "batch_size": batch,
            "tokens_per_step": tokens, "flops_per_token": flops, "sides": sides,
            "ratios_ours_over_peer": ratios, "loss_check": checks}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=None, help="default: small,base,large")
    parser.add_argument("--methods", default="full,lora,prompt")
    parser.add_argument("--batch_sizes", default="",
                        help="preset:batch,... overriding the per-device defaults")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=128)
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--prompt_length", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peers", default=None, help="eager and/or compile; default: "
                        "eager on CPU, eager,compile on GPU")
    parser.add_argument("--lanes", type=int, default=1,
                        help="worker processes at a time (set-up overlaps; compiling and "
                             "steps are serialized by a device lock); 2 suits a GPU host")
    parser.add_argument("--deadline_s", type=float, default=0.0,
                        help="stop starting workers this many seconds after the start and "
                             "give running ones only the time left (0: no deadline)")
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="default: 2048 on CPU, 8192 on GPU")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    args = parser.parse_args(argv)
    args.platform = platform()
    args.dtype = "float32" if args.platform == "cpu" else "bfloat16"
    args.presets = args.presets or DEFAULT_PRESETS[args.platform]
    args.peers = args.peers or DEFAULT_PEERS[args.platform]
    args.matmul_size = args.matmul_size or (2048 if args.platform == "cpu" else 8192)
    args.batch = dict(DEFAULT_BATCH[args.platform])
    for item in filter(None, args.batch_sizes.split(",")):
        preset, size = item.split(":")
        args.batch[preset] = int(size)
    return args


def main(argv=None) -> int:
    # Temporary workdir: batches, HF exports (GBs).
    return environment.main_in_workdir(run, parse_args(argv), argv, "ift_jax_bench_")


def run(args, machine: dict, workdir: str, argv) -> None:
    """Measures every preset and method; writes one JSON per preset, rewritten as each
    worker finishes (so a run cut short by `--deadline_s` or a kill keeps what it got)."""
    from ift_jax.models import t5  # Shapes only; no device work in this process.

    deadline = time.time() + args.deadline_s if args.deadline_s else float("inf")
    peak = measure_peak(args, workdir)
    batch_paths, init_from = {}, {}
    for preset in args.presets.split(","):
        batch_paths[preset] = os.path.join(workdir, f"{preset}_batch.npz")
        workers.save_batches(batch_paths[preset], [random_batch(
            args.batch[preset], args.inputs_length, args.targets_length,
            t5.get_config(preset).vocab_size, seed=0)])
        init_from[preset] = workers.write_random_checkpoint(
            preset, os.path.join(workdir, f"{preset}_base"))
    jobs = jobs_in_order(args, batch_paths, workdir, init_from)
    sides: dict[tuple[str, str], dict] = {}

    def on_done(job: Job, result: dict) -> None:
        sides.setdefault((job.preset, job.method), {})[job.side] = result
        write_preset(args, machine, argv, job.preset, peak, jobs, sides)

    if args.lanes > 1:
        os.environ[workers.LOCK_ENV] = os.path.join(workdir, "device.lock")
    run_jobs(jobs, workdir, args.lanes, deadline, on_done)


def write_preset(args, machine: dict, argv, preset: str, peak: dict, jobs: list[Job],
                 sides: dict) -> None:
    batch = args.batch[preset]
    entries = []
    for method in args.methods.split(","):
        got = sides.get((preset, method), {})
        wanted = [j.side for j in jobs if (j.preset, j.method) == (preset, method)]
        results = {side: got.get(side, {"error": "not run yet"}) for side in wanted}
        entries.append(entry(args, preset, method, batch, results, peak))
    record = {
        "benchmark": "train_throughput", "preset": preset, "platform": args.platform,
        "precision": ("float32" if args.dtype == "float32"
                      else "bfloat16 compute, float32 master weights"),
        "inputs_length": args.inputs_length, "targets_length": args.targets_length,
        "batch_size": batch, "batch_choice": (
            "CPU: the smallest batch (2 for small, 1 for base and large) that keeps both "
            "cores busy; one step takes ~1-15 s here, so the suite stays under an hour"
            if args.platform == "cpu" else
            "GPU: a batch that keeps the device busy for both sides and lets two workers "
            "share its memory"),
        "tokens_counted": "input + target tokens per step (all real: random ids, no "
                          "padding); prompt-tuning positions not counted",
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "statistic": "median step time over the timed steps",
        "concurrency": (
            "one worker process at a time" if args.lanes == 1 else
            f"{args.lanes} worker processes at a time: imports, set-up, weight export and "
            "model loading overlap, but compiling (ours) and every step (the peer's first, "
            "torch.compile's compiling one, aside) hold an exclusive device lock"),
        "lora": {"rank": args.lora_rank, "alpha": args.lora_rank, "targets": "q, v "
                 "(encoder self-attention, decoder self- and cross-attention)"},
        "prompt_length": args.prompt_length,
        "optimizer": "AdamW (lr 1e-4 constant, no weight decay), grad clip 1.0, both "
                     "sides; loss: token-mean cross-entropy, no z-loss, dropout 0",
        "flops_formula": {
            "executed": "model_setup.training_flops_per_token of the method (what the "
                        "trainer logs): 2 FLOPs forward + 2 input-gradient + 2 weight-"
                        "gradient (trainable weights only) per matmul weight and position, "
                        "+ attention score/value products; per input+target token",
            "six_n": "6 x the plain model's matmul weights per token over the same "
                     "positions (+ attention)",
            "mfu": "executed x tokens/s / peak_matmul.peak_flops_per_s (mfu_6n: six_n)"},
        "peak_matmul": peak, "entries": entries,
        "machine": {**machine, "load_at_end": environment.load()},
    }
    results_file.write(record, args.output_dir, f"train_throughput_{preset}_{args.platform}",
                       "train_throughput.py", argv, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
