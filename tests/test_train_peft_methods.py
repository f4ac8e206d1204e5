"""Every PEFT method added beside LoRA trains the tiny preset end to end.

Per method: the loss falls, the frozen params are bitwise the base after
training, the trainable params moved, and the optimizer state covers only the
trainable subtree (as `test_train_peft.py` checks for LoRA).
"""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from ift_jax import hf, model_setup, partitioning, peft, runs, train
from test_train import tiny_config
from test_train_peft import base_dir, load_run  # noqa: F401  (base_dir: an HF checkpoint)

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

# What each method trains, written out here rather than taken from ift_jax.peft.
TRAINS = {
    "houlsby": lambda path: any(p.endswith("_adapter") for p in path),
    "pfeiffer": lambda path: any(p.endswith("_adapter") for p in path),
    "ia3": lambda path: path[-1] == "ia3_scale",
    "prefix": lambda path: path[0] == "prefix",
    "lora": lambda path: path[-1] in ("kernel_lora_a", "kernel_lora_b",
                                      "kernel_lora_magnitude"),
}
# The method's own keys; LoRA here is the variants: rsLoRA + DoRA on every linear layer.
METHODS = {
    "houlsby": {"adapter_width": 8},
    "pfeiffer": {"adapter_width": 8},
    "ia3": {},
    "prefix": {"prefix_length": 4, "prefix_hidden": 16},
    "lora": {"lora_rank": 4, "lora_targets": "all", "lora_use_rslora": True,
             "lora_use_dora": True},
}


def method_config(base, method):
    config = tiny_config(steps=6, log_every=1, checkpoint_every=6)
    config.init_from = base
    config.peft.method = method
    for key, value in METHODS[method].items():
        setattr(config.peft, key, value)
    config.optimizer.learning_rate = 1e-2
    return config


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_with_frozen_base_and_adapter_only_state(method, base_dir,  # noqa: F811
                                                               tmp_path):
    config = method_config(base_dir, method)
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    init = model_setup.initialize(setup, mesh)
    state, frozen = init.state, init.frozen
    start = traverse_util.flatten_dict(jax.device_get(state.params))
    trainable = peft.count_params(state.params)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1)
    assert 0 < trainable < peft.count_params(frozen) / 4
    assert moments == 2 * trainable  # AdamW: mu and nu for the trainable subtree only.
    assert all(TRAINS[method](k) for k in start)
    assert not any(TRAINS[method](k) for k in traverse_util.flatten_dict(frozen))

    workdir = str(tmp_path / method)
    train.train_and_evaluate(config, workdir)
    rows = [json.loads(r) for r in open(f"{workdir}/train_metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.05, losses

    _, params, step = load_run(workdir)
    assert step == 6
    flat = traverse_util.flatten_dict(params)
    _, base = hf.load_t5(base_dir)
    for path, value in traverse_util.flatten_dict(base).items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=str(path))
    moved = [p for p, v in start.items() if not np.array_equal(np.asarray(flat[p]), v)]
    assert len(moved) == len(start), sorted(set(start) - set(moved))
