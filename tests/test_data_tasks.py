"""Registered tasks on the real datasets in ../shared/data, and the SeqIO pipeline."""

import json

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401  (registers tasks and mixtures)
from ift_jax.data import instructions, pipeline, sources
from ift_jax.data.templates import PatternTemplate
from ift_jax.tasks import mixtures, t0

LENGTHS = {"inputs": 512, "targets": 128}

# One task per dataset family, with the split they are checked on.
FAMILY_TASKS = [
    ("dialogsum", "validation"), ("samsum", "test"), ("amazon_reviews_rating", "test"),
    ("amazon_reviews_generate", "train"), ("amazon_reviews_headline", "validation"),
    ("wnut17", "test"), ("multi30k_en_de", "test"), ("synthetic_support_summary", "train"),
    ("synthetic_sentiment", "validation"), ("synthetic_extraction", "test"),
]


def first_example(name, split):
    task = seqio.get_mixture_or_task(name)
    dataset = task.get_dataset(LENGTHS, split=split, shuffle=False)
    return next(dataset.as_numpy_iterator())


@pytest.mark.parametrize("name,split", FAMILY_TASKS)
def test_task_yields_tokenized_examples_from_real_data(name, split):
    example = first_example(name, split)
    assert example["inputs_pretokenized"] and example["targets_pretokenized"]
    assert example["inputs"][-1] == 1 or len(example["inputs"]) == LENGTHS["inputs"]
    assert example["targets"][-1] == 1 or len(example["targets"]) == LENGTHS["targets"]


def test_every_t0_file_is_a_task_with_examples():
    for stem in t0.FILES:
        source = seqio.get_mixture_or_task(t0.task_name(stem)).source
        train = source.rendered("train")
        assert len(train["inputs"]) > 50, stem
        assert not any(t.endswith("<|endoftext|>") for t in train["targets"]), stem


def test_dialogsum_sizes_and_three_test_references():
    task = seqio.get_mixture_or_task("dialogsum")
    assert task.num_input_examples("validation") == 500
    assert task.num_input_examples("train") == 12460
    test = task.source.rendered("test")
    references = [json.loads(r) for r in test["references"]]
    assert len(references) == 500 and all(len(r) == 3 for r in references)
    assert test["targets"][0] == references[0][0]


def test_postprocess_gives_references_for_targets_and_stripped_predictions():
    example = first_example("dialogsum", "test")
    refs = instructions.postprocess(example["targets_pretokenized"], example=example,
                                    is_target=True)
    assert len(refs) == 3
    assert instructions.postprocess(b"  a summary \n") == "a summary"


def test_random_template_choice_is_deterministic_and_uses_every_template():
    source = seqio.get_mixture_or_task("samsum").source
    fresh = instructions.InstructionDataSource("samsum_again", source.records,
                                               source.templates, source.rendering)
    first, second = source.rendered("validation"), fresh.rendered("validation")
    assert first["template"] == second["template"]
    assert set(first["template"]) == {t.name for t in source.templates}
    reseeded = instructions.InstructionDataSource(
        "samsum_seed1", source.records, source.templates, instructions.Rendering(seed=1))
    assert reseeded.rendered("validation")["template"] != first["template"]


def test_all_templates_variant_renders_each_example_with_each_template():
    plain = seqio.get_mixture_or_task("samsum").source
    expanded = seqio.get_mixture_or_task("samsum_all_templates").source
    n = len(plain.rendered("test")["inputs"])
    assert expanded.num_input_examples("test") == n * 7
    columns = expanded.rendered("test")
    first_id = columns["id"][0]
    used = [t for i, t in zip(columns["id"], columns["template"]) if i == first_id]
    assert sorted(used) == sorted(t.name for t in plain.templates)


def test_few_shot_prompt_holds_k_train_exemplars_but_never_the_example():
    source = seqio.get_mixture_or_task("dialogsum").source
    few = instructions.InstructionDataSource(
        "dialogsum_2shot", source.records, source.templates,
        instructions.Rendering(num_shots=2))
    train_records = source.records.load("train")
    train_targets = {r["summary"].strip() for r in train_records}
    columns = few.rendered("train")
    for i in range(0, 12000, 600):
        inputs, record = columns["inputs"][i], train_records[i]
        template = next(t for t in source.templates if t.name == columns["template"][i])
        own_inputs, _ = template.render(record)
        assert inputs.endswith(own_inputs.strip())
        assert inputs.count(record["dialogue"]) == 1  # not among its own exemplars
        prompt_lines = {line.strip() for line in inputs.split("\n")}
        assert len(prompt_lines & train_targets) == 2  # the two exemplars' targets


def test_hash_split_is_disjoint_and_covers_the_single_file():
    records = seqio.get_mixture_or_task("amazon_reviews_rating").source.records
    ids = {s: {r[sources.ID_FIELD] for r in records.load(s)} for s in records.splits}
    assert sum(len(v) for v in ids.values()) == 1452
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert 0.75 < len(ids["train"]) / 1452 < 0.85


def test_multitask_rates_are_examples_proportional_with_the_cap():
    mixture = seqio.get_mixture_or_task("ift_multitask")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates["samsum"] == mixtures.EXAMPLES_CAP  # 14,731 examples, capped
    amazon = seqio.get_mixture_or_task("amazon_reviews_rating")
    assert rates["amazon_reviews_rating"] == amazon.num_input_examples("train") < 3000
    assert not set(mixtures.GUARD_TASKS) & set(rates)


def test_packed_batches_hold_several_examples_per_row():
    spec = pipeline.BatchSpec("synthetic_sentiment", "validation", 256, 32,
                              batch_size=4, shuffle=False, num_epochs=1)
    batch = next(pipeline.numpy_batches(spec))
    assert batch["encoder_input_tokens"].shape == (4, 256)
    assert batch["encoder_segment_ids"].max() >= 2
    # Positions restart at every segment; loss weights cover exactly the real targets.
    for row in range(4):
        segments = batch["decoder_segment_ids"][row]
        starts = (batch["decoder_positions"][row] == 0) & (segments > 0)
        assert starts.sum() == len(np.unique(segments[segments > 0]))
    np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0,
                                  batch["decoder_target_tokens"] > 0)


def test_unpacked_batches_pad_one_example_per_row():
    spec = pipeline.BatchSpec("synthetic_sentiment", "validation", 128, 16, batch_size=8,
                              pack=False, shuffle=False, num_epochs=1)
    batch = next(pipeline.numpy_batches(spec))
    assert "encoder_segment_ids" not in batch
    assert batch["encoder_input_tokens"].shape == (8, 128)


def _ids_of_shard(index, num_shards):
    task = seqio.get_mixture_or_task("synthetic_extraction")
    dataset = task.get_dataset(LENGTHS, split="validation", shuffle=True, seed=3,
                               shard_info=seqio.ShardInfo(index, num_shards))
    return [e["id"] for e in dataset.as_numpy_iterator()]


def test_two_host_shards_are_disjoint_and_cover_the_split():
    first, second = _ids_of_shard(0, 2), _ids_of_shard(1, 2)
    assert len(first) == len(set(first)) and len(second) == len(set(second))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 200


def test_missing_data_dir_names_the_expected_path(tmp_path, monkeypatch):
    source = sources.FileSource("x", "dialogsum", {"train": "dialogsum.train.jsonl"},
                                ("dialogue",))
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path))
    with pytest.raises(sources.MissingDataError,
                       match=f"expected {tmp_path}/dialogsum/dialogsum.train.jsonl; set "
                             "IFT_JAX_DATA_DIR"):
        source.load("train")
    monkeypatch.delenv(sources.ENV_VAR)
    with pytest.raises(sources.MissingDataError, match="set IFT_JAX_DATA_DIR"):
        source.load("train")


def test_registration_checks_templates_against_declared_fields():
    source = sources.FileSource("samsum", "samsum", {"train": "train.jsonl"},
                                ("dialogue", "summary"))
    bad = PatternTemplate("summarize_3", "{dialog}", "{summary}")
    with pytest.raises(ValueError, match=r"template 'summarize_3' uses field \{dialog\}; "
                                         r"task 'samsum_bad' has fields: dialogue, summary"):
        instructions.register_task("samsum_bad", source, [bad])
    assert "samsum_bad" not in seqio.TaskRegistry.names()


def test_malformed_file_error_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"a": "x"}\n{"a": \n')
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path))
    source = sources.FileSource("d", "d", {"train": "train.jsonl"}, ("a",))
    with pytest.raises(ValueError, match=r"train.jsonl.*line 2"):
        source.load("train")


def test_explicit_rates_set_the_sampling_proportions():
    mixture = mixtures.register_mixture(
        "test_explicit_rates", [("synthetic_sentiment", 3.0), ("synthetic_extraction", 1.0)],
        default_rate=None)
    assert mixture.get_rate(seqio.get_mixture_or_task("synthetic_sentiment")) == 3.0
    dataset = mixture.get_dataset({"inputs": 128, "targets": 16}, split="train", seed=0,
                                  shuffle=True, num_epochs=None)
    decode = mixture.tasks[0].output_features["inputs"].vocabulary.decode
    inputs = [decode(e["inputs"].tolist()) for e in dataset.take(2000).as_numpy_iterator()]
    share = sum("OPTIONS:" in x for x in inputs) / len(inputs)  # only sentiment has options
    assert 0.70 < share < 0.80
    seqio.MixtureRegistry.remove("test_explicit_rates")


def test_a_mixture_with_no_positive_rate_is_refused_before_training(tmp_path, capsys):
    from ift_jax import cli
    mixtures.register_mixture("test_zero_rates", ["synthetic_sentiment",
                                                  "synthetic_extraction"], default_rate=0.0)
    try:
        workdir = tmp_path / "run"
        assert cli.main(["train", f"--workdir={workdir}", "--config.data.mixture=test_zero_rates",
                         "--config.train.steps=2", "--config.optimizer.warmup_steps=0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["ift-jax train: error: mixture 'test_zero_rates' gives every task a rate "
                       "of 0 (synthetic_extraction=0, synthetic_sentiment=0): nothing to sample "
                       "from; give at least one task a positive rate (a task with no training "
                       "examples gets 0 from examples-proportional mixing)"]
        assert not workdir.exists()
    finally:
        seqio.MixtureRegistry.remove("test_zero_rates")


def test_a_template_bomb_stops_ift_jax_train_in_one_line_naming_task_and_template(
        tmp_path, capsys):
    from ift_jax import cli
    from ift_jax.data.templates import JinjaTemplate
    source = sources.GeneratedSource(
        "bomb", lambda split: [{"id": i, "text": "hello"} for i in range(4)], ("text",),
        ("train", "validation"))
    bomb = JinjaTemplate("grows", "{% for a in range(100000) %}{{ text * 1000 }}{% endfor %}"
                                  " ||| {{ text }}")
    instructions.register_task("test_template_bomb", source, [bomb])
    try:
        workdir = tmp_path / "run"
        assert cli.main(["train", f"--workdir={workdir}",
                         "--config.data.mixture=test_template_bomb", "--config.train.steps=2",
                         "--config.optimizer.warmup_steps=0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["ift-jax train: error: task 'test_template_bomb', split 'train': "
                       "template 'grows': rendering stopped: the output would make 4,005,000 "
                       "characters or items, more than 4,000,000"]
        assert not workdir.exists()
    finally:
        seqio.TaskRegistry.remove("test_template_bomb")


def test_an_unknown_mixture_is_one_line_with_the_closest_names(tmp_path, capsys):
    from ift_jax import cli
    assert cli.main(["train", f"--workdir={tmp_path / 'run'}",
                     "--config.data.mixture=ift_synthetc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ift-jax train: error: no task or mixture is registered as 'ift_synthetc'; did you "
        "mean ift_synthetic? `ift-jax tasks list` lists the tasks"]
    assert not (tmp_path / "run").exists()
