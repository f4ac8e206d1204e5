"""`model_setup.training_flops_per_token`: the FLOPs each method executes (for MFU)."""

import pytest

from ift_jax.configs import default
from ift_jax import model_setup
from ift_jax.models import t5

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

IN, TGT = 24, 10


def config(method, **peft):
    c = default.get_config()
    c.model.d_model, c.model.d_ff, c.model.d_kv, c.model.num_heads = 32, 48, 8, 2
    c.model.num_layers, c.model.num_decoder_layers = 2, 3  # Uneven: stacks not mixed up.
    c.data.inputs_length, c.data.targets_length = IN, TGT
    c.peft.method = method
    for key, value in peft.items():
        setattr(c.peft, key, value)
    return c


def six_n(c: t5.T5Config, enc: int, tgt: int) -> float:
    """6·(matmul weights per example) + attention, written out per layer type.

    Cross-attention key/value project the encoder output: `enc` positions.
    """
    inner, mlp = c.num_heads * c.d_kv, (3 if c.is_gated else 2) * c.d_model * c.d_ff
    enc_layer, dec_layer = 4 * c.d_model * inner + mlp, 6 * c.d_model * inner + mlp
    weights = (enc * c.num_layers * enc_layer + tgt * c.num_decoder_layers * dec_layer
               + enc * c.num_decoder_layers * 2 * c.d_model * inner
               + tgt * c.d_model * c.vocab_size)
    return 6 * weights + attention(c, enc, tgt)


def attention(c: t5.T5Config, enc: int, tgt: int) -> float:
    """Score and value products, 6 FLOPs per multiply-add whatever trains."""
    inner = c.num_heads * c.d_kv
    return 6 * 2 * inner * (c.num_layers * enc ** 2 + c.num_decoder_layers * tgt * (tgt + enc))


def frozen_weights(c: t5.T5Config, enc: int, tgt: int) -> float:
    return (six_n(c, enc, tgt) - attention(c, enc, tgt)) / 6


@pytest.mark.parametrize("tied", [False, True])
def test_full_fine_tuning_counts_6n_per_input_target_token(tied):
    c = t5.get_config("tiny", tie_word_embeddings=tied, num_decoder_layers=3)
    got = model_setup.training_flops_per_token(c, IN, TGT)
    assert got == pytest.approx(six_n(c, IN, TGT) / (IN + TGT), rel=1e-12)
    setup = model_setup.build(config("full"))
    assert setup.flops_per_token == pytest.approx(
        six_n(setup.t5_config, IN, TGT) / (IN + TGT), rel=1e-12)


def test_lora_drops_frozen_weight_grads_and_adds_its_adapters():
    full = model_setup.build(config("full"))
    c, rank = full.t5_config, 4
    inner = c.num_heads * c.d_kv
    # q and v of every attention block: [d_model, r] + [r, inner] each; the
    # cross-attention value runs over the encoder positions, its query over targets.
    positions = (2 * c.num_layers * IN + 3 * c.num_decoder_layers * TGT
                 + c.num_decoder_layers * IN)
    adapters = 6 * rank * (c.d_model + inner) * positions
    expected = (six_n(c, IN, TGT) - 2 * frozen_weights(c, IN, TGT) + adapters) / (IN + TGT)
    for method in ("lora", "qlora"):
        setup = model_setup.build(config(method, lora_rank=rank, qlora_tile_size=8))
        assert setup.flops_per_token == pytest.approx(expected, rel=1e-12), method
    assert expected < full.flops_per_token


def test_prompt_tuning_runs_the_encoder_over_the_prompt_without_weight_grads():
    c = model_setup.build(config("full")).t5_config
    counts = []
    for length in (5, 20):
        setup = model_setup.build(config("prompt", prompt_length=length))
        enc = IN + length
        expected = (six_n(c, enc, TGT) - 2 * frozen_weights(c, enc, TGT)) / (IN + TGT)
        assert setup.flops_per_token == pytest.approx(expected, rel=1e-12)
        counts.append(setup.flops_per_token)
    assert counts[0] < counts[1]


def test_trainable_regex_counts_weight_grads_only_where_params_train():
    setup = model_setup.build(config("full", trainable_regex=".*layer_norm/scale"))
    c = setup.t5_config
    expected = (six_n(c, IN, TGT) - 2 * frozen_weights(c, IN, TGT)) / (IN + TGT)
    assert setup.flops_per_token == pytest.approx(expected, rel=1e-12)
