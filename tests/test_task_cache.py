"""Cached tasks (`ift-jax tasks cache`, `data.cache_dir`): the cache gives what rendering gives."""

import itertools

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401  (registers tasks and mixtures)
from ift_jax import cli, errors, evaluation
from ift_jax.data import cache, instructions, pipeline, sources, vocabularies
from ift_jax.data.templates import PatternTemplate
from ift_jax.tasks import mixtures

SMALL = "cache_test_small"
MIXTURE = "cache_test_mixture"
CAP = 1000  # synthetic_sentiment's 4000 train examples count 1000, the small task's 300.


def _small_records(split):
    n = {"train": 300, "validation": 40}[split]
    return [{"id": f"{split}-{i}", "word": f"w{i * 7 % 13}", "n": str(i)} for i in range(n)]


def _register_small(templates):
    source = sources.GeneratedSource(SMALL, _small_records, ("word", "n"),
                                     ("train", "validation"))
    return instructions.register_task(SMALL, source, templates)


TEMPLATES = PatternTemplate.from_tuples(SMALL, [("Repeat {word} {n}", "{word}"),
                                                ("Say {n}: {word}", "{n}")])


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    vocabularies.set_vocabulary("byte")
    _register_small(TEMPLATES)
    mixtures.register_mixture(MIXTURE, ["synthetic_sentiment", SMALL],
                              mixtures.examples_proportional(CAP))
    root = str(tmp_path_factory.mktemp("task_cache"))
    rows = cache.write(MIXTURE, root, ["train", "validation"], log=lambda _: None)
    assert sorted(rows) == [(SMALL, "train", 300), (SMALL, "validation", 40),
                            ("synthetic_sentiment", "train", 4000),
                            ("synthetic_sentiment", "validation", 200)]
    yield root
    cache.set_cache_dir(None)


@pytest.fixture
def cached(cache_root):
    cache.set_cache_dir(cache_root)
    yield cache_root
    cache.set_cache_dir(None)
    vocabularies.set_vocabulary("byte")


def _same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _examples(task, use_cached, **kwargs):
    return list(task.get_dataset(sequence_length=None, use_cached=use_cached,
                                 **kwargs).as_numpy_iterator())


@pytest.mark.parametrize("split,shuffle,shard", [("validation", False, None),
                                                 ("train", True, seqio.ShardInfo(1, 3))])
def test_cached_task_gives_the_rendered_examples(cached, split, shuffle, shard):
    for name in ("synthetic_sentiment", SMALL):
        task = seqio.get_mixture_or_task(name)
        kwargs = dict(split=split, shuffle=shuffle, seed=7, shard_info=shard, num_epochs=2)
        live, from_cache = _examples(task, False, **kwargs), _examples(task, True, **kwargs)
        assert len(live) == len(from_cache) > 0
        for a, b in zip(live, from_cache):
            _same(a, b)


def test_cached_training_stream_and_rates_equal_uncached(cached):
    mixture = seqio.get_mixture_or_task(MIXTURE)
    cached_rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    spec = pipeline.BatchSpec(MIXTURE, "train", inputs_length=48, targets_length=8,
                              batch_size=4, pack=True, seed=11)
    shard = seqio.ShardInfo(0, 2)
    from_cache = list(itertools.islice(pipeline.numpy_batches(spec, shard), 6))
    cache.set_cache_dir(None)
    live_rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    live = list(itertools.islice(pipeline.numpy_batches(spec, shard), 6))
    assert cached_rates == live_rates == {"synthetic_sentiment": CAP, SMALL: 300}
    for a, b in zip(live, from_cache):
        _same(a, b)


def test_cached_evaluation_examples(cached):
    task = seqio.get_mixture_or_task(SMALL)
    spec = evaluation.EvalSpec(tasks=(SMALL,), inputs_length=8, max_examples=5)
    from_cache = evaluation._examples(task, spec)
    cache.set_cache_dir(None)
    for a, b in zip(evaluation._examples(task, spec), from_cache, strict=True):
        _same(a, b)


def test_seqio_reads_the_cache_layout(cached):
    task = seqio.get_mixture_or_task(SMALL)
    reader = seqio.dataset_providers._CachedDataSource(cache.task_dir(cached, SMALL),
                                                       "validation")
    theirs = sorted(reader.get_dataset("validation", shuffle=False).as_numpy_iterator(),
                    key=lambda e: (e["id"], e["template"]))
    live = sorted(cache.precached(task, "validation").as_numpy_iterator(),
                  key=lambda e: (e["id"], e["template"]))
    for a, b in zip(theirs, live, strict=True):
        _same(a, b)


def test_other_vocabulary_is_refused(cached, tmp_path):
    texts = [f"Repeat w{i} {i} and say it again" for i in range(300)]
    model = vocabularies.train_sentencepiece(texts, str(tmp_path / "spm"), vocab_size=60)
    vocabularies.set_vocabulary(model)
    with pytest.raises(errors.DataError) as e:
        _examples(seqio.get_mixture_or_task(SMALL), True, split="validation", shuffle=False)
    message = str(e.value)
    assert "\n" not in message
    assert "vocabulary byte (byte)" in message
    assert f"this run uses sentencepiece:{cache._model_hash(model)} ({model})" in message


def test_missing_task_or_split_is_refused(cached, tmp_path):
    cache.write(SMALL, str(tmp_path), ["train"], log=lambda _: None)
    cache.set_cache_dir(str(tmp_path))
    spec = pipeline.BatchSpec(MIXTURE, "train", 32, 8, batch_size=2)
    with pytest.raises(cache.MissingCacheError, match=(
            "task 'synthetic_sentiment' split 'train' is not in the cache .*; write it with "
            "`ift-jax tasks cache synthetic_sentiment --output=.* --splits=train --vocab=byte`")):
        next(pipeline.numpy_batches(spec))
    with pytest.raises(cache.MissingCacheError, match=f"task '{SMALL}' split 'validation'"):
        _examples(seqio.get_mixture_or_task(SMALL), True, split="validation")


def test_changed_task_definition_is_refused(cached):
    _register_small([*TEMPLATES, PatternTemplate("extra", "{word}?", "{word}")])
    try:
        with pytest.raises(errors.DataError, match="another definition of task"):
            _examples(seqio.get_mixture_or_task(SMALL), True, split="validation")
    finally:
        _register_small(TEMPLATES)
        mixtures.register_mixture(MIXTURE, ["synthetic_sentiment", SMALL],
                                  mixtures.examples_proportional(CAP))


def test_cli_cache_writes_and_lists_unknown_names(tmp_path, capsys):
    assert cli.main(["tasks", "cache", "synthetic_extraction", f"--output={tmp_path}",
                     "--splits=validation"]) == 0
    assert "cached 1 task splits of synthetic_extraction (200 examples" in capsys.readouterr().out
    assert (tmp_path / "synthetic_extraction" / "COMPLETED").exists()
    assert cli.main(["tasks", "cache", "ift_synthtic", f"--output={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no task or mixture 'ift_synthtic'; did you mean ift_synthetic" in err
    assert "mixtures: " in err and "ift_multitask" in err
