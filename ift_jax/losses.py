"""Cross-entropy for sequence-to-sequence training, t5x-style.

- z-loss (PaLM/t5x): `z_loss * log(Z)^2` per token keeps logits from drifting.
- Label smoothing: targets `(1 - eps)` on the label, `eps / (V - 1)` elsewhere,
  with the entropy constant subtracted (as t5x does) so a perfect model still
  scores 0.
- Normalization, chosen by the caller:
  `tokens`: sum over real target tokens / number of real target tokens;
  `sequences`: each sequence's mean token loss, averaged over sequences. With
  packing a "sequence" is a segment, so packed and padded batches of the same
  examples give the same loss.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ift_jax import errors

NORMALIZATIONS = ("tokens", "sequences")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    normalization: str = "tokens"

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise errors.ConfigError(f"loss normalization {self.normalization!r}; choose one of "
                                     f"{', '.join(NORMALIZATIONS)}")


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                        label_smoothing: float = 0.0, z_loss: float = 0.0
                        ) -> tuple[jax.Array, jax.Array]:
    """Per-token (loss including z-loss, z-loss alone), both `[batch, length]` fp32."""
    logits = logits_BxLxV.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z_BxL[..., None]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    target_log_prob = jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
    loss = -confidence * target_log_prob
    if label_smoothing:
        loss = loss - low * (jnp.sum(log_probs, axis=-1) - target_log_prob)
        normalizer = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(
            low + 1e-20))
        loss = loss - normalizer
    z_term = z_loss * jnp.square(log_z_BxL)
    return loss + z_term, z_term


def sequence_weights(weights_BxL: jax.Array, segment_ids_BxL: jax.Array | None
                     ) -> jax.Array:
    """Token weights that make each sequence (segment) count once in a sum."""
    segments = (segment_ids_BxL if segment_ids_BxL is not None
                else (weights_BxL > 0).astype(jnp.int32))
    length = segments.shape[1]
    onehot_BxLxS = jax.nn.one_hot(segments, length + 1, dtype=jnp.float32)
    tokens_BxS = jnp.einsum("bl,bls->bs", weights_BxL, onehot_BxLxS)
    per_token = jnp.einsum("bls,bs->bl", onehot_BxLxS, tokens_BxS)
    return jnp.where(weights_BxL > 0, weights_BxL / jnp.maximum(per_token, 1.0), 0.0)


def _weights_and_scale(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
    """Per-token loss weights and the per-token factors of the normalized sum."""
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", (targets > 0)).astype(jnp.float32)
    if cfg.normalization == "sequences":
        return weights, sequence_weights(weights, batch.get("decoder_segment_ids"))
    return weights, weights


def loss_denominator(batch: dict, cfg: LossConfig) -> jax.Array:
    """`loss_terms(...)["denominator"]` of the whole batch, from the batch alone
    (it never depends on the logits), so a train step can divide the loss before
    differentiating it."""
    return jnp.sum(_weights_and_scale(batch, cfg)[1])


def loss_terms(logits: jax.Array, batch: dict, cfg: LossConfig) -> dict[str, jax.Array]:
    """Sums that normalize correctly across microbatches and devices.

    Returns `loss_sum`, `z_loss_sum`, `denominator` (tokens or sequences),
    `correct` and `tokens` for accuracy.
    """
    targets = batch["decoder_target_tokens"]
    weights, scale = _weights_and_scale(batch, cfg)
    token_loss, token_z = token_cross_entropy(logits, targets, cfg.label_smoothing,
                                              cfg.z_loss)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
    return {"loss_sum": jnp.sum(token_loss * scale), "z_loss_sum": jnp.sum(token_z * scale),
            "denominator": jnp.sum(scale), "correct": jnp.sum(correct),
            "tokens": jnp.sum(weights)}
