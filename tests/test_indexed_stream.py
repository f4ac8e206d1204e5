"""The indexed training stream: SeqIO's features, whole epochs, the mixture's rates,
and a saved position that continues exactly where an uninterrupted stream goes."""

import functools
import json

import numpy as np
import pytest

from ift_jax.data import indexed, pipeline, positions, vocabularies


@pytest.fixture(scope="module", autouse=True)
def byte_vocabulary():
    vocabularies.set_vocabulary("byte")
    import ift_jax.tasks  # noqa: F401  (registers tasks)


def spec(name="synthetic_sentiment", batch_size=4, pack=True, shuffle=True, seed=0):
    return pipeline.BatchSpec(name, "train", 48, 12, batch_size=batch_size, pack=pack,
                              shuffle=shuffle, seed=seed)


@functools.lru_cache(maxsize=None)
def _tasks(name):  # Read once per module: every spec here has the same lengths.
    return tuple(indexed.load_tasks(spec(name)))


def stream(s, host_rows=None):
    return indexed.IndexedStream(_tasks(s.mixture_or_task), s, host_rows)


def draw(source, count):
    """The next `count` examples of the stream `source`, taken from it."""
    examples = []
    for _ in range(count):
        task, inputs, targets = source._peek()
        source._take(task)
        examples.append((inputs, targets))
    return examples


def test_unpacked_batches_equal_seqios_in_the_splits_order():
    s = spec(pack=False, shuffle=False)
    ours, seqio_batches = stream(s), pipeline.numpy_batches(s)
    for _ in range(3):
        a, b = next(ours), next(seqio_batches)
        assert sorted(a) == sorted(b)
        for key in b:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_packed_rows_hold_the_drawn_examples_whole_with_seqios_features():
    s = spec(batch_size=3)
    ours, drawn = stream(s), stream(s)
    reference = pipeline.numpy_batches(s)
    assert sorted(next(reference)) == sorted(next(stream(s)))
    for _ in range(4):
        before = ours.position.next_example
        batch = next(ours)
        examples = draw(drawn, ours.position.next_example - before)
        found = []
        for r in range(s.batch_size):
            seg_in, seg_out = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
            for segment in range(1, seg_in.max() + 1):
                inputs = batch["encoder_input_tokens"][r][seg_in == segment]
                targets = batch["decoder_target_tokens"][r][seg_out == segment]
                shifted = batch["decoder_input_tokens"][r][seg_out == segment]
                np.testing.assert_array_equal(shifted, np.concatenate([[0], targets[:-1]]))
                np.testing.assert_array_equal(
                    batch["decoder_positions"][r][seg_out == segment], np.arange(len(targets)))
                found.append((inputs.tolist(), targets.tolist()))
            assert (batch["decoder_loss_weights"][r] == (seg_out > 0)).all()
        assert sorted(found) == sorted((i.tolist(), t.tolist()) for i, t in examples)
        # The batch ended at the first example no row had room for.
        _, nxt_in, nxt_out = ours._peek()
        assert all((batch["encoder_segment_ids"][r] > 0).sum() + len(nxt_in) > 48
                   or (batch["decoder_segment_ids"][r] > 0).sum() + len(nxt_out) > 12
                   for r in range(s.batch_size))


def test_each_epoch_draws_every_example_once_in_a_new_order():
    s = spec(pack=False, batch_size=1)
    ours = stream(s)
    size = ours.tasks[0].size
    order = [ours._index_in_task(0, c) for c in range(2 * size)]
    assert sorted(order[:size]) == sorted(order[size:]) == list(range(size))
    assert order[:size] != order[size:]


def test_mixture_draws_follow_the_rates():
    ours = stream(spec("ift_synthetic"))
    draws = np.bincount([ours._task_of(k) for k in range(3 * indexed.BLOCK)],
                        minlength=len(ours.tasks))
    expected = ours._probabilities * draws.sum()
    assert np.all(np.abs(draws - expected) < 5 * np.sqrt(expected) + 1), (draws, expected)


def test_a_saved_position_continues_exactly_as_the_uninterrupted_stream(tmp_path):
    s = spec("ift_synthetic", batch_size=5)
    whole = stream(s)
    for _ in range(3):
        next(whole)
    positions.save(whole, str(tmp_path), 3, 0, 1)
    after = [next(whole) for _ in range(4)]
    record = json.loads((tmp_path / "data_position" / "3" / "process_0_of_1.json").read_text())
    assert record["position"]["next_example"] == sum(record["position"]["drawn"]) > 0

    restored = stream(s)
    assert positions.resume(restored, str(tmp_path), 3, 0, 1)
    replayed = stream(s)  # No position for step 3 of 2 hosts: computed and dropped.
    assert not positions.resume(replayed, str(tmp_path), 3, 0, 2)
    for resumed in (restored, replayed):
        for a, b in zip(after, [next(resumed) for _ in range(4)]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_position_of_another_stream_is_not_used(tmp_path, caplog):
    first = stream(spec(batch_size=4))
    next(first)
    positions.save(first, str(tmp_path), 1, 0, 1)
    other = stream(spec(batch_size=6))
    with caplog.at_level("INFO"):
        assert not positions.resume(other, str(tmp_path), 1, 0, 1)
    assert "is of another stream (spec differ); replaying 1 batches" in caplog.text
    positions.drop_except(str(tmp_path), {2}, 0, 1)
    assert not (tmp_path / "data_position" / "1").exists()


def test_hosts_building_the_global_batch_keep_their_rows():
    s = spec(batch_size=4)
    whole, rows = next(stream(s)), next(stream(s, slice(2, 4)))
    for key in whole:
        np.testing.assert_array_equal(whole[key][2:4], rows[key])


def test_hosts_reading_examples_hold_disjoint_shards_that_cover_the_split():
    import seqio
    s = spec(pack=False, shuffle=False)
    whole = _tasks(s.mixture_or_task)[0]
    shards = [indexed.load_tasks(s, seqio.ShardInfo(i, 2))[0] for i in range(2)]
    assert sum(t.size for t in shards) == whole.size
    held = sorted(tuple(t.example(i)[0]) for t in shards for i in range(t.size))
    assert held == sorted(tuple(whole.example(i)[0]) for i in range(whole.size))


def test_cached_tasks_read_in_one_pass_equal_seqios_cached_reading(tmp_path, monkeypatch):
    import seqio
    from ift_jax.data import cache
    cache.write("synthetic_sentiment", str(tmp_path), ["train"], log=lambda _: None)
    monkeypatch.setattr(cache, "_cache_dir", str(tmp_path))
    s = spec(batch_size=2)
    assert indexed._eos_after_trim_only(seqio.get_mixture_or_task("synthetic_sentiment"))
    shards = (None, seqio.ShardInfo(1, 2))
    fast = [indexed.load_tasks(s, shard)[0] for shard in shards]
    monkeypatch.setattr(indexed, "_eos_after_trim_only", lambda task: False)
    for shard, ours in zip(shards, fast):
        through_seqio = indexed.load_tasks(s, shard)[0]
        assert ours.size == through_seqio.size > 0
        for field in ("inputs", "input_offsets", "targets", "target_offsets"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(through_seqio, field))
    assert fast[0].inputs.dtype == np.int32 and max(np.diff(fast[0].input_offsets)) == 48
