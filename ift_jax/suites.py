"""Named benchmark suites: which tasks, which split, which data, and the paper's aggregates.

A suite is a held-out benchmark evaluated by its own protocol (the tasks that
render it are registered in `tasks/mmlu.py`, `tasks/bbh.py`, `tasks/glue.py`):

- `mmlu_0shot`, `mmlu_5shot`: MMLU (Hendrycks et al., ICLR 2021), 57 subjects,
  test split; scored by rank classification over the letters A-D
  (`rank_accuracy`) and, second, by generation + exact match of the letter
  (`accuracy`). Aggregates: macro average over subjects and over the paper's
  four categories (the original repository's `categories.py`).
- `bbh_direct`, `bbh_cot`: BIG-Bench Hard (Suzgun et al., 2022), 27 tasks,
  3-shot answer-only or chain-of-thought; exact match of the extracted answer
  (`accuracy`); macro average over the 27 tasks.
- `glue`, `superglue`: GLUE (Wang et al., 2018) and SuperGLUE (Wang et al.,
  2019) dev/validation sets present locally, with the leaderboard metrics; a
  task's score is the mean of its leaderboard metrics (MRPC: F1 and accuracy,
  STS-B: Pearson and Spearman, CB: accuracy and macro F1, MultiRC: F1a and
  exact match) and the suite's score the mean over its tasks.

Also here: `get` / `parse` suite names, `check_data` (the suite's data folder
exists), and the canary for training data, `is_benchmark_task` /
`check_training_mixture`: MMLU and BBH are evaluation-only and must never be
trained on.

Pure Python: nothing here imports TensorFlow, SeqIO or JAX at module level.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional, Sequence

from ift_jax import errors, fileio
from ift_jax.data import sources


class SuiteError(errors.ConfigError):
    """A suite that does not exist, lacks its data, or a benchmark task used for training."""


# --- MMLU: subjects and the paper's categories (hendrycks/test categories.py) ----------

MMLU_SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health",
    "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math",
    "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business",
    "marketing": "business", "medical_genetics": "health", "miscellaneous": "other",
    "moral_disputes": "philosophy", "moral_scenarios": "philosophy", "nutrition": "health",
    "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law",
    "professional_medicine": "health", "professional_psychology": "psychology",
    "public_relations": "politics", "security_studies": "politics", "sociology": "culture",
    "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_SUBJECTS = tuple(sorted(MMLU_SUBCATEGORIES))
# The paper's four categories; "other" is the original's "other (business, health, misc.)".
MMLU_CATEGORIES = {
    "stem": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social_sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),
}
MMLU_SHOTS = (0, 5)


def mmlu_category(subject: str) -> str:
    """The paper's category of an MMLU subject, e.g. `"stem"`."""
    sub = MMLU_SUBCATEGORIES[subject]
    return next(c for c, subs in MMLU_CATEGORIES.items() if sub in subs)


def mmlu_task(subject: str, shots: int) -> str:
    return f"mmlu_{shots}shot_{subject}"


# --- BIG-Bench Hard ---------------------------------------------------------------------

BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)
BBH_MODES = ("direct", "cot")
BBH_NUM_EXAMPLES = 6511  # The published total over the 27 tasks.


def bbh_task(task: str, mode: str) -> str:
    return f"bbh_{mode}_{task}"


# --- GLUE / SuperGLUE: the tasks with local data and their leaderboard metrics ----------

GLUE_METRICS = {
    "glue_cola": ("mcc",), "glue_sst2": ("accuracy",), "glue_mrpc": ("f1", "accuracy"),
    "glue_stsb": ("pearson", "spearman"), "glue_qnli": ("accuracy",),
    "glue_rte": ("accuracy",), "glue_wnli": ("accuracy",),
}
SUPERGLUE_METRICS = {
    "super_glue_boolq": ("accuracy",), "super_glue_cb": ("accuracy", "macro_f1"),
    "super_glue_copa": ("accuracy",), "super_glue_multirc": ("f1a", "exact_match"),
    "super_glue_rte": ("accuracy",), "super_glue_wic": ("accuracy",),
    "super_glue_wsc": ("accuracy",),
}


# --- suites -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark and how it is scored.

    Attributes:
      name: e.g. `"mmlu_5shot"`.
      citation: the paper whose protocol the tasks follow.
      tasks: registered task names, in report order.
      split: the split evaluated.
      data_dirs: folders under the data directory (`IFT_JAX_DATA_DIR`) it reads.
      max_decode_length: generated tokens that fit the longest answer (CoT needs
        room for the reasoning), for a SentencePiece vocabulary like FLAN-T5's.
      inputs_length: encoder tokens that fit the longest prompts (same vocabulary).
      task_metrics: per task, the metrics whose mean is the task's score.
      secondary_metric: a metric also macro-averaged (MMLU: generation `accuracy`
        beside rank classification).
      categories: per task, its category (MMLU); categories are averaged too.
      report_task_scores: also return each task's score (when it combines metrics).
    """

    name: str
    citation: str
    tasks: tuple[str, ...]
    split: str
    data_dirs: tuple[str, ...]
    max_decode_length: int
    inputs_length: int
    task_metrics: Mapping[str, tuple[str, ...]]
    secondary_metric: Optional[str] = None
    categories: Mapping[str, str] = dataclasses.field(default_factory=dict)
    report_task_scores: bool = False

    def aggregate(self, per_task_scores: Mapping[str, Mapping[str, float]]
                  ) -> dict[str, float]:
        """The suite's aggregates from `{task: {metric: value}}` (the eval JSON's tasks).

        Returns `score` (the headline: macro average over tasks of each task's
        score), the macro average per category and over the categories
        (`<metric>_<category>`, `<metric>_categories`), the secondary metric's
        averages, and each task's score when `report_task_scores`.

        Raises:
          SuiteError: a task of the suite has no scores, or lacks a metric it needs.
        """
        missing = [t for t in self.tasks if t not in per_task_scores]
        if missing:
            raise SuiteError(f"suite {self.name!r}: no scores for {len(missing)} of its "
                             f"{len(self.tasks)} tasks (e.g. {', '.join(missing[:3])})")
        task_scores = {t: _mean([self._metric(per_task_scores, t, m)
                                 for m in self.task_metrics[t]]) for t in self.tasks}
        out = {"score": _mean(task_scores.values())}
        metric_sets = set(self.task_metrics.values())
        if len(metric_sets) == 1 and len(next(iter(metric_sets))) == 1:
            # One metric for every task (MMLU, BBH): its averages carry its name too.
            out.update(self._macro(next(iter(metric_sets))[0], task_scores))
        if self.secondary_metric:
            secondary = {t: self._metric(per_task_scores, t, self.secondary_metric)
                         for t in self.tasks}
            out.update(self._macro(self.secondary_metric, secondary))
        if self.report_task_scores:
            out.update(task_scores)
        return out

    def _metric(self, scores: Mapping[str, Mapping[str, float]], task: str, metric: str
                ) -> float:
        if metric not in scores[task]:
            raise SuiteError(f"suite {self.name!r}: task {task!r} has no {metric!r} (it has "
                             f"{', '.join(sorted(scores[task])) or 'no metrics'})")
        return float(scores[task][metric])

    def _macro(self, metric: str, values: Mapping[str, float]) -> dict[str, float]:
        """`metric`: mean over tasks; with categories, per category and over them."""
        out = {metric: _mean(values.values())}
        if self.categories:
            per_category = {}
            for category in dict.fromkeys(self.categories.values()):
                per_category[category] = _mean(
                    v for t, v in values.items() if self.categories[t] == category)
                out[f"{metric}_{category}"] = per_category[category]
            out[f"{metric}_categories"] = _mean(per_category.values())
        return out


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def _mmlu(shots: int) -> Suite:
    tasks = tuple(mmlu_task(s, shots) for s in MMLU_SUBJECTS)
    return Suite(
        f"mmlu_{shots}shot", "Hendrycks et al. 2021, Measuring Massive Multitask Language "
        "Understanding (ICLR)", tasks, "test", ("mmlu",), max_decode_length=8,
        inputs_length=2048, task_metrics=dict.fromkeys(tasks, ("rank_accuracy",)),
        secondary_metric="accuracy",
        categories={mmlu_task(s, shots): mmlu_category(s) for s in MMLU_SUBJECTS})


def _bbh(mode: str) -> Suite:
    tasks = tuple(bbh_task(t, mode) for t in BBH_TASKS)
    return Suite(
        f"bbh_{mode}", "Suzgun et al. 2022, Challenging BIG-Bench Tasks and Whether "
        "Chain-of-Thought Can Solve Them", tasks, "test", ("bbh",),
        # The longest CoT exemplar runs ~1,800 characters: ~450 SentencePiece tokens.
        max_decode_length=512 if mode == "cot" else 128, inputs_length=2048,
        task_metrics=dict.fromkeys(tasks, ("accuracy",)))


SUITES: dict[str, Suite] = {s.name: s for s in (
    _mmlu(0), _mmlu(5), _bbh("direct"), _bbh("cot"),
    Suite("glue", "Wang et al. 2018, GLUE: A Multi-Task Benchmark and Analysis Platform "
          "for Natural Language Understanding", tuple(GLUE_METRICS), "validation",
          ("glue",), max_decode_length=8, inputs_length=512, task_metrics=GLUE_METRICS,
          report_task_scores=True),
    Suite("superglue", "Wang et al. 2019, SuperGLUE: A Stickier Benchmark for "
          "General-Purpose Language Understanding Systems", tuple(SUPERGLUE_METRICS),
          "validation", ("super_glue",), max_decode_length=16, inputs_length=1024,
          task_metrics=SUPERGLUE_METRICS, report_task_scores=True),
)}


def get(name: str) -> Suite:
    """The suite called `name`.

    Raises:
      SuiteError: naming the suites, if there is none by that name.
    """
    if name not in SUITES:
        raise SuiteError(f"unknown suite {name!r}; suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


def parse(text: str) -> list[Suite]:
    """Suites named in a comma-separated list (`"mmlu_5shot,bbh_direct"`), in order,
    each once; blank entries are skipped."""
    names = dict.fromkeys(n.strip() for n in str(text or "").split(",") if n.strip())
    return [get(n) for n in names]


def check_data(suite: Suite, data_dir: Optional[str] = None) -> None:
    """Checks that the suite's data folders exist under `data_dir` (default: the
    data directory of `ift_jax.data.sources`, i.e. `IFT_JAX_DATA_DIR`).

    Raises:
      SuiteError: one line naming the missing folder and its SOURCE.md.
    """
    root = data_dir or sources.data_dir()
    for folder in suite.data_dirs:
        if root is None:
            raise SuiteError(f"suite {suite.name!r} reads {folder}/ (described by "
                             f"{folder}/SOURCE.md); set {sources.ENV_VAR} to the folder "
                             f"that holds {folder}/")
        path = os.path.join(root, folder)
        if not fileio.isdir(path):
            raise SuiteError(f"suite {suite.name!r}: data folder {path} is missing; put the "
                             f"data that {folder}/SOURCE.md describes there or set "
                             f"{sources.ENV_VAR} (now {root!r}) to the folder holding "
                             f"{folder}/")


# --- the canary: benchmark data never trains ---------------------------------------------

BENCHMARK_DATA_DIRS = ("mmlu", "bbh")  # Evaluation-only data (BBH carries BIG-bench's canary).
_BENCHMARK_SUITES = ("mmlu_0shot", "mmlu_5shot", "bbh_direct", "bbh_cot")
_BENCHMARK_TASKS = frozenset(t for s in _BENCHMARK_SUITES for t in SUITES[s].tasks)


def is_benchmark_task(name: str) -> bool:
    """Whether `name` is an MMLU/BBH task or mixture (or a variant registered from one,
    e.g. `<task>_incontext_5shot`): evaluation data that must never be trained on."""
    if name in _BENCHMARK_TASKS or name in _BENCHMARK_SUITES:
        return True
    return any(name.startswith(f"{t}_") for t in _BENCHMARK_TASKS)


def check_training_mixture(mixture_name: str,
                           task_names: Optional[Sequence[str]] = None) -> None:
    """Refuses a training mixture (or task) that holds a benchmark task.

    A task counts when its name is a benchmark's (`is_benchmark_task`) or when it
    reads a benchmark's data folder (a task registered under another name).

    Args:
      mixture_name: the mixture or task to train on.
      task_names: its tasks; default: looked up in the SeqIO registry.

    Raises:
      SuiteError: naming the benchmark task.
    """
    if task_names is None:
        from ift_jax.data import inspection  # SeqIO and TensorFlow only when asked.
        tasks = inspection.tasks_of(mixture_name)
        task_names = [t.name for t in tasks]
        by_data = [t.name for t in tasks if _reads_benchmark_data(t)]
    else:
        by_data = []
    for name in [mixture_name, *task_names, *by_data]:
        if is_benchmark_task(name) or name in by_data:
            raise SuiteError(f"training mixture {mixture_name!r} contains benchmark task "
                             f"{name!r}: MMLU and BBH are evaluation data and must never be "
                             f"trained on; remove it from the mixture")


def _reads_benchmark_data(task) -> bool:
    records = getattr(task.source, "records", None)
    return getattr(records, "subdir", None) in BENCHMARK_DATA_DIRS
