"""Autoregressive decoding of T5: greedy, beam search and sampling, with a KV cache.

What this module owns:

- `greedy`, `sample`, `beam_search`: encode once, then one `decode=True` step
  per generated token, so each (batch, lengths, settings) shape compiles
  once. The first step runs before the `jax.lax.while_loop` of the others:
  it adds the cross-attention keys and values of the encoder output to the
  cache (see `t5.Transformer.decode`), so later steps do not project it
  again, and the loop's carry keeps one structure. They return
  `[batch, max_decode_length]` tokens without the start token 0; positions
  after EOS (and after a stop) hold the pad id 0.
- `greedy_uncached`: greedy by recomputing the full forward each step. Slow;
  it exists to check the cached path.
- `filter_logits`: top-k / top-p (nucleus) filtering, as HF's warpers.
- `score_targets`: teacher-forced log-likelihood of given targets (validation
  loss, rank classification over answer choices).

The model is called by method *name* (`method="encode"` / `"decode"`): a
qwix LoRA model (`ift_jax.peft.apply_lora`) intercepts those names only, and
`method=t5.Transformer.decode` would silently skip the adapters. Any module
with a `config` of a family in `_FAMILIES` (T5, T5Gemma) and T5's `encode` /
`decode` works; T5Gemma reads the start token 0 as its own (Gemma's BOS).

Beam search follows HF transformers (5.x `GenerationMixin._beam_search` with
`early_stopping=False`, `do_sample=False`), token for token:

- A finished hypothesis scores `sum_logprobs / generated_len ** length_penalty`,
  where `generated_len` counts the generated tokens including EOS (not the
  start token). Hypotheses cut by `max_decode_length` finish the same way.
  (t5x instead divides by the brevity penalty `((5 + len) / 6) ** alpha`.)
- Each step keeps the top `2 * num_beams` continuations; those ending in EOS
  among the first `num_beams` of them may enter the finished set, the best
  `num_beams` without EOS keep running.
- A batch row stops taking new hypotheses once all `num_beams` finished slots
  are filled and the best running score divided by its *current* length
  `** length_penalty` no longer beats the worst finished score (HF's
  `early_stopping=False` heuristic).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ift_jax.models import t5, t5gemma, t5gemma_config

Array = jax.Array
PyTree = Any

# HF's "minus infinity" for beam bookkeeping; kept so that ties and sums behave alike.
_NEG = -1.0e9


# ----------------------------------------------------------------------------
# Model calls.


def _encode(model: nn.Module, params: PyTree, encoder_input_tokens: Array) -> Array:
    return model.apply({"params": params}, encoder_input_tokens, method="encode")


def _decode_step(model: nn.Module, params: PyTree, cache: PyTree, encoded: Array,
                 encoder_input_tokens: Array, tokens_B: Array) -> tuple[Array, PyTree]:
    """fp32 logits `[batch, vocab]` of one step, and the updated cache."""
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens_B[:, None],
        method="decode", decode=True, mutable=["cache"])
    return logits[:, 0].astype(jnp.float32), mutated["cache"]


# Each model family's (config type, module with `init_cache` and `select_cache_rows`).
_FAMILIES = ((t5.T5Config, t5), (t5gemma_config.T5GemmaConfig, t5gemma))


def _family(model: nn.Module):
    config = getattr(model, "config", None)
    for config_type, module in _FAMILIES:
        if isinstance(config, config_type):
            return module
    raise TypeError(f"decoding needs a T5 or T5Gemma model (a `config` attribute of type "
                    f"T5Config or T5GemmaConfig); got {type(model).__name__}")


def _zero_cache(model: nn.Module, batch: int, max_decode_length: int,
                encoder_length: int) -> PyTree:
    return _family(model).init_cache(model.config, batch, max_decode_length, encoder_length)


# ----------------------------------------------------------------------------
# Greedy and sampling: one hypothesis per row.


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf.

    Args:
      logits: `[..., vocab]`.
      top_k: keep the k largest (0: no limit).
      top_p: keep the smallest set of most likely tokens whose probability
        reaches `top_p` (the most likely token is always kept; 1.0: no limit).
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest kept logit: the last one whose preceding mass is still below top_p.
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _one_per_row(model: nn.Module, params: PyTree, encoder_input_tokens: Array, rng: Array,
                 choose: Callable[[Array, Array], Array], max_decode_length: int,
                 eos_id: int) -> tuple[Array, Array]:
    """Shared loop of greedy and sampling; `choose(logits_BxV, rng)` picks tokens."""
    batch, enc_len = encoder_input_tokens.shape
    encoded = _encode(model, params, encoder_input_tokens)
    cache = _zero_cache(model, batch, max_decode_length, enc_len)
    init = (jnp.array(0), jnp.zeros((batch,), jnp.int32), cache,
            jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.float32), rng)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_decode_length) & ~jnp.all(done)

    def body(state):
        step, last, cache, out, done, scores, rng = state
        logits, cache = _decode_step(model, params, cache, encoded, encoder_input_tokens, last)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, 0, choose(logits, key).astype(jnp.int32))
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], 1)[:, 0]
        scores = scores + jnp.where(done, 0.0, logprob)
        out = out.at[:, step].set(token)
        return step + 1, token, cache, out, done | (token == eos_id), scores, rng

    # The first step, before the loop, adds the cross-attention keys and values to the cache.
    _, _, _, out, _, scores, _ = jax.lax.while_loop(cond, body, body(init))
    return out, scores


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def greedy(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *,
           max_decode_length: int, eos_id: int = 1) -> tuple[Array, Array]:
    """Greedy decoding (HF `generate(num_beams=1, do_sample=False)`).

    Args:
      model: `t5.Transformer` or a PEFT-wrapped one (LoRA: built `for_eval`).
      params: its `params` collection (jax arrays).
      encoder_input_tokens: `[batch, length]` int, padded with 0.
      max_decode_length: number of tokens generated at most.
      eos_id: stops a row once emitted; the loop ends when every row has.

    Returns:
      `(tokens [batch, max_decode_length], scores [batch])`: tokens without
      the start token, 0 after EOS; scores sum the log-probs of the tokens
      up to and including EOS.
    """
    return _one_per_row(model, params, encoder_input_tokens, jax.random.key(0),
                        lambda logits, _: jnp.argmax(logits, axis=-1),
                        max_decode_length, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "temperature",
                                             "top_k", "top_p", "eos_id"))
def sample(model: nn.Module, params: PyTree, encoder_input_tokens: Array, rng: Array, *,
           max_decode_length: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, eos_id: int = 1) -> tuple[Array, Array]:
    """Ancestral sampling from `softmax(filter_logits(logits / temperature))`.

    Same arguments and returns as `greedy`, plus `rng` and the settings of
    `filter_logits`; `top_k=1` is greedy. Scores are log-probs under the
    unfiltered model distribution (temperature 1).
    """
    def choose(logits, key):
        filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(key, filtered, axis=-1)
    return _one_per_row(model, params, encoder_input_tokens, rng, choose,
                        max_decode_length, eos_id)


def greedy_uncached(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *,
                    max_decode_length: int, eos_id: int = 1) -> Array:
    """Greedy tokens by a full forward per step (no cache). For tests; O(L^2) work."""
    batch = encoder_input_tokens.shape[0]
    forward = jax.jit(lambda p, enc, dec: model.apply({"params": p}, enc, dec))
    out = jnp.zeros((batch, max_decode_length), jnp.int32)
    done = jnp.zeros((batch,), bool)
    for step in range(max_decode_length):
        inputs = jnp.pad(out[:, :-1], ((0, 0), (1, 0)))  # Start token 0 first.
        logits = forward(params, encoder_input_tokens, inputs)[:, step]
        token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = out.at[:, step].set(token)
        done = done | (token == eos_id)
        if bool(jnp.all(done)):
            break
    return out


# ----------------------------------------------------------------------------
# Teacher-forced scoring: validation loss and rank classification.


@functools.partial(jax.jit, static_argnames=("model",))
def score_targets(model: nn.Module, params: PyTree, encoder_input_tokens: Array,
                  targets: Array) -> tuple[Array, Array, Array]:
    """Teacher-forced log-likelihood of `targets` given the inputs, per row.

    Args:
      encoder_input_tokens: `[batch, inputs_length]`, padded with 0.
      targets: `[batch, targets_length]`, EOS-terminated, padded with 0.

    Returns:
      `(log_likelihood [batch], correct [batch], tokens [batch])`: the sum of
      the target tokens' log-probs, how many of them are the argmax, and how
      many there are (pads excluded). Rank classification scores an answer
      choice by its sum, as t5x's `rank_classification` does.
    """
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # Start token 0 first.
    logits = model.apply({"params": params}, encoder_input_tokens, decoder_inputs,
                         targets).astype(jnp.float32)
    weights = (targets > 0).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (jnp.sum(target_log_probs * weights, axis=-1), jnp.sum(correct * weights, axis=-1),
            jnp.sum(weights, axis=-1))


@functools.partial(jax.jit, static_argnames=("model",))
def score_choices(model: nn.Module, params: PyTree, encoder_input_tokens: Array,
                  choices_BxCxT: Array) -> Array:
    """Summed log-likelihood of each answer choice, `[batch, choices]`.

    Each input is encoded once; its C choices are teacher-forced against that
    encoding (the encoder output repeated C times), so rank classification
    costs one encoder pass per input, not one per choice. A choice row of
    zeros (padding) scores 0.

    Args:
      encoder_input_tokens: `[batch, inputs_length]`, padded with 0.
      choices_BxCxT: `[batch, choices, targets_length]`, each EOS-terminated,
        padded with 0.
    """
    batch, num, length = choices_BxCxT.shape
    encoded = _encode(model, params, encoder_input_tokens)
    encoded_rep = jnp.repeat(encoded, num, axis=0)
    tokens_rep = jnp.repeat(encoder_input_tokens, num, axis=0)
    targets = choices_BxCxT.reshape(batch * num, length)
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # Start token 0 first.
    logits = model.apply({"params": params}, encoded_rep, tokens_rep, decoder_inputs, targets,
                         method="decode").astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    summed = jnp.sum(target_log_probs * (targets > 0), axis=-1)
    return summed.reshape(batch, num)


# ----------------------------------------------------------------------------
# Beam search (HF's algorithm, see the module docstring).


def _gather_beams(x_BxNx: Array, index_BxM: Array) -> Array:
    """`x[b, index[b, m]]` along axis 1."""
    index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxNx.ndim - 2))
    return jnp.take_along_axis(x_BxNx, index, axis=1)


def _top_candidates(logprobs_BxKxV: Array, running: dict, step: Array, num_beams: int):
    """Top `2 * num_beams` continuations: scores, sequences and source beam."""
    batch, _, vocab = logprobs_BxKxV.shape
    total = (logprobs_BxKxV + running["scores"][:, :, None]).reshape(batch, -1)
    scores_Bx2K, index_Bx2K = jax.lax.top_k(total, 2 * num_beams)
    source_Bx2K, token_Bx2K = index_Bx2K // vocab, index_Bx2K % vocab
    seqs = _gather_beams(running["seqs"], source_Bx2K)
    seqs = jax.vmap(jax.vmap(lambda s, t: s.at[step].set(t)))(seqs, token_Bx2K)
    return scores_Bx2K, seqs, source_Bx2K, token_Bx2K


def _update_finished(finished: dict, cand_scores: Array, cand_seqs: Array, just_done: Array,
                     open_rows: Array, length: Array, length_penalty: float) -> dict:
    """Merges newly finished hypotheses into the best `num_beams` (HF's bookkeeping)."""
    num_beams = finished["scores"].shape[1]
    in_top = jnp.arange(cand_scores.shape[1]) < num_beams  # Only these may finish.
    just_done = just_done & in_top[None, :]
    scores = cand_scores / length.astype(jnp.float32) ** length_penalty
    scores = scores + (~open_rows[:, None]) * _NEG + (~just_done) * _NEG
    merged_scores = jnp.concatenate([finished["scores"], scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, num_beams)
    merged = {"scores": merged_scores,
              "seqs": jnp.concatenate([finished["seqs"], cand_seqs], axis=1),
              "done": jnp.concatenate([finished["done"], just_done], axis=1)}
    return jax.tree.map(lambda x: _gather_beams(x, best), merged)


def _can_improve(open_rows: Array, running_scores: Array, finished: dict, length: Array,
                 length_penalty: float) -> Array:
    """HF's `early_stopping=False` heuristic: can a running beam still enter the finished set?"""
    best_running = running_scores[:, :1] / length.astype(jnp.float32) ** length_penalty
    worst_finished = jnp.where(finished["done"],
                               jnp.min(finished["scores"], axis=1, keepdims=True), _NEG)
    return open_rows & jnp.any(best_running > worst_finished, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_decode_length",
                                             "length_penalty", "eos_id"))
def beam_search(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *,
                num_beams: int, max_decode_length: int, length_penalty: float = 1.0,
                eos_id: int = 1) -> tuple[Array, Array]:
    """Beam search equal to HF `generate(num_beams, length_penalty, early_stopping=False)`.

    Args:
      model, params, encoder_input_tokens, max_decode_length, eos_id: as `greedy`.
      num_beams: beams kept per input.
      length_penalty: exponent of the generated length (EOS included) that
        divides a finished hypothesis's summed log-probs; > 0 favours longer.

    Returns:
      `(tokens [batch, max_decode_length], scores [batch])`: the best
      hypothesis per input (0 after EOS) and its length-penalized score.
    """
    batch, enc_len = encoder_input_tokens.shape
    flat = batch * num_beams
    # One row per input, not per beam: its beams share the cross-attention keys and values.
    encoded = _encode(model, params, encoder_input_tokens)
    seqs = jnp.zeros((batch, num_beams, max_decode_length), jnp.int32)
    # Only beam 0 starts live, so step 0 does not pick the same token num_beams times.
    running = {"seqs": seqs,
               "scores": jnp.full((batch, num_beams), _NEG).at[:, 0].set(0.0)}
    finished = {"seqs": seqs, "scores": jnp.full((batch, num_beams), _NEG),
                "done": jnp.zeros((batch, num_beams), bool)}
    cache = _zero_cache(model, flat, max_decode_length, enc_len)
    init = (jnp.array(0), jnp.zeros((flat,), jnp.int32), cache, running, finished,
            jnp.ones((batch,), bool), jnp.array(False))

    def body(state):
        step, last, cache, running, finished, open_rows, _ = state
        logits, cache = _decode_step(model, params, cache, encoded, encoder_input_tokens,
                                     last)
        logprobs = jax.nn.log_softmax(logits).reshape(batch, num_beams, -1)
        cand_scores, cand_seqs, source, token = _top_candidates(logprobs, running, step,
                                                                num_beams)
        length = step + 1  # Generated tokens so far, this one (maybe EOS) included.
        stops = (token == eos_id) | (length >= max_decode_length)
        keep_scores = cand_scores + stops * _NEG
        _, keep = jax.lax.top_k(keep_scores, num_beams)
        running = {"seqs": _gather_beams(cand_seqs, keep),
                   "scores": _gather_beams(keep_scores, keep)}
        finished = _update_finished(finished, cand_scores, cand_seqs, stops, open_rows,
                                    length, length_penalty)
        rows = (jnp.arange(batch)[:, None] * num_beams + _gather_beams(source, keep)).reshape(-1)
        cache = _family(model).select_cache_rows(cache, rows)
        open_rows = _can_improve(open_rows, running["scores"], finished, length, length_penalty)
        stop = (length >= max_decode_length) | ~jnp.any(open_rows) | jnp.all(stops)
        last = running["seqs"][:, :, step].reshape(-1)
        return step + 1, last, cache, running, finished, open_rows, stop

    state = jax.lax.while_loop(lambda s: ~s[-1], body, body(init))  # As `_one_per_row`.
    finished = state[4]
    return finished["seqs"][:, 0], finished["scores"][:, 0]
