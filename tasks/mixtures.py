"""Named mixtures and the held-out guard tasks.

- `ift_dialogsum`: single-task DialogSum.
- `ift_multitask`: dialogsum, samsum, the three amazon_us_reviews tasks,
  wnut17, multi30k en->de and the T0 subset (minus the guard datasets),
  examples-proportional with FLAN's cap: rate = min(num_examples, cap).
- `ift_synthetic`: the generated tasks (the embedded default trains on it).
- `GUARD_TASKS` / `ift_guard`: tasks kept out of training, evaluated to
  measure forgetting.
- `mmlu_0shot`, `mmlu_5shot`, `bbh_direct`, `bbh_cot`: the benchmark suites'
  tasks (`ift_jax.suites`), for evaluation only (training refuses them).
"""

from __future__ import annotations

import functools

import seqio

from ift_jax import suites
from ift_jax.tasks import t0

EXAMPLES_CAP = 3000  # FLAN caps at 30k; our datasets are ~100x smaller.

# T0 datasets held out of `ift_multitask` to measure forgetting.
GUARD_DATASETS = ("imdb", "rotten_tomatoes", "trec", "wiki_qa", "quarel", "common_gen")
GUARD_TASKS = tuple(t0.task_name(s) for s in t0.FILES if s.startswith(GUARD_DATASETS))

MULTITASK_TASKS = (
    "dialogsum", "samsum", "amazon_reviews_rating", "amazon_reviews_generate",
    "amazon_reviews_headline", "wnut17", "multi30k_en_de",
    *(t0.task_name(s) for s in t0.FILES if not s.startswith(GUARD_DATASETS)),
)

SYNTHETIC_TASKS = ("synthetic_support_summary", "synthetic_sentiment", "synthetic_extraction")


def examples_proportional(cap: int):
    """FLAN's mixing rate: a task's number of training examples, capped at `cap`."""
    return functools.partial(seqio.mixing_rate_num_examples, maximum=cap)


def register_mixture(name: str, tasks, default_rate) -> seqio.Mixture:
    """Registers (or replaces) a mixture; `default_rate` is a number or `task -> rate`."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate)


register_mixture("ift_dialogsum", ["dialogsum"], default_rate=1.0)
register_mixture("ift_multitask", MULTITASK_TASKS, examples_proportional(EXAMPLES_CAP))
register_mixture("ift_synthetic", SYNTHETIC_TASKS, default_rate=1.0)
register_mixture("ift_guard", GUARD_TASKS, default_rate=1.0)
for _suite in ("mmlu_0shot", "mmlu_5shot", "bbh_direct", "bbh_cot"):
    register_mixture(_suite, suites.get(_suite).tasks, default_rate=1.0)
