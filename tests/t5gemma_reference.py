"""Tiny random HF T5Gemma / T5Gemma 2 models built by the tests themselves (no hub).

Each case pins a combination of switches: GQA with 1, 2 and all-heads KV groups,
sliding windows shorter than the sequences (odd and even, which T5Gemma 2's
encoder splits unevenly), soft-capping on and off, tied and untied outputs,
unequal encoder and decoder (T5Gemma's 9B-2B shape), linear rope scaling and
the end-of-image token (T5Gemma 2).
"""

from __future__ import annotations

import numpy as np

S, F = "sliding_attention", "full_attention"


def _stack(**kw):
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=96, layer_types=[S, F],
                sliding_window=3, query_pre_attn_scalar=8, rms_norm_eps=1e-6)
    base.update(kw)
    return base


T5GEMMA_CASES = {
    # One KV head for four queries, window 3, both caps on and small enough to bite.
    "mqa_capped": dict(encoder=_stack(num_key_value_heads=1, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0),
                       decoder=_stack(num_key_value_heads=1, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0)),
    # 9B-2B shape: wider, deeper encoder; decoder cross-attends to 40-wide states.
    "unbalanced_gqa2": dict(
        encoder=_stack(hidden_size=40, num_hidden_layers=3, layer_types=[S, F, S],
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                       attn_logit_softcapping=None, final_logit_softcapping=None),
        decoder=_stack(hidden_size=24, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=6, sliding_window=2, attn_logit_softcapping=None,
                       final_logit_softcapping=None)),
    # All heads their own KV (MHA), untied output, rope base 500, odd pre-attn scalar.
    "mha_untied": dict(encoder=_stack(num_key_value_heads=4, rope_parameters=dict(
                           rope_type="default", rope_theta=500.0), query_pre_attn_scalar=11),
                       decoder=_stack(num_key_value_heads=4, rope_parameters=dict(
                           rope_type="default", rope_theta=500.0), query_pre_attn_scalar=11,
                           attn_logit_softcapping=5.0, final_logit_softcapping=None),
                       tie_word_embeddings=False),
    # Sliding layers only, window 1 in the decoder (each token sees itself), eps 1e-5.
    "sliding_only": dict(encoder=_stack(layer_types=[S, S], sliding_window=2, rms_norm_eps=1e-5),
                         decoder=_stack(layer_types=[S, S, S], num_hidden_layers=3,
                                        sliding_window=1, rms_norm_eps=1e-5,
                                        hidden_activation="gelu_pytorch_tanh")),
}

_LINEAR8 = {F: dict(rope_type="linear", rope_theta=10_000.0, factor=8.0),
            S: dict(rope_type="default", rope_theta=100.0)}

T5GEMMA2_CASES = {
    # MQA, linear rope scaling on global layers, final cap on; the attention cap is
    # set but transformers' T5Gemma 2 never applies it (nor do we).
    "mqa_linear_rope": dict(text=_stack(num_key_value_heads=1, rope_parameters=_LINEAR8,
                                        layer_types=[S, S, F], num_hidden_layers=3,
                                        sliding_window=4, attn_logit_softcapping=1.0,
                                        final_logit_softcapping=4.0), eoi=90),
    # Two KV groups, odd window 3 (encoder: 2 back, 1 ahead), no caps.
    "gqa2_odd_window": dict(text=_stack(num_key_value_heads=2, sliding_window=3), eoi=95),
    # MHA, global layers only, default ropes.
    "mha_full": dict(text=_stack(num_attention_heads=2, num_key_value_heads=2, head_dim=12,
                                 layer_types=[F, F], final_logit_softcapping=2.5), eoi=93),
    # Decoder deeper than the encoder, even window 2, eps 1e-5.
    "deep_decoder": dict(text=_stack(sliding_window=2, rms_norm_eps=1e-5),
                         decoder=dict(num_hidden_layers=3, layer_types=[S, F, S]), eoi=91),
}


def t5gemma_config(case: str):
    import transformers
    spec = dict(T5GEMMA_CASES[case])
    return transformers.T5GemmaConfig(encoder=spec.pop("encoder"), decoder=spec.pop("decoder"),
                                      vocab_size=96, **spec)


def t5gemma2_config(case: str):
    import transformers
    spec = T5GEMMA2_CASES[case]
    text = spec["text"]
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                     eoi_token_index=spec["eoi"]),
        decoder={**text, **spec.get("decoder", {})})


def build(variant: str, case: str, seed: int = 0, embed_scale: float = 1.0):
    """A random HF model in eval mode, eager attention, every weight non-trivial.

    `embed_scale` < 1 shrinks the token table: random tied models otherwise mostly
    repeat their last token, which makes decoding tests weak.
    """
    import torch
    import transformers
    torch.manual_seed(seed)
    if variant == "t5gemma":
        model = transformers.T5GemmaForConditionalGeneration(t5gemma_config(case))
    else:
        model = transformers.T5Gemma2ForConditionalGeneration(t5gemma2_config(case))
    model.config._attn_implementation = "eager"
    for sub in (model.config.encoder, model.config.decoder,
                getattr(model.config.encoder, "text_config", None)):
        if sub is not None:
            sub._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights and the end-of-image embedding start at zero: make them
            # differ so that mapping mistakes show.
            if "norm" in name or "eoi_embedding" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.5 * embed_scale * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    return model.eval()


def make_batch(vocab: int, seed: int = 0, batch: int = 3, enc_len: int = 9, dec_len: int = 7,
               eoi: int | None = None):
    """`(encoder tokens, decoder inputs (0 first), targets)`, padded with 0 at the ends;
    rows of different lengths, every row longer than the windows above."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, vocab, (batch, enc_len))
    targets = rng.integers(3, vocab, (batch, dec_len))
    for row, (e, t) in enumerate([(enc_len, dec_len), (enc_len - 3, dec_len - 2),
                                  (enc_len - 1, dec_len - 3)][:batch]):
        enc[row, e:] = 0
        targets[row, t - 1] = 1  # EOS
        targets[row, t:] = 0
    if eoi is not None:
        enc[0, 2] = eoi
        targets[1, 0] = eoi
    decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    return enc.astype(np.int32), decoder_inputs.astype(np.int32), targets.astype(np.int32)


def hf_forward(model, enc, dec_inputs, start: int = 2, labels=None):
    """Logits and encoder output of the torch model; decoder inputs in the house
    convention (0 first), given to HF with its start token and both padding masks."""
    import torch
    dec = np.array(dec_inputs)
    dec[:, 0] = start
    kwargs = dict(input_ids=torch.as_tensor(enc, dtype=torch.long),
                  attention_mask=torch.as_tensor(enc > 0, dtype=torch.long),
                  decoder_input_ids=torch.as_tensor(dec, dtype=torch.long),
                  decoder_attention_mask=torch.as_tensor(dec > 0, dtype=torch.long))
    if labels is not None:
        kwargs["labels"] = torch.as_tensor(np.where(labels > 0, labels, -100), dtype=torch.long)
    return model(**kwargs)
