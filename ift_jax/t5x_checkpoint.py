"""t5x checkpoints in: FLAN-T5's released checkpoints (any t5x T5 1.0 / 1.1) as our params.

`load_t5x(path) -> (T5Config, params)` reads the layout written by t5x's
`checkpoints.Checkpointer` (t5x/checkpoints.py, checkpoint format `VERSION = 3`,
used since 2021-06-10 and by every FLAN-T5 release; format 2 is read too unless
it stored bfloat16 as uint16, which t5x itself refuses):

    <model_dir>/checkpoint_<step>/checkpoint    msgpack index (flax.serialization)
    <model_dir>/checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/
                                                 one zarr array per partitioned param
    ...  state.param_states.<param path>.v_row/  optimizer state (never read here)

The index is `{"version": 3, "optimizer": {"target": <params>, "state": <optimizer
state>}}`. Each array leaf is either the array itself (what t5x did not
partition) or a TensorStore spec (`{"driver": "zarr", "kvstore": {"driver":
"file" | "gfile" | "gcs", "path": "target.<dotted param path>"}, "metadata":
{...}}`, before tensorstore 0.1.14 with the path at the top level) relative to
the checkpoint folder. Only `target` (the params) is read. Newer t5x runs that
save through orbax (`_optimizer` keys with `PLACEHOLDER://` leaves) and mesh-tf
TF checkpoints are other layouts and refused by name. Local folders only: copy
a bucket's checkpoint first (`gcloud storage cp -r gs://.../checkpoint_N .`).

Param names are t5x's own (ours follow them); t5x stores attention kernels
flattened, `[embed, heads * kv]` and `[heads * kv, embed]`, reshaped here to
`[embed, heads, kv]` / `[heads, kv, embed]`. The architecture comes from the
shapes: vocabulary and d_model from the embedding, heads and buckets from
`relpos_bias/rel_embedding [heads, buckets]`, d_kv = the query width / heads,
d_ff and v1.0 (`mlp/wi`, relu) vs v1.1 (`mlp/wi_0` + `wi_1`, gated-gelu) from the
MLP, layers by counting, tied vs untied from `decoder/logits_dense` (t5x's tied
T5 1.0 also scales the decoder output by d_model**-0.5). What shapes cannot
show takes t5x's defaults (relative_attention_max_distance 128, layer-norm
epsilon 1e-6, the gated activation gelu) and can be overridden.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Optional

import flax.linen as nn
import msgpack
import numpy as np
import tensorstore as ts
from flax import serialization, traverse_util

from ift_jax import declared_sizes
from ift_jax.errors import CheckpointError
from ift_jax.models import t5

INDEX = "checkpoint"
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
# Kernels t5x stores flattened (DenseGeneral keeps its param 2-D).
_FLAT_ATTENTION = re.compile(
    r"(attention|self_attention|encoder_decoder_attention)/(query|key|value|out)/kernel$")


def find_index(path: str) -> str:
    """The msgpack index of `path`: the file itself, `<dir>/checkpoint`,
    `<dir>/state/checkpoint`, or the latest `<dir>/checkpoint_<step>/checkpoint`."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"t5x checkpoint {path}: no such file or directory")
    for candidate in (os.path.join(path, INDEX), os.path.join(path, "state", INDEX)):
        if os.path.isfile(candidate):
            return candidate
    steps = [int(m.group(1)) for name in os.listdir(path)
             if (m := _STEP_DIR.fullmatch(name))]
    if steps:
        return find_index(os.path.join(path, f"checkpoint_{max(steps)}"))
    raise CheckpointError(
        f"{path} is not a t5x checkpoint: expected a '{INDEX}' file (msgpack index) or "
        f"checkpoint_<step>/ folders (found: {', '.join(sorted(os.listdir(path))) or 'nothing'})")


def is_t5x_checkpoint(path: str) -> bool:
    """Whether `path` looks like a t5x checkpoint (for dispatching `init_from`)."""
    try:
        find_index(path)
        return True
    except CheckpointError:
        return False


def _read_index(index: str) -> dict:
    with open(index, "rb") as f:
        data = f.read()
    try:
        # Plain msgpack first: how deep it nests, before flax's restore recurses into it.
        depth = declared_sizes.nesting_depth(msgpack.unpackb(data, raw=False,
                                                             strict_map_key=False))
        if depth <= declared_sizes.MAX_NESTING:
            contents = serialization.msgpack_restore(data)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CheckpointError(f"{index} is not a t5x msgpack checkpoint index "
                              f"({reason})") from None
    if depth > declared_sizes.MAX_NESTING:
        raise CheckpointError(f"{index} nests deeper than {declared_sizes.MAX_NESTING} levels; "
                              f"a t5x index nests about 10: not a t5x checkpoint")
    if not isinstance(contents, dict):
        raise CheckpointError(f"{index} is not a t5x checkpoint index (no dict inside)")
    if "_optimizer" in contents:
        raise CheckpointError(f"{index} was written through orbax (t5x's newer "
                              f"OrbaxCheckpointManager); only the msgpack + TensorStore "
                              f"layout of t5x's Checkpointer is read")
    version = contents.get("version", 0)
    if version not in (2, 3) or "target" not in contents.get("optimizer", {}):
        raise CheckpointError(f"{index}: t5x checkpoint version {version} without "
                              f"optimizer/target; versions 2 and 3 are read")
    return contents


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and "driver" in value and (
        "kvstore" in value or "path" in value)


def _flatten_target(tree: dict, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not _is_spec(value):
            flat.update(_flatten_target(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _local_spec(spec: dict, folder: str, name: str) -> dict:
    """The spec with its relative path made absolute under `folder`, read with the
    `file` driver; metadata reduced to the shape (chunks and compressor come from
    the array's own .zarray), as t5x's `_read_ts` does."""
    spec = copy.deepcopy(spec)
    kvstore = spec.get("kvstore")
    relative = (kvstore.get("path") if isinstance(kvstore, dict) else None) or spec.get("path")
    if relative is None:
        raise CheckpointError(f"{folder}: param {name} has a TensorStore spec without a "
                              f"path: {spec}")
    spec["kvstore"] = {"driver": "file", "path": os.path.join(folder, relative)}
    spec.pop("path", None)
    metadata = spec.get("metadata", {})
    for key in ("chunks", "compressor"):
        metadata.pop(key, None)
    if spec.get("dtype") == "uint16" or metadata.get("dtype") == "<u2":
        raise CheckpointError(f"{folder}: param {name} is stored as uint16 (t5x format 2 "
                              f"bfloat16); t5x refuses these too: re-save with t5x >= 2021-06")
    return spec


def _open_array(leaf: Any, folder: str, name: str) -> Any:
    """The leaf itself (an array the index holds), or its TensorStore opened: its
    metadata read (shape, dtype), none of its data."""
    if not _is_spec(leaf):
        return np.asarray(leaf)
    spec = _local_spec(leaf, folder, name)
    try:
        return ts.open(spec, open=True, read=True).result()
    except ValueError as e:  # TensorStore's error for missing or damaged arrays.
        raise CheckpointError(f"{folder}: cannot read param {name} from "
                              f"{spec['kvstore']['path']}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_declared(opened: dict[str, Any], index: str) -> None:
    """The arrays' declared sizes, before any is read (`declared_sizes`): every axis
    within the largest T5 size, and the whole read (each array, and its float32 copy)
    within the host's available memory."""
    largest = max(declared_sizes.LIMITS.values())
    needed = 0
    for name, array in opened.items():
        shape = tuple(int(n) for n in array.shape)
        if any(n > largest for n in shape):
            raise CheckpointError(f"{index}: param {name} declares shape {shape}, past any "
                                  f"T5's sizes (at most {largest:,} per axis)")
        size = int(np.prod(shape, dtype=np.float64))
        itemsize = np.dtype(array.dtype.numpy_dtype if hasattr(array.dtype, "numpy_dtype")
                            else array.dtype).itemsize
        needed += size * (4 + itemsize)
    declared_sizes.check_memory(needed, f"reading its {len(opened)} params (as float32)",
                                index)


def _read_array(opened: Any, folder: str, name: str) -> np.ndarray:
    if isinstance(opened, np.ndarray):
        return opened
    try:
        return np.asarray(opened.read().result())
    except ValueError as e:
        raise CheckpointError(f"{folder}: cannot read param {name} from "
                              f"{opened.kvstore.path}: {_first_line(e)}") from None


def read_target(path: str) -> dict[str, np.ndarray]:
    """Every param under `optimizer/target` as `{"encoder/layers_0/...": array}`
    (float32; the optimizer state is never read). Every array's declared shape is
    checked before any is read."""
    index = find_index(path)
    folder = os.path.dirname(os.path.abspath(index))
    target = _flatten_target(_read_index(index)["optimizer"]["target"])
    opened = {"/".join(key): _open_array(leaf, folder, "/".join(key))
              for key, leaf in target.items()}
    _check_declared(opened, index)
    return {name: _read_array(array, folder, name).astype(np.float32)
            for name, array in opened.items()}


def _count_layers(shapes: dict[str, tuple], stack: str, attention: str) -> int:
    count = 0
    while f"{stack}/layers_{count}/{attention}/query/kernel" in shapes:
        count += 1
    return count


def _required(shapes: dict[str, tuple], name: str, where: str) -> tuple:
    if name not in shapes:
        raise CheckpointError(f"{where} has no param {name}; not a t5x T5 (encoder-decoder) "
                              f"checkpoint")
    return shapes[name]


def infer_config(shapes: dict[str, tuple], where: str = "checkpoint",
                 **overrides) -> t5.T5Config:
    """The `T5Config` the param shapes imply (see the module docstring); `overrides`
    set fields the shapes cannot show or replace inferred ones."""
    vocab, d_model = _required(shapes, "token_embedder/embedding", where)
    heads, buckets = _required(shapes, "encoder/relpos_bias/rel_embedding", where)
    inner = _required(shapes, "encoder/layers_0/attention/query/kernel", where)[1]
    if inner % heads:
        raise CheckpointError(f"{where}: attention width {inner} is not a multiple of the "
                              f"{heads} heads of relpos_bias/rel_embedding")
    gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
    d_ff = _required(shapes, f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel",
                     where)[1]
    tied = "decoder/logits_dense/kernel" not in shapes
    values = dict(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                  num_layers=_count_layers(shapes, "encoder", "attention"),
                  num_decoder_layers=_count_layers(shapes, "decoder", "self_attention"),
                  num_heads=heads, relative_attention_num_buckets=buckets,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                  feed_forward_proj="gated-gelu" if gated else "relu",
                  tie_word_embeddings=tied, scale_decoder_outputs=tied)
    values.update(overrides)
    try:
        return t5.T5Config(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def to_params(arrays: dict[str, np.ndarray], config: t5.T5Config,
              where: str = "checkpoint") -> dict:
    """t5x arrays -> our param tree for `config`; every name and shape checked."""
    expected = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(
        nn.unbox(t5.abstract_variables(config)["params"])).items()}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the inferred {config}: " + "; ".join(filter(None, [
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(unexpected)}" if unexpected else ""])))
    flat = {}
    for name, shape in expected.items():
        value = arrays[name]
        if value.shape != shape:
            if not (_FLAT_ATTENTION.search(name) and value.size == int(np.prod(shape))):
                raise CheckpointError(f"{where}: param {name} has shape {value.shape}, the "
                                      f"inferred config needs {shape}")
            value = value.reshape(shape)  # t5x's flattened heads x kv, row-major.
        flat[tuple(name.split("/"))] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)


def load_t5x(path: str, **config_overrides) -> tuple[t5.T5Config, dict]:
    """Loads the params of a t5x checkpoint (see the module docstring).

    Args:
      path: a `checkpoint_<step>` folder, its `checkpoint` file, or a t5x model
        dir (its latest `checkpoint_<step>`).
      **config_overrides: `T5Config` fields, e.g. `dtype=jnp.bfloat16`,
        `dropout_rate=0.0`, or `feed_forward_proj="gated-silu"`.

    Returns:
      `(config, params)`: the params collection of `Transformer(config)` as host
      float32 numpy arrays.

    Raises:
      CheckpointError: one line naming what is wrong.
    """
    index = find_index(path)
    arrays = read_target(index)
    config = infer_config({k: v.shape for k, v in arrays.items()}, index, **config_overrides)
    return config, to_params(arrays, config, index)


def checkpoint_step(path: str) -> Optional[int]:
    """The step of the checkpoint `load_t5x(path)` reads (from `checkpoint_<step>`), if named."""
    match = _STEP_DIR.fullmatch(os.path.basename(os.path.dirname(find_index(path))))
    return int(match.group(1)) if match else None
