"""The mixtures of the studies (`ift_jax.studies`, docs/studies/).

- `study_base`: what the studies' base model is instruction-tuned on from
  scratch: `ift_multitask` without DialogSum (DialogSum is the new task the
  studies fine-tune on afterwards) plus the synthetic tasks, mixed
  examples-proportionally with FLAN's cap, as `ift_multitask` is.
- `study_guard`: the tasks of `study_base` whose forgetting the studies
  measure (summarization, classification, translation, tagging, and the three
  synthetic tasks); `ift_guard` (T0 datasets the base never trained on) is
  measured beside them as held-out generalization.
- `study_dialogsum_replay`: DialogSum with the `study_guard` tasks replayed
  (FLAN-style multi-task fine-tuning as the remedy for forgetting):
  `REPLAY_SHARE` of the examples come from the guard tasks, split equally.
- `study_smoke_replay`: the same with the synthetic guard task of the studies'
  `smoke` preset (no data files beside DialogSum's, for CI).
"""

from __future__ import annotations

from ift_jax.tasks import mixtures

STUDY_BASE_TASKS = (tuple(t for t in mixtures.MULTITASK_TASKS if t != "dialogsum")
                    + mixtures.SYNTHETIC_TASKS)

STUDY_GUARD_TASKS = ("samsum", "amazon_reviews_rating", "amazon_reviews_headline",
                     "multi30k_en_de", "wnut17", *mixtures.SYNTHETIC_TASKS)

SMOKE_GUARD_TASKS = ("synthetic_sentiment",)

# 10% replay: the top of the 5-10% range of multi-task remedies (chosen before any run).
REPLAY_SHARE = 0.1


def replay_rates(target: str, replayed, share: float) -> list[tuple[str, float]]:
    """`(task, rate)` pairs: `target` at 1 - share, each replayed task at share / n."""
    replayed = tuple(replayed)
    return [(target, 1.0 - share)] + [(t, share / len(replayed)) for t in replayed]


mixtures.register_mixture("study_base", STUDY_BASE_TASKS,
                          mixtures.examples_proportional(mixtures.EXAMPLES_CAP))
mixtures.register_mixture("study_guard", STUDY_GUARD_TASKS, default_rate=1.0)
mixtures.register_mixture("study_dialogsum_replay",
                          replay_rates("dialogsum", STUDY_GUARD_TASKS, REPLAY_SHARE),
                          default_rate=1.0)
mixtures.register_mixture("study_smoke_replay",
                          replay_rates("dialogsum", SMOKE_GUARD_TASKS, REPLAY_SHARE),
                          default_rate=1.0)
