"""Tiny random HF T5 checkpoints built by the tests themselves (no hub)."""

from __future__ import annotations

import os

import numpy as np

# Each case pins one kind of released (or odd) checkpoint.
HF_CASES = {
    # T5 1.1 / FLAN-T5: gated-gelu, separate lm_head, no output scaling.
    "v1_1": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                 num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # T5 1.0: relu, tied embeddings, decoder output scaled by d_model**-0.5.
    "v1_0": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                 num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True),
    # Uneven: d_kv*heads != d_model, more decoder than encoder layers,
    # 16 buckets with max distance 64 (sequences longer than 64 in tests).
    "uneven": dict(vocab_size=80, d_model=24, d_kv=10, d_ff=40, num_layers=1,
                   num_decoder_layers=3, num_heads=3, relative_attention_num_buckets=16,
                   relative_attention_max_distance=64, feed_forward_proj="gated-silu",
                   tie_word_embeddings=False),
}

# Cases whose files carry their own lm_head.weight (as real FLAN-T5 files do).
UNTIED = ("v1_1", "uneven")


def make_hf_checkpoint(case: str, out_dir: str, seed: int = 0, **overrides):
    """Writes a random HF T5 checkpoint of `HF_CASES[case]` with `overrides` (e.g.
    `vocab_size=384`, room for the byte vocabulary).

    Returns:
      `(built, reloaded)` torch models in eval mode: as constructed, and as
      `from_pretrained` reads the directory back (the reference to compare to).

    transformers 5.x builds every T5 tied, so for untied cases a distinct
    `lm_head.weight` is written into the safetensors file by hand, as real
    FLAN-T5 files carry one.
    """
    import safetensors.numpy
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{**HF_CASES[case], **overrides}))
    _randomize_norms(model, seed)
    model.eval()
    model.save_pretrained(out_dir)
    if case in UNTIED:
        path = os.path.join(out_dir, "model.safetensors")
        tensors = safetensors.numpy.load_file(path)
        rng = np.random.default_rng(seed + 1)
        tensors["lm_head.weight"] = rng.normal(
            0, 0.5, tensors["shared.weight"].shape).astype(np.float32)
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out_dir).eval()
    return model, reloaded


def _randomize_norms(model, seed: int) -> None:
    """Layer-norm scales start at 1.0; make them differ so mapping errors show."""
    import torch
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def hf_logits(model, enc_ids, dec_ids, enc_mask=None):
    """Logits and encoder output of the torch model for numpy int batches."""
    import torch
    enc = torch.as_tensor(np.asarray(enc_ids), dtype=torch.long)
    dec = torch.as_tensor(np.asarray(dec_ids), dtype=torch.long)
    mask = None if enc_mask is None else torch.as_tensor(np.asarray(enc_mask), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec)
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def make_batch(vocab_size, batch=2, enc_len=80, dec_len=70, enc_pad=17, dec_pad=9, seed=0):
    """(encoder ids, decoder inputs, targets); the second row padded at the end.

    The defaults give sequences longer than max_distance=64.
    """
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (batch, enc_len))
    enc[1, enc_len - enc_pad:] = 0
    targets = rng.integers(2, vocab_size, (batch, dec_len))
    targets[1, dec_len - dec_pad:] = 0
    dec_inputs = np.concatenate([np.zeros((batch, 1), int), targets[:, :-1]], axis=1)
    return enc, dec_inputs, targets

