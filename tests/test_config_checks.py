"""Config checks before any work, config diffs for resumes, comments for --help."""

import json

import pytest

from ift_jax import config_checks, config_diff, config_help, errors
from ift_jax.configs import default, flan_t5


def _config(**overrides):
    config = default.get_config()
    for key, value in overrides.items():
        node = config
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def test_every_shipped_preset_passes():
    config_checks.validate(default.get_config())
    for method in flan_t5.METHODS:
        for size in flan_t5.SIZES:
            config_checks.validate(flan_t5.get_config(f"size={size},method={method}"))
            config_checks.validate(flan_t5.get_config(f"size={size},method={method},runlocal"))


@pytest.mark.parametrize("overrides, message", [
    (dict(train__steps=-5), "train.steps=-5 must be an integer >= 0"),
    (dict(train__steps=0, optimizer__schedule="constant", eval__every=0),
     "train.steps=0 trains nothing, and with eval.every=0 or eval.at_start=False evaluates "
     "nothing either"),
    (dict(train__steps=0, optimizer__schedule="constant", eval__at_start=False),
     "train.steps=0 trains nothing"),
    (dict(train__batch_size=0), "train.batch_size=0 must be an integer >= 1"),
    (dict(peft__method="prompt", peft__prompt_init="text", peft__prompt_init_text="Hi",
          data__pack=False),
     "peft.prompt_init='text' takes the embeddings of the text's tokens from the init_from "
     "base, and this run has no init_from; set --config.init_from=DIR"),
    (dict(train__keep_checkpoints=0), "with 0 a finished run would keep no model"),
    (dict(peft__method="prompt"), "data.pack=True packs several examples into each row, and "
                                  "prompt tuning (peft.method='prompt') prepends one soft prompt "
                                  "per row; set --config.data.pack=False"),
    (dict(eval__every=-1), "eval.every=-1 must be an integer >= 0"),
    (dict(eval__num_beams=0), "eval.num_beams=0 must be an integer >= 1"),
    (dict(eval__incontext_shots="0,one"), "eval.incontext_shots='0,one' must be comma-separated"),
    (dict(optimizer__learning_rate=float("nan")), "must be a number > 0"),
    (dict(optimizer__schedule="cosine_decay"), "optimizer.schedule='cosine_decay' is not one of "
                                               "constant, linear_warmup, rsqrt, cosine"),
    (dict(optimizer__grad_clip_norm=-1.0), "optimizer.grad_clip_norm=-1.0 must be a number >= 0"),
    (dict(loss__label_smoothing=1.0), "loss.label_smoothing=1.0 must be a number in [0, 1)"),
    (dict(loss__normalization="batch"), "loss.normalization='batch' is not one of tokens"),
    (dict(peft__method="adapter"), "peft.method='adapter' is not one of full, lora"),
    (dict(peft__lora_rank=0), "peft.lora_rank=0 must be an integer >= 1"),
    (dict(model__dtype="fp8"), "model.dtype='fp8' is not one of float32, bfloat16"),
    (dict(model__preset="giant"), "model.preset='giant' is not one of tiny, small"),
    (dict(data__host_sharding="hosts"), "data.host_sharding='hosts' is not one of examples"),
    (dict(data__pipeline="grain"), "data.pipeline='grain' is not one of seqio, indexed"),
    (dict(mesh__data=0), "mesh.data=0 must be an integer >= 1, or -1"),
    (dict(mesh__data=-1), "mesh data=-1 fsdp=-1 tensor=1 has more than one axis set to -1"),
    (dict(train__batch_size=30, train__num_microbatches=4),
     "train.num_microbatches=4 does not divide train.batch_size=30"),
    (dict(mesh__data=3, mesh__fsdp=1), "(mesh.data x mesh.fsdp = 3 x 1 = 3)"),
    (dict(optimizer__schedule="linear_warmup", optimizer__warmup_steps=200),
     "optimizer.warmup_steps=200 is not below train.steps=200"),
])
def test_a_bad_value_is_one_line_naming_key_and_fix(overrides, message):
    config = _config(**overrides)
    with pytest.raises(errors.ConfigError) as raised:
        config_checks.validate(config)
    text = str(raised.value)
    assert message in text and "\n" not in text and "--config." in text, text


def test_zero_steps_evaluate_the_starting_model():
    # docs/dialogsum_recipe.md's zero-shot baseline: no training, step 0 evaluated.
    config = flan_t5.get_config("size=base,method=full,task=dialogsum")
    config.train.steps = 0
    config_checks.validate(config)


def test_fixed_data_axes_that_divide_the_batch_pass():
    config_checks.validate(_config(mesh__data=4, mesh__fsdp=2))


def test_schedules_without_a_ramp_accept_any_warmup():
    config_checks.validate(_config(optimizer__schedule="rsqrt", optimizer__warmup_steps=10_000))
    config_checks.validate(_config(optimizer__schedule="constant", optimizer__warmup_steps=500))


def test_keys_a_config_lacks_are_skipped():
    config = default.get_config()
    del config["eval"]
    config_checks.validate(config)


def test_devices_resolve_the_mesh_and_split_the_batch():
    config = _config(train__batch_size=24)
    config_checks.validate_for_devices(config, 4)  # fsdp=-1 takes the 4: divides 24.
    with pytest.raises(errors.ConfigError, match=r"= 1 x 16 = 16\); use a multiple of 16, "
                                                 r"e\.g\. --config\.train\.batch_size=32"):
        config_checks.validate_for_devices(config, 16)
    with pytest.raises(errors.ConfigError, match="the fixed axes \\(3 devices\\) do not divide"):
        config_checks.validate_for_devices(_config(mesh__tensor=3), 8)
    with pytest.raises(errors.ConfigError, match="needs 2 devices, 8 are available"):
        config_checks.validate_for_devices(_config(mesh__fsdp=2), 8)
    with pytest.raises(errors.ConfigError, match="not divisible by the 3 processes"):
        config_checks.validate_for_devices(_config(train__batch_size=32, mesh__fsdp=1), 1, 3)


# --- config diffs --------------------------------------------------------------------


def _saved(config):
    return json.loads(config.to_json_best_effort())


def test_diff_lists_changed_added_and_removed_fields():
    saved = _saved(default.get_config())
    saved["train"]["old_field"] = 1
    new = _config(train__steps=400, optimizer__learning_rate=1e-3)
    changes = config_diff.diff(saved, new)
    assert [(c.key, c.old, c.new) for c in changes] == [
        ("optimizer.learning_rate", 3e-3, 1e-3), ("train.old_field", 1, config_diff.ABSENT),
        ("train.steps", 200, 400)]
    assert config_diff.diff(saved, saved) == [] and config_diff.diff(_saved(new), new) == []


def test_a_key_added_since_the_run_started_is_no_change_at_its_default():
    saved = _saved(default.get_config())
    del saved["model"]["remat"]  # A run saved before model.remat existed.
    del saved["train"]["early_stopping"]
    defaults = default.get_config()
    assert config_diff.diff(saved, default.get_config(), defaults) == []
    changes = config_diff.diff(saved, _config(model__remat="full"), defaults)
    assert [(c.key, c.old, c.new) for c in changes] == [
        ("model.remat", config_diff.ABSENT, "full")]
    assert [c.key for c in config_diff.diff(saved, default.get_config())] == [
        "model.remat", "train.early_stopping.metric", "train.early_stopping.min_delta",
        "train.early_stopping.mode", "train.early_stopping.patience"]


def test_check_refuses_unless_each_change_is_allowed():
    saved = _saved(default.get_config())
    changes = config_diff.diff(saved, _config(train__steps=400, eval__every=50))
    with pytest.raises(errors.ConfigError) as raised:
        config_diff.check(changes, workdir="runs/a")
    assert str(raised.value) == (
        "workdir runs/a was trained with another config: eval.every 100 -> 50; train.steps "
        "200 -> 400; to resume with these changes pass "
        "--allow_config_changes=eval.every,train.steps (or use another --workdir)")
    with pytest.raises(errors.ConfigError, match="allow_config_changes=eval,train.steps"):
        config_diff.check(changes, ["eval"])
    config_diff.check(changes, ["train.steps", "eval"])  # A section allows its fields.
    assert config_diff.records(changes, 200)[1] == {"step": 200, "key": "train.steps",
                                                    "old": 200, "new": 400}


# --- comments for --help ---------------------------------------------------------------


def test_comments_follow_aliases_tuples_and_blocks(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('''
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict()  # The loop.
    # Steps to train,
    # over all hosts.
    c.train.steps = 10
    t = c.train
    t.seed, t.batch_size = 0, 8  # Both.
    if arg:
        t.seed = 1  # Only with arg.

    c.lr = 0.1
    return c
''')
    comments, order = config_help.read_comments(str(path))
    assert order == ["train", "train.steps", "train.seed", "train.batch_size", "lr"]
    assert comments["train"].inline == "The loop."
    assert comments["train.steps"].above == ["Steps to train,", "over all hosts."]
    assert comments["train.seed"].inline == comments["train.batch_size"].inline == "Both."
    assert "lr" not in comments  # A blank line separates it from any comment.


def test_prompt_tuning_on_packed_rows_is_refused_before_any_work(tmp_path, capsys):
    from ift_jax import cli
    workdir = tmp_path / "run"
    assert cli.main(["train", f"--workdir={workdir}", "--config.peft.method=prompt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ift-jax train: error: data.pack=True packs ")
    assert not workdir.exists()
