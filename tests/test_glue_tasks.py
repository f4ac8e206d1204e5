"""GLUE/SuperGLUE tasks: registration, TFDS feature names, rendering on mocked TFDS data (MNLI,
QQP) and on the local dev/validation files (the others)."""

import collections
import json

import pytest
import seqio
import tensorflow_datasets as tfds

from ift_jax.data import sources
from ift_jax.tasks import glue, glue_files

NUM_EXAMPLES = 4
SEQUENCE_LENGTH = {"inputs": 256, "targets": 16}
RENDERED = ("glue_mnli", "glue_qqp")  # The TFDS ones; the others read local files.
LOCAL_RENDERED = ("glue_rte", "super_glue_copa", "super_glue_boolq", "super_glue_multirc")


def _clear_caches():
    """Records and rendered columns are cached on first load; drop them both ways."""
    for name in glue.NAMES:
        data_source = seqio.get_mixture_or_task(name).source
        data_source._rendered.clear()
        data_source.records._cache.clear()


@pytest.fixture
def mock_tfds():
    _clear_caches()
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        yield
    _clear_caches()  # Later tests must not see mocked records.


def _examples(name, split="validation"):
    dataset = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=SEQUENCE_LENGTH, split=split, shuffle=False)
    return list(dataset.as_numpy_iterator())


# Train splits are here for SST-2, MRPC, STS-B and RTE; MNLI and QQP come from TFDS.
WITH_TRAIN = {"glue_sst2", "glue_mrpc", "glue_stsb", "glue_rte", "glue_mnli", "glue_qqp"}


def test_registers_every_dataset_with_its_variants():
    expected = {f"{d.name}{suffix}" for d in glue.DATASETS
                for suffix in ("", "_all_templates", "_3shot")
                if suffix != "_3shot" or d.name in WITH_TRAIN}
    assert len(glue.DATASETS) == 16
    assert set(glue.NAMES) == expected
    assert expected <= set(seqio.TaskRegistry.names())


def test_templates_use_options_and_answer_only_declared_fields():
    for dataset in glue.DATASETS:
        templates = glue.TEMPLATES[dataset.name]
        assert 3 <= len(templates) <= 5, dataset.name
        for template in templates:
            # STS-B is a regression: no options to offer.
            assert ("{options_}" in template.inputs) == (dataset.name != "glue_stsb")
            assert template.targets == "{answer}"
            assert template.fields() <= set(glue.SOURCES[dataset.name].fields)


def test_fields_are_the_tfds_builders_feature_names():
    for dataset in glue.DATASETS:
        features = tfds.builder(dataset.tfds_name).info.features
        # MultiRC's answer text is FLAN's `response`: `answer` is the label text here.
        fields = {*dataset.fields, "label", "idx"} - {"response"}
        assert fields <= set(features), dataset.tfds_name
        if dataset.options is not None and not callable(dataset.options):
            assert len(dataset.options) == features["label"].num_classes, dataset.name


def test_local_files_where_present_tfds_for_mnli_and_qqp():
    tfds_backed = {n for n, s in glue.SOURCES.items() if isinstance(s, sources.TfdsSource)}
    assert tfds_backed == {"glue_mnli", "glue_qqp"}
    for name, source in glue.SOURCES.items():
        assert source.id_field == "idx"
        expected = ("train", "validation") if name in WITH_TRAIN else ("validation",)
        assert sorted(source.splits) == sorted(expected), name
        if name not in tfds_backed:
            assert source.reader is glue_files.LOCAL[name].reader
    assert glue.SOURCES["glue_mnli"].split_map["validation"] == "validation_matched"


def test_prepare_maps_label_to_option_and_refuses_hidden_labels():
    prepare = glue.make_prepare("glue_rte", ("yes", "no"))
    record = {"sentence1": "a", "sentence2": "b", "label": 1, "idx": 7}
    assert prepare(record) == {**record, "options": ["yes", "no"], "answer": "no"}
    with pytest.raises(ValueError, match="glue_rte: record idx=7 has label -1"):
        prepare({**record, "label": -1})


@pytest.mark.parametrize("name", RENDERED)
def test_validation_examples_are_rendered_with_options(mock_tfds, name):
    examples = _examples(name)
    assert len(examples) == NUM_EXAMPLES
    for example in examples:
        inputs = example["inputs_pretokenized"].decode()
        targets = example["targets_pretokenized"].decode()
        options = inputs.split("OPTIONS:\n- ", 1)[1].split("\n- ")
        assert targets in options
        assert json.loads(example["references"]) == [targets]
        assert example["template"].decode().startswith(name + "_")
        assert example["inputs"][-1] == 1 and example["targets"][-1] == 1  # EOS


@pytest.mark.parametrize("name", RENDERED)
def test_all_templates_variant_renders_each_example_with_each_template(mock_tfds, name):
    examples = _examples(f"{name}_all_templates")
    templates = glue.TEMPLATES[name]
    assert len(examples) == NUM_EXAMPLES * len(templates)
    per_template = collections.Counter(e["template"].decode() for e in examples)
    assert per_template == {t.name: NUM_EXAMPLES for t in templates}


def test_few_shot_variant_prepends_train_exemplars(mock_tfds):
    for name in ("glue_mnli_3shot", "glue_rte_3shot"):  # TFDS (mocked) and local train.
        for example in _examples(name)[:NUM_EXAMPLES]:
            assert example["inputs_pretokenized"].decode().count("OPTIONS:") == 4


def test_train_records_carry_options_and_answer(mock_tfds):
    for name in RENDERED:
        for record in glue.SOURCES[name].load("train"):
            assert record["answer"] == record["options"][record["label"]]
            assert record[sources.ID_FIELD] == str(record["idx"])
    mnli = glue.SOURCES["glue_mnli"].load("train")
    assert all(r["options"] == list(glue.NLI3) for r in mnli)
    rte = glue.SOURCES["glue_rte"].load("train")  # Local: GLUE's RTE/train.tsv.
    assert len(rte) == 2490 and all(r["options"] == ["yes", "no"] for r in rte)
    assert all(r["answer"] == r["options"][r["label"]] for r in rte)


@pytest.mark.parametrize("name", LOCAL_RENDERED)
def test_local_validation_examples_are_rendered_with_options(name):
    examples = _examples(name)
    for example in examples[:50]:
        inputs = example["inputs_pretokenized"].decode()
        targets = example["targets_pretokenized"].decode()
        options = inputs.split("OPTIONS:\n- ", 1)[1].split("\n- ")
        assert targets in options
        assert json.loads(example["choices"]) == options
        assert example["template"].decode().startswith(name + "_")
    copa = glue.SOURCES["super_glue_copa"].load("validation")
    assert all(r["options"] == [r["choice1"], r["choice2"]] for r in copa)
