"""Decoding throughput, ours vs HF `generate`, on the same weights and inputs, in one run.

Random weights of a T5 preset are written once with `save_t5`, loaded by both
sides; the same batch of inputs is decoded greedily and with 4 beams for a
fixed number of new tokens (EOS is suppressed on both sides by biasing its
logit row, so every row decodes the full length and both do the same work).

    python benchmarks/decoding.py --preset=small --batch=64 --new_tokens=32

Reports generated tokens/s (batch x new tokens / median wall time over
`--repeats` after one warm-up, which includes our compilation) and writes
`benchmarks/results/decoding_<preset>_<device>[_<tag>].json`.

Precision: fp32 on CPU; on GPU bf16 weights and compute on both sides (HF
`model.to(bfloat16)`, ours params cast to bf16 with `dtype=bfloat16`), as
one serves a model, and a larger default batch and inputs that give the
device work (`--batch=128 --input_length=512 --new_tokens=64`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import environment
import results_file


def _timed(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 CPU, 128 GPU")
    parser.add_argument("--input_length", type=int, default=None,
                        help="default: 128 CPU, 512 GPU")
    parser.add_argument("--new_tokens", type=int, default=None, help="default: 32 CPU, 64 GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: float32 CPU, bfloat16 GPU")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    args = parser.parse_args(argv)

    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from ift_jax import decoding, hf
    from ift_jax.models import t5

    gpu = jax.default_backend() == "gpu"
    for key, cpu_value, gpu_value in (("batch", 64, 128), ("input_length", 128, 512),
                                      ("new_tokens", 32, 64),
                                      ("dtype", "float32", "bfloat16")):
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    machine = environment.describe(jax.default_backend())
    config = t5.get_config(args.preset, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    abstract = nn.unbox(t5.abstract_variables(config)["params"])
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), abstract)
    params["decoder"]["logits_dense"]["kernel"][:, 1] = -10.0  # EOS never wins.
    hf_dir = tempfile.mkdtemp()
    hf.save_t5(hf_dir, config, params)
    config, params = hf.load_t5(hf_dir)
    dtype = jnp.dtype(args.dtype)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    model = t5.Transformer(config)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval().to(
        torch_device, getattr(torch, args.dtype))
    inputs = rng.integers(2, config.vocab_size, (args.batch, args.input_length))
    inputs_pt = torch.as_tensor(inputs, device=torch_device)
    torch.set_num_threads(os.cpu_count() or 1)

    def ours(beams):
        if beams == 1:
            out, _ = decoding.greedy(model, params, inputs, max_decode_length=args.new_tokens)
        else:
            out, _ = decoding.beam_search(model, params, inputs, num_beams=beams,
                                          max_decode_length=args.new_tokens)
        return jax.block_until_ready(out)

    def peer(beams):
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=inputs_pt, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, num_beams=beams, do_sample=False,
                decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
        return out.cpu()  # Waits for the device.

    results = {}
    for beams in (1, 4):
        for name, fn in (("ift_jax", ours), ("hf_generate", peer)):
            first, median = _timed(lambda: fn(beams), args.repeats)
            results[f"{name}_beams{beams}"] = {
                "first_call_s": round(first, 3), "median_s": round(median, 3),
                "tokens_per_s": round(args.batch * args.new_tokens / median, 1)}
        results[f"ratio_beams{beams}"] = round(
            results[f"ift_jax_beams{beams}"]["tokens_per_s"]
            / results[f"hf_generate_beams{beams}"]["tokens_per_s"], 3)

    device = jax.devices()[0]
    record = {
        "benchmark": "decoding", "preset": args.preset, "batch": args.batch,
        "input_length": args.input_length, "new_tokens": args.new_tokens,
        "precision": f"{args.dtype} weights and compute, both sides", "results": results,
        "tag": args.tag, "ift_jax_from": os.path.dirname(decoding.__file__),
        "machine": {**machine, "jax_device": device.device_kind,
                    "load_at_end": environment.load()},
    }
    tag = f"_{args.tag}" if args.tag else ""
    results_file.write(record, args.output_dir,
                       f"decoding_{args.preset}_{device.platform}{tag}", "decoding.py", argv)
    shutil.rmtree(hf_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
