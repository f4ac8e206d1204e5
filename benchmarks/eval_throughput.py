"""Evaluation throughput, ours vs an HF transformers loop doing the same work, on the same
weights and prompts, in one run: MMLU rank classification (examples/s) and BIG-Bench Hard
answer-only generation (new tokens/s).

    python benchmarks/eval_throughput.py --preset=small      # T5 small; minutes on 2 CPU cores
    python benchmarks/eval_throughput.py --preset=tiny       # smoke run, seconds

Both sides load one HF directory with random weights of the preset's T5 at the model's
own init scales (`workers.write_random_checkpoint`) and read the same token ids:

- Prompts are built in plain Python from the local data (`$IFT_JAX_DATA_DIR`, else
  ../shared/data), with no TensorFlow or SeqIO (a GPU host may have neither): MMLU's
  k-shot prompt (Hendrycks et al.) for questions taken round-robin over the 57 subjects,
  BBH's 3-shot answer-only prompt (Suzgun et al.) for examples round-robin over the 27
  tasks. They are the texts of the registered tasks `mmlu_<k>shot_*` and `bbh_direct_*`
  (tests/test_benchmarks.py compares them).
- Token ids: the byte vocabulary (UTF-8 bytes + 3, EOS 1; every T5 vocabulary holds
  them), or a SentencePiece `.model` with `--vocab`. A prompt longer than
  `--max_input_length` keeps its last tokens (the question and "Answer:"), on both sides.

Ours is what `ift-jax eval --init_from=HF_DIR` runs: `runs.Run.from_config` (the default
config's mesh over this host's devices) and `inference.Inference` with its
length-bucketed global batches: `score_choices` over the four letters (one encoder pass
per question), `generate` greedily. The peer is the loop a transformers user writes:
batches in file order, padded to their longest prompt; for MMLU one encoder pass per
batch, then the four letters (each followed by EOS, as ours) teacher-forced against the
encoder output repeated four times, log-probs summed; for BBH `model.generate` (greedy).

Each side runs the whole set once as warm-up (ours compiles there), then `--repeats`
timed passes; figures use the median pass. The two sides must agree, and the JSON says
how far: the same argmax letter per question (letter log-likelihoods within
`--tolerance`), the same generated tokens per BBH prompt.

Precision: fp32 on CPU; on GPU bf16 weights and compute on both sides (as decoding.py)
and larger defaults (5-shot MMLU, more examples, longer prompts).
Writes `benchmarks/results/eval_throughput_<preset>_<platform>.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

import environment
import results_file
import workers

HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = ("A", "B", "C", "D")
EOS = 1

# Per preset: T5 size and work sized for a CPU; GPU_DEFAULTS replace the work on a GPU.
PRESETS = {
    "tiny": dict(model="tiny", mmlu_examples=8, bbh_examples=4, batch=4, shots=0,
                 max_input_length=64, new_tokens=4, repeats=1),
    "small": dict(model="small", mmlu_examples=64, bbh_examples=16, batch=16, shots=0,
                  max_input_length=1024, new_tokens=16, repeats=2),
    "base": dict(model="base", mmlu_examples=32, bbh_examples=8, batch=8, shots=0,
                 max_input_length=1024, new_tokens=16, repeats=1),
}
GPU_DEFAULTS = dict(mmlu_examples=512, bbh_examples=128, batch=64, shots=5,
                    max_input_length=2048, new_tokens=32, repeats=3)


# ----------------------------------------------------------------------------
# Prompts, in plain Python (the registered tasks' texts).


def data_root() -> str:
    return os.environ.get("IFT_JAX_DATA_DIR") or os.path.join(HERE, "..", "..", "shared", "data")


def _csv_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def mmlu_question(row: dict) -> str:
    """hendrycks/test `format_example` without the answer."""
    choices = "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate(LETTERS))
    return f"{row['question']}{choices}\nAnswer:"


def mmlu_prompt(subject: str, row: dict, exemplars: Sequence[dict]) -> str:
    """The paper's k-shot prompt: header (the subject's words each after a space), the
    exemplars answered, the question."""
    words = "".join(" " + word for word in subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {words}.\n\n"
    shots = "".join(f"{mmlu_question(e)} {LETTERS[int(e['answer'])]}\n\n" for e in exemplars)
    return header + shots + mmlu_question(row)


def mmlu_examples(count: int, shots: int) -> list[tuple[str, int]]:
    """(prompt, answer index) of `count` test questions, round-robin over the subjects."""
    from ift_jax.suites import MMLU_SUBJECTS
    root = os.path.join(data_root(), "mmlu")
    tests = {s: _csv_rows(os.path.join(root, "test", f"{s}_test.csv")) for s in MMLU_SUBJECTS}
    out = []
    for i in range(count):
        subject = MMLU_SUBJECTS[i % len(MMLU_SUBJECTS)]
        row = tests[subject][(i // len(MMLU_SUBJECTS)) % len(tests[subject])]
        exemplars = (_csv_rows(os.path.join(root, "dev", f"{subject}_dev.csv"))[:shots]
                     if shots else [])
        out.append((mmlu_prompt(subject, row, exemplars), int(row["answer"])))
    return out


def bbh_direct_prefix(prompt_file_text: str) -> str:
    """The answer-only 3-shot prefix of a `cot-prompts/<task>.txt`: the description's
    first paragraph, each exemplar's question with only its final answer."""
    body = prompt_file_text.split("\n", 2)[2]  # After the canary line and "-----".
    description, *shots = body.split("\n\nQ: ")
    answered = []
    for shot in shots:
        question, _, chain = shot.partition("\nA: Let's think step by step.")
        answer = chain.split("So the answer is", 1)[1].split("\n", 1)[0].strip()
        answer = answer[:-1].rstrip() if answer.endswith(".") else answer
        answered.append(f"Q: {question}\nA: {answer}")
    return "\n\n".join([description.split("\n\n")[0], *answered])


def bbh_examples(count: int) -> list[str]:
    """Answer-only prompts of `count` examples, round-robin over the 27 tasks."""
    from ift_jax.suites import BBH_TASKS
    root = os.path.join(data_root(), "bbh")
    prefixes, examples = {}, {}
    for task in BBH_TASKS:
        with open(os.path.join(root, "cot-prompts", f"{task}.txt"), encoding="utf-8") as f:
            prefixes[task] = bbh_direct_prefix(f.read())
        with open(os.path.join(root, "tasks", f"{task}.json"), encoding="utf-8") as f:
            examples[task] = json.load(f)["examples"]
    out = []
    for i in range(count):
        task = BBH_TASKS[i % len(BBH_TASKS)]
        example = examples[task][(i // len(BBH_TASKS)) % len(examples[task])]
        out.append(f"{prefixes[task]}\n\nQ: {example['input']}\nA:")
    return out


def tokenizer(vocab: str) -> Callable[[str], list[int]]:
    """Text -> ids without EOS: bytes + 3 (seqio's ByteVocabulary) or SentencePiece."""
    if vocab == "byte":
        return lambda text: [b + 3 for b in text.encode("utf-8")]
    import sentencepiece
    processor = sentencepiece.SentencePieceProcessor(model_file=vocab)
    return lambda text: list(processor.encode(text))


def with_eos(ids: list[int], max_length: int) -> list[int]:
    """The last `max_length - 1` ids and EOS."""
    return ids[-(max_length - 1):] + [EOS]


# ----------------------------------------------------------------------------
# The two sides.


def load_ours(hf_dir: str, args) -> dict:
    """What `ift-jax eval --init_from=hf_dir` builds: the run's model on its mesh."""
    import jax
    import jax.numpy as jnp
    from ift_jax import config_files, inference, runs

    config = config_files.load(config_files.default_path())
    config.init_from, config.data.vocab = hf_dir, "byte"
    config.model.dtype = args.dtype
    run = runs.Run.from_config(config)
    params, _ = run.params(0)
    if args.dtype != "float32":  # bf16 weights as the peer's `.to(bfloat16)`.
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(args.dtype)), params)

    def runner(targets_length: int) -> inference.Inference:
        return inference.Inference(run.setup.eval_model, params, run.mesh,
                                   batch_size=args.batch, inputs_length=args.max_input_length,
                                   targets_length=targets_length)
    return {"run": run, "runner": runner}


def hf_batches(prompts: Sequence[list[int]], batch: int, device):
    """(ids, attention mask) per batch, in order, right-padded to the batch's longest."""
    import torch
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids = np.zeros((len(chunk), max(len(p) for p in chunk)), np.int64)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = p
        ids = torch.as_tensor(ids, device=device)
        yield ids, (ids != 0).long()


def hf_rank(model, prompts, letters: list[list[int]], batch: int, device) -> np.ndarray:
    """`[N, 4]` summed log-likelihoods of the letters: one encoder pass per batch."""
    import torch
    labels = torch.as_tensor(letters, device=device)  # [4, 2]: letter, EOS
    out = []
    with torch.no_grad():
        for ids, mask in hf_batches(prompts, batch, device):
            encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, choices = ids.shape[0], labels.shape[0]
            logits = model(encoder_outputs=(encoded.repeat_interleave(choices, 0),),
                           attention_mask=mask.repeat_interleave(choices, 0),
                           labels=labels.repeat(rows, 1)).logits
            log_probs = torch.log_softmax(logits.float(), -1)
            picked = log_probs.gather(-1, labels.repeat(rows, 1)[..., None])[..., 0]
            out.append(picked.sum(-1).view(rows, choices).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def hf_generate(model, prompts, new_tokens: int, batch: int, device) -> list[np.ndarray]:
    import torch
    out = []
    with torch.no_grad():
        for ids, mask in hf_batches(prompts, batch, device):
            tokens = model.generate(input_ids=ids, attention_mask=mask,
                                    max_new_tokens=new_tokens, num_beams=1, do_sample=False,
                                    decoder_start_token_id=0, eos_token_id=EOS,
                                    pad_token_id=0).cpu().numpy()[:, 1:]  # No start token.
            out += [np.pad(t, (0, new_tokens - len(t))) for t in tokens]
    return out


def generated(tokens: np.ndarray) -> int:
    """Tokens a row generated, EOS included."""
    eos = np.flatnonzero(tokens == EOS)
    return int(eos[0]) + 1 if len(eos) else int(np.count_nonzero(tokens))


def timed(fn: Callable, repeats: int) -> tuple[object, dict]:
    """`fn()` once as warm-up, then `repeats` timed calls: (last result, timing)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return result, {"first_pass_s": round(first, 3), "median_s": round(median, 4),
                    "times_s": [round(t, 4) for t in times]}


# ----------------------------------------------------------------------------
# The two benchmarks.


def bench_mmlu(ours, torch_model, device, encode, args) -> dict:
    examples = mmlu_examples(args.mmlu_examples, args.shots)
    full = [encode(p) for p, _ in examples]
    prompts = [with_eos(ids, args.max_input_length) for ids in full]
    letters = [encode(letter) + [EOS] for letter in LETTERS]
    runner = ours["runner"](targets_length=8)
    mine, ours_time = timed(lambda: np.stack(runner.score_choices(prompts, [letters] *
                                                                  len(prompts))), args.repeats)
    peer, peer_time = timed(lambda: hf_rank(torch_model, prompts, letters, args.batch, device),
                            args.repeats)
    n = len(prompts)
    for side in (ours_time, peer_time):
        side["examples_per_s"] = round(n / side["median_s"], 2)
    difference = np.abs(mine - peer) / np.maximum(np.abs(peer), 1e-6)
    return {
        "examples": n, "shots": args.shots, "batch": args.batch,
        "input_tokens": sum(len(p) for p in prompts),
        "truncated": sum(len(ids) > args.max_input_length - 1 for ids in full),
        "ours": ours_time, "hf_loop": peer_time,
        "ratio_examples_per_s": round(ours_time["examples_per_s"]
                                      / peer_time["examples_per_s"], 3),
        "agreement": {
            "same_argmax_letter": int(np.sum(mine.argmax(1) == peer.argmax(1))),
            "max_relative_difference": float(difference.max()),
            "within_tolerance": bool(difference.max() <= args.tolerance),
            "tolerance": args.tolerance,
            "accuracy_ours": float(np.mean(mine.argmax(1) == [a for _, a in examples])),
        },
    }


def bench_bbh(ours, torch_model, device, encode, args) -> dict:
    full = [encode(p) for p in bbh_examples(args.bbh_examples)]
    prompts = [with_eos(ids, args.max_input_length) for ids in full]
    runner = ours["runner"](targets_length=args.new_tokens)
    mine, ours_time = timed(lambda: runner.generate(prompts, args.new_tokens), args.repeats)
    peer, peer_time = timed(lambda: hf_generate(torch_model, prompts, args.new_tokens,
                                                args.batch, device), args.repeats)
    counts = [generated(t) for t in mine]
    for side in (ours_time, peer_time):
        side["tokens_per_s"] = round(sum(counts) / side["median_s"], 1)
    same = sum(np.array_equal(np.asarray(a)[:args.new_tokens], b) for a, b in zip(mine, peer))
    return {
        "examples": len(prompts), "batch": args.batch, "new_tokens_max": args.new_tokens,
        "generated_tokens": sum(counts), "input_tokens": sum(len(p) for p in prompts),
        "truncated": sum(len(ids) > args.max_input_length - 1 for ids in full),
        "ours": ours_time, "hf_generate": peer_time,
        "ratio_tokens_per_s": round(ours_time["tokens_per_s"] / peer_time["tokens_per_s"], 3),
        "agreement": {"same_tokens": int(same), "rows": len(prompts),
                      "same_generated_tokens": sum(generated(t) for t in peer) == sum(counts)},
    }


def _defaults(args, gpu: bool) -> None:
    preset = {**PRESETS[args.preset], **(GPU_DEFAULTS if gpu and args.preset != "tiny" else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu else "float32"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    for key in ("mmlu_examples", "bbh_examples", "batch", "shots", "max_input_length",
                "new_tokens", "repeats"):
        parser.add_argument(f"--{key}", type=int, default=None, help="default: the preset's")
    parser.add_argument("--vocab", default="byte", help="byte, or a SentencePiece .model")
    parser.add_argument("--dtype", default=None, help="default: float32 CPU, bfloat16 GPU")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="letter log-likelihoods, relative (default 1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    import jax
    import torch
    import transformers

    gpu = jax.default_backend() == "gpu"
    _defaults(args, gpu)
    if args.tolerance is None:
        args.tolerance = 1e-4 if args.dtype == "float32" else 2e-2
    machine = environment.describe(jax.default_backend())
    hf_dir = workers.write_random_checkpoint(PRESETS[args.preset]["model"], tempfile.mkdtemp())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval().to(
        device, getattr(torch, args.dtype))
    ours = load_ours(hf_dir, args)
    encode = tokenizer(args.vocab)
    try:
        mmlu = bench_mmlu(ours, torch_model, device, encode, args)
        bbh = bench_bbh(ours, torch_model, device, encode, args)
    finally:
        ours["run"].close()
        shutil.rmtree(hf_dir, ignore_errors=True)
    platform = jax.devices()[0].platform
    record = {
        "benchmark": "eval_throughput", "preset": args.preset,
        "model": PRESETS[args.preset]["model"], "vocab": args.vocab,
        "max_input_length": args.max_input_length, "repeats": args.repeats,
        "precision": f"{args.dtype} weights and compute, both sides",
        "devices": len(ours["run"].mesh.devices.flat),
        "mmlu_rank_classification": mmlu, "bbh_direct_generation": bbh,
        "machine": {**machine, "jax_device": jax.devices()[0].device_kind,
                    "load_at_end": environment.load()},
    }
    results_file.write(record, args.output_dir, f"eval_throughput_{args.preset}_{platform}",
                       "eval_throughput.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
