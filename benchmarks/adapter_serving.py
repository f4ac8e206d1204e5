"""Serving 4 adapters to one mixed stream: one batch for all vs one run per adapter vs HF PEFT.

A stream of requests, each for one of 4 adapters on one base (2 LoRA adapters:
rank 8 on q,v and rank 4 on every linear layer; 2 soft prompts: 10 and 20
positions), is decoded greedily three ways, in one process, on the same random
base weights, adapters and input ids:

- `ours_mixed`: `serving.decode_rows`, rows in arrival order, `--batch` rows
  per batch whatever their adapters (LoRA A/B and prompts gathered per row);
- `ours_separate`: the stream split by adapter, each adapter's rows decoded by
  its own model (`peft.build_models`) in batches of `--batch`: 4 separate runs;
- `hf_peft_set_adapter`: HF PEFT, the stream split by adapter, `set_adapter(name)`
  before each adapter's rows, `generate` in batches of `--batch` (PEFT cannot
  hold LoRA and prompt-tuning adapters in one `PeftModel`: one model for the two
  LoRA adapters, one for the two prompts, on the same base weights).

No side stops at EOS (ours: `eos_id=-1`; HF: no `eos_token_id` in the
generation config, and no `min_new_tokens`, which would mask EOS and change
the argmax), so every request decodes `--new_tokens` tokens, the sides do the
same work and greedy gives them the same tokens. Tokens/s = requests × new tokens / the median wall
time of `--repeats` passes over the whole stream after one warm-up pass (which
includes compilation; in the JSON as `first_pass_s`). The sides' tokens are
compared (`agreement`: the share of requests whose tokens are identical).

    python benchmarks/adapter_serving.py --preset=small

writes `benchmarks/results/adapter_serving_<preset>_<device>.json`.
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

ADAPTERS = ("lora_qv_r8", "lora_all_r4", "prompt_10", "prompt_20")


def _timed(fn, repeats: int):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, first, statistics.median(times)


def _methods():
    from ift_jax import lora, peft
    return {
        "lora_qv_r8": peft.MethodConfig("lora", lora=peft.LoraConfig(rank=8, alpha=16.0)),
        "lora_all_r4": peft.MethodConfig("lora", lora=peft.LoraConfig(
            rank=4, alpha=8.0, target_regex=lora.target_regex("all"))),
        "prompt_10": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=10)),
        "prompt_20": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=20)),
    }


def _adapters(config, base, root: str, rng: np.random.Generator) -> dict[str, str]:
    """Each adapter with its leaves moved off their init (LoRA B non-zero), saved in HF
    PEFT format; {name: dir}."""
    import jax

    from ift_jax import peft, peft_formats
    dirs = {}
    for seed, (name, method) in enumerate(_methods().items()):
        model, _ = peft.build_models(config, method)
        params = peft.init_adapters(model, base, jax.random.key(seed))
        own, _ = peft.split_params(params, peft.trainable_mask(params, method.name))
        own = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(
            np.float32), own)
        dirs[name] = os.path.join(root, name)
        peft_formats.save_peft(dirs[name], config, own, method, os.path.join(root, "base"))
    return dirs


def _by_adapter(names):
    return {a: [i for i, n in enumerate(names) if n == a] for a in ADAPTERS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_length", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__),
                                                             "results"))
    args = parser.parse_args(argv)

    import flax.linen as nn
    import jax
    import peft as hf_peft
    import torch
    import transformers

    from ift_jax import decoding, hf, peft, peft_formats, serving
    from ift_jax.models import t5

    machine = environment.describe(jax.default_backend())
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    config = t5.get_config(args.preset, dropout_rate=0.0)
    abstract = nn.unbox(t5.abstract_variables(config)["params"])
    base = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), abstract)
    root = tempfile.mkdtemp()
    base_dir = os.path.join(root, "base")
    hf.save_t5(base_dir, config, base)
    dirs = _adapters(config, base, root, rng)

    names = [ADAPTERS[i] for i in rng.integers(0, len(ADAPTERS), args.requests)]
    inputs = rng.integers(3, config.vocab_size, (args.requests, args.input_length))
    inputs[:, -1] = 1
    tokens = [list(map(int, row)) for row in inputs]
    groups = _by_adapter(names)

    bank = serving.load_bank(base_dir, dirs)

    def ours_mixed():
        return np.stack(serving.decode_rows(bank, tokens, names, batch_size=args.batch,
                                            max_decode_length=args.new_tokens, eos_id=-1))

    loaded = {n: peft_formats.load_peft(d, config) for n, d in dirs.items()}
    alone = {n: (peft.build_models(config, a.method)[1], a.apply_to(base))
             for n, a in loaded.items()}

    def ours_separate():
        out = np.zeros((args.requests, args.new_tokens), np.int64)
        for name, rows in groups.items():
            model, params = alone[name]
            for start in range(0, len(rows), args.batch):
                chunk = rows[start:start + args.batch]
                batch = np.zeros((args.batch, args.input_length), np.int32)
                batch[:len(chunk)] = inputs[chunk]
                got, _ = decoding.greedy(model, params, batch, max_decode_length=args.new_tokens,
                                         eos_id=-1)
                out[chunk] = np.asarray(got)[:len(chunk)]
        return out

    hf_models = {}
    for kind in ("lora", "prompt"):
        mine = [n for n in ADAPTERS if n.startswith(kind)]
        t5_model = transformers.T5ForConditionalGeneration.from_pretrained(base_dir).eval()
        t5_model.generation_config.eos_token_id = None  # Never stop: as ours, eos_id=-1.
        model = hf_peft.PeftModel.from_pretrained(t5_model, dirs[mine[0]],
                                                  adapter_name=mine[0])
        for other in mine[1:]:
            model.load_adapter(dirs[other], adapter_name=other)
        for n in mine:
            hf_models[n] = model.eval()

    def hf_switching():
        out = np.zeros((args.requests, args.new_tokens), np.int64)
        with torch.no_grad():
            for name, rows in groups.items():
                model = hf_models[name]
                model.set_adapter(name)
                for start in range(0, len(rows), args.batch):
                    chunk = rows[start:start + args.batch]
                    ids = torch.as_tensor(inputs[chunk])
                    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=args.new_tokens, do_sample=False,
                                         num_beams=1, decoder_start_token_id=0,
                                         pad_token_id=0)
                    out[chunk] = got[:, 1:].numpy()  # Without the start token.
        return out

    sides, outputs = {}, {}
    for side, fn in (("ours_mixed", ours_mixed), ("ours_separate", ours_separate),
                     ("hf_peft_set_adapter", hf_switching)):
        outputs[side], first, median = _timed(fn, args.repeats)
        sides[side] = {"first_pass_s": round(first, 3), "median_s": round(median, 3),
                       "tokens_per_s": round(args.requests * args.new_tokens / median, 1)}
    reference = outputs["ours_mixed"]
    agreement = {side: float(np.mean([(out[i] == reference[i]).all()
                                      for i in range(args.requests)]))
                 for side, out in outputs.items() if side != "ours_mixed"}
    record = {
        "benchmark": "adapter_serving", "preset": args.preset, "requests": args.requests,
        "batch": args.batch, "input_length": args.input_length,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "adapters": {n: len(groups[n]) for n in ADAPTERS},
        "precision": "float32 weights and compute, all sides",
        "sides": sides,
        "ratios": {"mixed_vs_separate": round(sides["ours_mixed"]["tokens_per_s"]
                                              / sides["ours_separate"]["tokens_per_s"], 3),
                   "mixed_vs_hf_peft": round(sides["ours_mixed"]["tokens_per_s"]
                                             / sides["hf_peft_set_adapter"]["tokens_per_s"],
                                             3)},
        "agreement_with_ours_mixed": agreement,
        "versions": {"peft": hf_peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "machine": {**machine, "jax_device": jax.devices()[0].device_kind,
                    "load_at_end": environment.load()},
    }
    results_file.write(record, args.output_dir,
                       f"adapter_serving_{args.preset}_{jax.devices()[0].platform}",
                       "adapter_serving.py", argv)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
