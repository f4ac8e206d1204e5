"""The embedded default (configs/default.py), shortened: its summaries get better."""

import json

from ift_jax import evaluation, train
from ift_jax.configs import default


def test_default_run_rouge_rises_from_checkpoint_to_checkpoint(tmp_path):
    config = default.get_config()
    config.train.steps, config.train.checkpoint_every, config.eval.every = 60, 30, 30
    config.eval.tasks, config.eval.max_examples = "synthetic_support_summary", 16
    workdir = str(tmp_path / "default")
    train.train_and_evaluate(config, workdir)
    assert evaluation.finished_steps(workdir) == [0, 30, 60]
    rouge = {step: json.load(open(f"{workdir}/eval/step_{step}.json"))["tasks"][
        "synthetic_support_summary"]["rougeL"] for step in (0, 30, 60)}
    assert rouge[0] < rouge[30] < rouge[60], rouge
    assert rouge[60] > 25.0, rouge  # Measured 36.5 (26.5 at step 30, 0.0 at the start).
