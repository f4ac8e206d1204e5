"""One measured configuration per process: our train step, the HF peer's, the matmul peak.

Run by `train_throughput.py` and `packing.py`, never by hand:

    python benchmarks/workers.py ours|peer|matmul SPEC.json RESULT.json

Each (side, preset, method) gets its own process so its peak memory is its
own: on GPU the device's peak bytes, on CPU the process's peak RSS (VmHWM)
over the timed steps (reset after the warm-up, so one-off compilation is out;
the warm-up's peak, compilation included, is reported beside it).

- `ours`: the training step exactly as `ift-jax train` builds it:
  `model_setup.build` on a config derived from `configs/default.py`,
  `model_setup.initialize` on a 1-device mesh, `train_step.jit_train_step`.
  With `init_from` (an HF directory, `write_random_checkpoint`) it starts from
  those weights as a fine-tuning run does; otherwise from a random init.
  With `export_dir` it first writes what the peer needs to start from the
  same weights: the base model (`hf.save_t5`, unless `init_from` has it),
  its initial LoRA adapters (`peft_formats.save_peft`) and soft prompt
  (`prompt.npy`).
- `peer`: `transformers.T5ForConditionalGeneration.from_pretrained` of
  `init_from` (else of `hf_dir`), with the adapters / prompt of `hf_dir`,
  wrapped by `peft.get_peft_model` for LoRA / prompt tuning,
  `torch.optim.AdamW` over the trainable params, HF's own loss from
  `labels`, gradient clipping at 1.0 as ours; optionally `torch.compile`.
- `matmul`: the device's measured peak matmul rate, jnp and torch, same size.

Both train-step sides read the same batches (`.npz` of `[num, B, L]` arrays
with t5x feature names) and run `warmup` + `steps` steps, cycling the batches;
the step time of every step is returned (ours: blocked on the output state
and metrics; torch: `loss.item()` after the optimizer step, plus
`cuda.synchronize` on GPU).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import environment

# The repository root, for `configs.default` (benchmarks/ itself is the script's folder).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)

LOCK_ENV = "IFT_BENCH_DEVICE_LOCK"
PROMPT_FILE = "prompt.npy"
ADAPTER_DIR = "adapter"  # Our initial LoRA adapters in HF PEFT format.


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        stacked = {k: data[k] for k in data.files}
    num = next(iter(stacked.values())).shape[0]
    return [{k: v[i] for k, v in stacked.items()} for i in range(num)]


def save_batches(path: str, batches: list[dict[str, np.ndarray]]) -> None:
    np.savez_compressed(path, **{k: np.stack([b[k] for b in batches]) for k in batches[0]})


def _tree_bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _timing(times: list[float], warmup: int) -> dict:
    timed = times[warmup:]
    # max/min of the timed steps: well above 1 means something else took the CPU.
    return {"first_step_s": round(times[0], 4), "median_step_s": statistics.median(timed),
            "step_time_spread": max(timed) / min(timed),
            "step_times_s": [round(t, 4) for t in times]}


@contextlib.contextmanager
def device_lock(what: str):
    """Exclusive use of the device while `what` runs, where workers run side by side.

    `train_throughput.py --lanes=2` runs two workers at a time (their imports,
    set-up, weight export and the peer's model loading overlap); the file named
    by `$IFT_BENCH_DEVICE_LOCK` (`flock`) makes sure no two of them compile or
    time steps at once. Returns the seconds spent waiting for the lock.
    """
    path = os.environ.get(LOCK_ENV)
    if not path:
        yield
        return
    import fcntl
    with open(path, "a") as f:
        start = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 1:
            print(f"{what}: waited {waited:.0f} s for the device", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_steps(step, warmup: int, steps: int, first_step_locked: bool = True
               ) -> tuple[list[float], list[float], dict]:
    """Step times, losses and peak RSS of `step(i)` over warm-up and timed steps.

    The RSS high-water mark is reset before the first step (set-up excluded) and
    again after the warm-up, so the timed steps' peak leaves out one-off costs
    such as compilation (which the warm-up peak includes). All steps run under
    `device_lock`, except the first when `first_step_locked` is False: the
    peer's first step (`torch.compile`'s compilation, mostly host work) may then
    overlap another worker's device work, which only that first step's own time
    (reported, never in the median) can feel.
    """
    memory = {"rss_before_steps_bytes": environment.rss_bytes(),
              "peak_rss_reset": environment.reset_peak_rss(),
              "loadavg_1m_before_steps": os.getloadavg()[0]}
    times, losses = [], []

    def timed(i: int) -> None:
        if i == warmup:
            memory["peak_rss_warmup_bytes"] = environment.peak_rss_bytes()
            environment.reset_peak_rss()
        start = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - start)

    if not first_step_locked:
        timed(0)
    with device_lock("steps"):
        for i in range(len(times), warmup + steps):
            timed(i)
    memory["peak_rss_bytes"] = environment.peak_rss_bytes()
    memory["loadavg_1m_after_steps"] = os.getloadavg()[0]
    return times, losses, memory


# ----------------------------------------------------------------------------
# Ours.


def our_config(spec: dict):
    """The run config: `configs/default.py` with the benchmark's model, method and
    optimizer (AdamW, constant lr, clipping 1.0, no z-loss: HF's loss is plain CE)."""
    import ml_collections
    from configs import default

    config = default.get_config()
    config.model = ml_collections.ConfigDict(
        {"preset": spec["preset"], "dropout_rate": 0.0, "dtype": spec["dtype"]})
    config.data.inputs_length = spec["inputs_length"]
    config.data.targets_length = spec["targets_length"]
    config.train.batch_size = spec["batch_size"]
    config.train.seed = spec["seed"]
    config.init_from = spec.get("init_from", "")
    config.peft.method = spec["method"]
    config.peft.lora_rank = spec["lora_rank"]
    config.peft.lora_alpha = float(spec["lora_rank"])  # scale 1, as the peer's alpha = r
    config.peft.lora_dropout = 0.0
    config.peft.prompt_length = spec["prompt_length"]
    config.optimizer.name = "adamw"
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = spec["learning_rate"]
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.loss.z_loss = 0.0
    return config


def _export(setup, state, frozen, out_dir: str) -> None:
    """Our initial weights as an HF directory (+ the soft prompt) for the peer."""
    import jax
    from flax import traverse_util
    from ift_jax import hf, model_setup, peft, peft_formats

    flat = traverse_util.flatten_dict(jax.device_get(model_setup.merge(state.params, frozen)))
    base_dir = setup.config.init_from or out_dir
    os.makedirs(out_dir, exist_ok=True)
    if not setup.config.init_from:
        base = {k: np.asarray(v) for k, v in flat.items()
                if k[-1] not in peft.LORA_LEAVES and k != peft.PROMPT_PATH}
        hf.save_t5(out_dir, setup.t5_config, traverse_util.unflatten_dict(base))
        del base
    if any(k[-1] in peft.LORA_LEAVES for k in flat):  # Our initial A (and zero B).
        lora = peft.MethodConfig("lora", lora=model_setup.lora_config(setup.config.peft,
                                                                      quantize=False))
        peft_formats.save_peft(os.path.join(out_dir, ADAPTER_DIR), setup.t5_config,
                               traverse_util.unflatten_dict(flat), lora, base_dir)
    if peft.PROMPT_PATH in flat:
        np.save(os.path.join(out_dir, PROMPT_FILE), np.asarray(flat[peft.PROMPT_PATH]))
    del flat
    gc.collect()


def _init_stddev(names: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """The stddev `ift_jax.models` initializes a weight with (t5x's scheme):
    1/sqrt(fan in), the query's also over d_kv; embeddings 1."""
    if names[-1] in ("embedding", "rel_embedding"):
        return 1.0
    if "query" in names:  # [embed, heads, kv]
        return (shape[0] * shape[-1]) ** -0.5
    if "out" in names:  # [heads, kv, embed]
        return (shape[0] * shape[1]) ** -0.5
    return shape[0] ** -0.5


def write_random_checkpoint(preset: str, out_dir: str, seed: int = 0) -> str:
    """An HF checkpoint of `preset` with random weights at the model's own init
    scales (layer-norm scales 1), the base both sides load as `init_from`: made
    on the host, so no worker compiles a random init. Realistic scales matter:
    with one N(0, 0.05) for every weight (as before) the attention logits were
    ~9x too large, the softmax saturated, and the two sides' fp32 first losses
    differed by 7e-4 relative from rounding alone."""
    import flax.linen as nn
    import jax
    from ift_jax import hf
    from ift_jax.models import t5

    config = t5.get_config(preset, dropout_rate=0.0)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        if names[-1] == "scale":
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0, _init_stddev(names, leaf.shape), leaf.shape).astype(np.float32)

    abstract = nn.unbox(t5.abstract_variables(config)["params"])
    hf.save_t5(out_dir, config, jax.tree_util.tree_map_with_path(value, abstract))
    return out_dir


def flops_per_token(setup, spec: dict) -> dict:
    """Training FLOPs per input+target token, two ways.

    `executed`: what the trainer logs MFU with, `setup.flops_per_token`
    (`model_setup.training_flops_per_token` of the method: weight gradients only
    for trainable weights, so ~4·N for LoRA and prompt tuning, plus LoRA's own
    matmuls and prompt tuning's extra encoder positions). `six_n`: 6·N of the
    plain model over the same positions, the usual "6 × params" convention.
    """
    from ift_jax import model_setup
    inputs, targets = spec["inputs_length"], spec["targets_length"]
    prompt = spec["prompt_length"] if spec["method"] == "prompt" else 0
    per_token = model_setup.training_flops_per_token(setup.t5_config, inputs + prompt, targets)
    return {"six_n": per_token * (inputs + prompt + targets) / (inputs + targets),
            "executed": setup.flops_per_token}


def run_ours(spec: dict) -> dict:
    import jax
    from ift_jax import model_setup, partitioning, peft, runs, train_step

    setup = runs.build_setup(our_config(spec))
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    init = model_setup.initialize(setup, mesh)
    state, frozen, shardings = init.state, init.frozen, init.shardings
    model_setup.release_init_params(setup)  # On the devices now.
    if spec.get("export_dir"):
        _export(setup, state, frozen, spec["export_dir"])
    batch_sharding = partitioning.batch_sharding(mesh)
    step_fn = train_step.jit_train_step(setup, shardings, batch_sharding)
    batches = [{k: jax.device_put(v, batch_sharding) for k, v in b.items()}
               for b in load_batches(spec["batches"])]
    sizes = {"trainable_params": peft.count_params(state.params),
             "frozen_params": peft.count_params(frozen),
             "param_bytes": _tree_bytes(state.params) + _tree_bytes(frozen),
             "optimizer_state_bytes": _tree_bytes(state.opt_state)}
    rng = jax.random.key(spec["seed"])
    def step(i: int) -> float:
        nonlocal state
        state, metrics = step_fn(state, frozen, batches[i % len(batches)],
                                 jax.random.fold_in(rng, i))
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"])

    with partitioning.mesh_context(mesh):
        times, losses, memory = _run_steps(step, spec["warmup"], spec["steps"])
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {**_timing(times, spec["warmup"]), "losses": losses, **sizes,
            "flops_per_token": flops_per_token(setup, spec),
            "device_peak_bytes": stats.get("peak_bytes_in_use"), **memory,
            "device": device.device_kind, "platform": device.platform}


# ----------------------------------------------------------------------------
# The peer.


def _peer_model(spec: dict):
    import peft
    import torch
    import transformers

    model = transformers.T5ForConditionalGeneration.from_pretrained(
        spec.get("init_from") or spec["hf_dir"])
    untied = model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    if spec["method"] == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=spec["lora_rank"], lora_alpha=spec["lora_rank"], target_modules=["q", "v"],
            lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
        if not spec.get("peer_own_init"):
            _load_our_adapters(model, os.path.join(spec["hf_dir"], ADAPTER_DIR))
    elif spec["method"] == "prompt":
        # One prompt table (the encoder's): PEFT's seq2seq default makes a second,
        # decoder-side one that prompt tuning's forward never reads.
        model = peft.get_peft_model(model, peft.PromptTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=spec["prompt_length"],
            num_transformer_submodules=1))
        prompt = np.load(os.path.join(spec["hf_dir"], PROMPT_FILE))
        with torch.no_grad():  # Our initial prompt, so both sides start equal.
            model.prompt_encoder["default"].embedding.weight.copy_(torch.as_tensor(prompt))
    elif spec["method"] != "full":
        raise ValueError(f"the peer has no method {spec['method']!r}; use full, lora, prompt")
    return model, untied


def _load_our_adapters(model, adapter_dir: str) -> None:
    """Our initial LoRA A/B into the PEFT model. Both draw A from the same
    distribution (`ift_jax.peft.lora_a_init`), but not the same values: without
    this the two sides would train different adapters from the second step on."""
    import peft
    from safetensors.torch import load_file

    result = peft.set_peft_model_state_dict(
        model, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
    lora = [k for k in result.missing_keys if "lora_" in k]
    if lora or result.unexpected_keys:
        raise ValueError(f"our adapters do not fit the PEFT model: missing {lora[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def _peer_inputs(batch: dict, device) -> dict:
    import torch
    if "encoder_segment_ids" in batch:
        raise ValueError("HF T5 cannot read packed batches; give the peer padded ones")
    targets = batch["decoder_target_tokens"]
    as_long = lambda x: torch.as_tensor(np.asarray(x, np.int64), device=device)  # noqa: E731
    return {"input_ids": as_long(batch["encoder_input_tokens"]),
            "attention_mask": as_long(batch["encoder_input_tokens"] > 0),
            "decoder_input_ids": as_long(batch["decoder_input_tokens"]),
            "labels": as_long(np.where(targets > 0, targets, -100))}


def run_peer(spec: dict) -> dict:
    import torch

    torch.manual_seed(spec["seed"])
    torch.set_num_threads(os.cpu_count() or 1)
    cuda = spec["platform"] == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    model, untied = _peer_model(spec)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["learning_rate"], weight_decay=0.0)
    forward = torch.compile(model) if spec.get("compile") else model
    batches = [_peer_inputs(b, device) for b in load_batches(spec["batches"])]
    bf16 = spec["dtype"] == "bfloat16"

    def step(inputs: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    times, losses, memory = _run_steps(lambda i: step(batches[i % len(batches)]),
                                       spec["warmup"], spec["steps"], first_step_locked=False)
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {**_timing(times, spec["warmup"]), "losses": losses,
            "trainable_params": sum(p.numel() for p in trainable),
            "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
            "lm_head_untied": untied,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, **memory,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch_threads": torch.get_num_threads(), "compiled": bool(spec.get("compile"))}


# ----------------------------------------------------------------------------
# Peak matmul rate.


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_matmul(spec: dict) -> dict:
    """FLOP/s of an `[n, n] @ [n, n]` matmul (2·n³ FLOPs), jnp and torch, median."""
    import jax
    import jax.numpy as jnp
    import torch

    n, repeats, dtype = spec["size"], spec["repeats"], spec["dtype"]
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in
            jax.random.split(jax.random.key(0), 2))
    matmul = jax.jit(jnp.matmul)
    jax_s = _median_time(lambda: matmul(a, b).block_until_ready(), repeats)
    cuda = spec["platform"] == "gpu"
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if cuda else "cpu"
    ta, tb = (torch.randn(n, n, dtype=getattr(torch, dtype), device=device) for _ in range(2))

    def torch_mm():
        torch.mm(ta, tb)
        if cuda:
            torch.cuda.synchronize()

    torch_s = _median_time(torch_mm, repeats)
    flops = 2.0 * n ** 3
    return {"size": n, "dtype": dtype, "repeats": repeats,
            "jax_flops_per_s": flops / jax_s, "torch_flops_per_s": flops / torch_s}


WORKERS = {"ours": run_ours, "peer": run_peer, "matmul": run_matmul}


TIMEOUT_S = 7200.0  # One worker's limit without a deadline: a hung one is stopped.


def spawn(kind: str, spec: dict, workdir: str, name: str, timeout_s: float = TIMEOUT_S) -> dict:
    """Runs one worker in a fresh process; its result, or `{"error": ...}` if it failed
    (e.g. out of memory), so one failing configuration does not lose the others."""
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    result_path = os.path.join(workdir, f"{name}.result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {kind} worker", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), kind, spec_path,
                               result_path], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout_s:.0f} s"}
    else:
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            result = {"error": f"exit code {proc.returncode}: " + "\n".join(tail)}
        else:
            with open(result_path) as f:
                result = json.load(f)
    result["worker_wall_s"] = round(time.perf_counter() - start, 1)
    outcome = result.get("error", "").splitlines()[-1:] or [
        f"median step {result['median_step_s']:.4f} s" if "median_step_s" in result else "ok"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {result['worker_wall_s']} s, "
          f"{outcome[0][:200]}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:
    kind, spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = WORKERS[kind](spec)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
