"""Progress with an ETA: plain lines in logs, a tqdm bar on a terminal."""

import io

from ift_jax import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_carry_counts_elapsed_and_eta_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    tracker = progress.Progress(4, "eval step 100", "task", stream=out, every_s=30.0,
                                clock=clock)
    for seconds, note in ((10, "samsum"), (20, "dialogsum"), (45, "xsum"), (80, "")):
        clock.now = seconds
        tracker.update(note=note)
    assert out.getvalue().splitlines() == [
        "eval step 100: 1/4 task (25%), samsum, elapsed 10s, ETA 30s",  # The first item.
        "eval step 100: 3/4 task (75%), xsum, elapsed 45s, ETA 15s",  # 30 s after the last.
        "eval step 100: 4/4 task (100%), elapsed 1m20s",  # The last item.
    ]


def test_a_terminal_gets_a_tqdm_bar_and_no_plain_lines():
    out = Terminal()
    for _ in progress.track(range(3), desc="export", unit="file", stream=out):
        pass
    text = out.getvalue()
    assert "\r" in text and "export: 100%" in text and "3/3" in text


def test_track_counts_items_as_their_loop_body_finishes():
    clock, out, seen = Clock(), io.StringIO(), []
    for item in progress.track(["a", "b"], desc="cache", stream=out, every_s=0, clock=clock):
        seen.append((item, out.getvalue().count("\n")))
        clock.now += 5
    assert seen == [("a", 0), ("b", 1)]
    assert out.getvalue().splitlines()[-1] == "cache: 2/2 it (100%), elapsed 10s"


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (0, 9.4, 75, 3725)] == [
        "0s", "9s", "1m15s", "1h02m05s"]


def test_a_multi_task_evaluation_point_prints_task_progress_with_an_eta(tmp_path, monkeypatch,
                                                                        capsys):
    import numpy as np
    import ift_jax.tasks  # noqa: F401  (registers the tasks)
    from ift_jax import evaluator
    from ift_jax.data.vocabularies import TASK_VOCABULARY
    from test_train import tiny_config

    def constant(batch):  # Any model will do: the point is the progress around it.
        text = TASK_VOCABULARY.encode("negative") + [1]
        return np.tile(np.asarray(text, np.int32), (batch.shape[0], 1))

    monkeypatch.setattr(evaluator, "run_inference", lambda *args, **kwargs: constant)
    config = tiny_config()
    config.eval.tasks = "synthetic_sentiment,synthetic_support_summary,synthetic_extraction"
    config.eval.max_examples = 2
    evaluator.RunEvaluator(config, None, str(tmp_path), None).step(5, None)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("eval step 5: ")]
    assert lines[0].startswith("eval step 5: 1/3 task (33%), synthetic_sentiment, elapsed ")
    assert ", ETA " in lines[0]
    assert lines[-1].startswith("eval step 5: 3/3 task (100%), synthetic_extraction, elapsed ")
    assert "3/3 task" not in captured.out  # Progress goes to stderr, results to stdout.
