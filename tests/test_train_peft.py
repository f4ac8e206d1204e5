"""PEFT runs end to end: frozen weights untouched, adapter-only state, exports, init_from."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from ift_jax import (cli, export, export_folder, hf, model_setup, partitioning, peft,
                     peft_formats, runs, train)
from ift_jax.models import t5
from test_train import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = t5.get_config("tiny", vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                     num_decoder_layers=1, dropout_rate=0.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """An HF checkpoint with a byte-sized vocabulary, written by save_t5."""
    rng = np.random.default_rng(0)
    abstract = nn.unbox(t5.abstract_variables(BASE)["params"])
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), abstract)
    out = str(tmp_path_factory.mktemp("base"))
    hf.save_t5(out, BASE, params)
    return out


def load_run(workdir, step=None):
    """(setup, full params, step) of a run's checkpoint, read on one device."""
    run = runs.Run.open(workdir, mesh=partitioning.make_mesh([1, 1, 1], jax.devices()[:1]))
    try:
        params, step = run.params(step)
    finally:
        run.close()
    return run.setup, params, step


def lora_config(base_dir, method="lora"):
    config = tiny_config(steps=3)
    config.init_from = base_dir
    config.peft.method = method
    config.peft.lora_rank, config.peft.qlora_tile_size = 4, 32
    config.optimizer.learning_rate = 1e-2
    return config


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    train.train_and_evaluate(lora_config(base_dir), workdir)
    return workdir


def test_frozen_params_are_bitwise_the_base_after_training(lora_run, base_dir):
    _, base = hf.load_t5(base_dir)
    setup, params, step = load_run(lora_run)
    assert step == 3
    flat = traverse_util.flatten_dict(params)
    for path, value in traverse_util.flatten_dict(base).items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=str(path))
    lora_b = [v for k, v in flat.items() if k[-1] == "kernel_lora_b"]
    assert lora_b and any(np.abs(np.asarray(b)).max() > 0 for b in lora_b)  # B trained


def test_optimizer_state_covers_only_the_trainable_params(base_dir):
    config = lora_config(base_dir)
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    init = model_setup.initialize(setup, mesh)
    state, frozen = init.state, init.frozen
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    frozen_count = sum(x.size for x in jax.tree.leaves(frozen))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1)
    assert trainable == peft.count_params(state.params) < frozen_count / 10
    assert moments == 2 * trainable  # AdamW: mu and nu for the adapters only
    paths = ["/".join(k) for k in traverse_util.flatten_dict(state.params)]
    assert all(p.endswith(("kernel_lora_a", "kernel_lora_b")) for p in paths)


def _logits_of_run(setup, params, enc, dec):
    return np.asarray(setup.eval_model.apply({"params": params}, enc, dec))


def _batch():
    rng = np.random.default_rng(1)
    return rng.integers(3, 259, (2, 12)), np.concatenate(
        [np.zeros((2, 1), int), rng.integers(3, 259, (2, 6))], axis=1)


def test_export_hf_loads_in_transformers_with_the_same_logits(lora_run, tmp_path):
    export.export_hf(lora_run, str(tmp_path))
    setup, params, _ = load_run(lora_run)
    enc, dec = _batch()
    ours = _logits_of_run(setup, params, enc, dec)
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(enc), decoder_input_ids=torch.as_tensor(dec)
                    ).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_export_peft_loads_onto_the_base_with_the_same_logits(lora_run, base_dir, tmp_path):
    import peft as hf_peft
    export.export_peft(lora_run, str(tmp_path))
    setup, params, _ = load_run(lora_run)
    enc, dec = _batch()
    ours = _logits_of_run(setup, params, enc, dec)
    base = transformers.T5ForConditionalGeneration.from_pretrained(base_dir)
    model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(enc), decoder_input_ids=torch.as_tensor(dec)
                    ).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_init_from_a_workdir_starts_from_its_merged_model(lora_run, tmp_path):
    config = tiny_config(steps=2)
    config.init_from = lora_run
    setup = runs.build_setup(config)
    run_setup, run_params, _ = load_run(lora_run)
    merged = runs.plain_params(run_setup, run_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 setup.init_params, jax.device_get(merged))


def test_qlora_run_trains_and_keeps_nf4_base(base_dir, tmp_path):
    config = lora_config(base_dir, method="qlora")
    config.train.steps = 6
    config.train.log_every = 3
    last = train.train_and_evaluate(config, str(tmp_path))
    rows = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
    first = float(__import__("json").loads(rows[0])["loss"])
    assert last["loss"] < first
    info = (tmp_path / "model-info.txt").read_text()
    assert "method: qlora" in info


def test_adapters_of_two_runs_switch_on_one_loaded_base(lora_run, base_dir, tmp_path):
    second = tmp_path / "second"
    config = lora_config(base_dir)
    config.train.seed, config.optimizer.learning_rate = 7, 3e-2
    train.train_and_evaluate(config, str(second))
    base_config, base = hf.load_t5(base_dir)
    base = jax.tree.map(jax.numpy.asarray, base)  # loaded once
    enc, dec = _batch()
    outputs = []
    for run in (lora_run, str(second)):
        export.export_peft(run, str(tmp_path / "adapter"), overwrite=True)
        adapter = peft_formats.load_peft(str(tmp_path / "adapter"), base_config)
        _, model = peft.build_models(base_config, adapter.method)
        swapped = model.apply({"params": adapter.apply_to(base)}, enc, dec)
        setup, params, _ = load_run(run)
        np.testing.assert_allclose(swapped, _logits_of_run(setup, params, enc, dec),
                                   rtol=1e-5, atol=1e-5)
        outputs.append(np.asarray(swapped))
    assert not np.allclose(outputs[0], outputs[1])  # really two different adapters


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_init_from_skips_the_random_init_and_gives_the_base_weights(base_dir, method,
                                                                    monkeypatch):
    # Compiling the random init costs more than a train step's compile; with init_from
    # every base weight is loaded, so no random values may be made (or needed).
    config = lora_config(base_dir, method)
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    calls = []
    real = partitioning.sharded_init
    monkeypatch.setattr(partitioning, "sharded_init",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    init = model_setup.initialize(setup, mesh)
    state, frozen = init.state, init.frozen
    assert not calls
    _, base = hf.load_t5(base_dir)
    flat = traverse_util.flatten_dict(model_setup.merge(state.params, frozen))
    for path, value in traverse_util.flatten_dict(base).items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=str(path))

    config.init_from = ""  # From scratch: random values are made.
    setup = model_setup.build(config)
    model_setup.initialize(setup, mesh)
    assert calls == [1]


# ----------------------------------------------------------------------------
# Export folders: looked at before anything is read, written aside, marked finished.


def _tree(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def _refused(argv, capsys):
    """(exit status, stderr lines) of a command that must print nothing on stdout."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert out == ""
    return code, err.strip().splitlines()


def test_export_refuses_a_folder_holding_anything_before_reading_the_run(
        lora_run, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "spiece.model").write_bytes(b"another model's vocabulary")
    before = _tree(other)
    monkeypatch.setattr(runs.Run, "open", lambda *a, **k: pytest.fail("checkpoint read"))
    code, lines = _refused(["export", f"--workdir={lora_run}", "--format=hf",
                            f"--output={other}"], capsys)
    assert code == 2 and lines == [
        f"ift-jax export: error: --output={other} already holds an export (config.json, "
        f"spiece.model); pass --overwrite to replace it, or give an empty or new folder"]
    run_before = sorted(os.listdir(lora_run))
    code, lines = _refused(["export", f"--workdir={lora_run}", "--format=peft",
                            f"--output={lora_run}", "--overwrite"], capsys)
    assert code == 2 and len(lines) == 1 and "holds checkpoints/" in lines[0]
    assert "nothing there is replaced, even with --overwrite" in lines[0]
    assert _tree(other) == before and sorted(os.listdir(lora_run)) == run_before
    code, lines = _refused(["export", f"--workdir={lora_run}", "--format=hf", "--step=7",
                            f"--output={tmp_path / 'new'}"], capsys)
    assert code == 2 and lines == [f"ift-jax export: error: {lora_run} has no checkpoint 7; "
                                   f"steps: [2, 3]"]
    prompt_run = tmp_path / "prompt_run"  # Its method decides the formats: config.json only.
    prompt_run.mkdir()
    saved = json.loads(open(os.path.join(lora_run, "config.json")).read())
    saved["peft"]["method"] = "prompt"
    (prompt_run / "config.json").write_text(json.dumps(saved))
    code, lines = _refused(["export", f"--workdir={prompt_run}", "--format=hf",
                            f"--output={tmp_path / 'new'}"], capsys)
    assert code == 2 and len(lines) == 1 and "method 'prompt' cannot be merged" in lines[0]
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_an_export_whole_and_marks_it_finished(lora_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "spiece.model"):
        (out / name).write_bytes(b"an older export of another model")
    export.export_hf(lora_run, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", export_folder.MARKER,
                                       "model.safetensors"]  # Byte vocabulary: no spiece.
    marker = json.loads((out / export_folder.MARKER).read_text())
    assert marker["step"] == 3 and marker["format"] == "hf" and marker["files"] == {
        name: os.path.getsize(out / name) for name in ("config.json", "model.safetensors")}
    hf.load_t5(str(out))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_an_interrupted_export_leaves_the_old_one_and_loaders_refuse_unfinished_ones(
        lora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    export.export_peft(lora_run, str(out))
    finished = _tree(out)
    real = peft_formats.save_peft

    def killed_after_writing(folder, *args):
        real(folder, *args)
        raise KeyboardInterrupt  # Stopped before the marker and the rename.

    monkeypatch.setattr(peft_formats, "save_peft", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        export.export_peft(lora_run, str(out), step=2, overwrite=True)
    assert _tree(out) == finished
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    # What a SIGKILL leaves: the temporary folder of a process that is gone.
    left = tmp_path / f".adapter.export-{_dead_pid()}.tmp"
    os.rename(out, left)
    with pytest.raises(peft_formats.CheckpointError, match="did not finish"):
        peft_formats.load_peft(str(left), BASE)
    os.rename(left, out)
    truncated = out / peft_formats.ADAPTER_SAFETENSORS
    truncated.write_bytes(truncated.read_bytes()[:100])  # A copy or write cut short.
    with pytest.raises(peft_formats.CheckpointError, match=f"{out} is an unfinished or "
                       f"damaged export: {peft_formats.ADAPTER_SAFETENSORS} is 100 bytes"):
        peft_formats.load_peft(str(out), BASE)
    (tmp_path / "rows.jsonl").write_text('{"inputs": "hello"}\n')
    capsys.readouterr()
    code, lines = _refused(["predict", f"--init_from={lora_run}", f"--adapter=a={out}",
                            f"--input={tmp_path / 'rows.jsonl'}"], capsys)
    assert code == 2 and len(lines) == 1 and "unfinished or damaged export" in lines[0]

    os.rename(out, left)  # The next export to the same folder clears the dead one's leftovers.
    monkeypatch.setattr(peft_formats, "save_peft", real)
    export.export_peft(lora_run, str(out))
    assert not left.exists() and peft_formats.load_peft(str(out), BASE)


# ----------------------------------------------------------------------------
# init_from an HF PEFT adapter: trained further from the model it computes.


TINY_FLAGS = ["--config.data.mixture=synthetic_sentiment", "--config.data.inputs_length=96",
              "--config.data.targets_length=16", "--config.train.batch_size=8",
              "--config.train.steps=2", "--config.train.checkpoint_every=2",
              "--config.eval.every=0", "--config.optimizer.warmup_steps=0"]


def test_init_from_an_adapter_trains_further_from_the_adapted_model(lora_run, tmp_path):
    adapter_dir = tmp_path / "adapter"
    export.export_peft(lora_run, str(adapter_dir))
    config = tiny_config(steps=2)
    config.init_from = str(adapter_dir)
    setup = runs.build_setup(config)
    run_setup, run_params, _ = load_run(lora_run)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-6, atol=1e-6),
                 setup.init_params, jax.device_get(runs.plain_params(run_setup, run_params)))
    workdir = tmp_path / "further"
    assert cli.main(["train", f"--workdir={workdir}", f"--config.init_from={adapter_dir}",
                     *TINY_FLAGS]) == 0
    assert json.loads((workdir / "summary.json").read_text())["finished"]


def test_init_from_an_adapter_that_cannot_merge_is_refused_before_anything_is_written(
        base_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt_adapter"
    prompt.mkdir()
    (prompt / peft_formats.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": base_dir}))
    workdir = tmp_path / "run"
    assert cli.main(["train", f"--workdir={workdir}", f"--config.init_from={prompt}",
                     *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an HF PEFT PROMPT_TUNING adapter, which does not merge" in err[0]
    assert not workdir.exists()


def test_config_json_records_the_architecture_init_from_replaced(base_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    flags = ["train", f"--workdir={workdir}", f"--config.init_from={base_dir}", *TINY_FLAGS]
    assert cli.main(flags) == 0  # configs/default.py's model: d_model 128, 2 layers, ...
    saved = json.loads((workdir / "config.json").read_text())
    assert {k: saved["model"][k] for k in ("d_model", "d_ff", "d_kv", "num_layers")} == {
        "d_model": BASE.d_model, "d_ff": BASE.d_ff, "d_kv": BASE.d_kv, "num_layers": 1}
    assert saved[runs.REPLACED] == {"init_from": base_dir, "config_values": {
        "d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2}}
    assert runs.read_config(str(workdir)).model.d_model == BASE.d_model
    assert cli.main(flags) == 0  # The same command again: resumes, no "another config".
    assert "another config" not in capsys.readouterr().err


def test_a_refused_export_process_prints_only_its_one_line(lora_run, tmp_path):
    # A process of its own: what the user sees, native stderr and library loggers included.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "ift_jax", "export", f"--workdir={lora_run}",
                             "--format=hf", f"--output={taken}"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"ift-jax export: error: --output={taken} already holds an export (config.json); pass "
        f"--overwrite to replace it, or give an empty or new folder"]
