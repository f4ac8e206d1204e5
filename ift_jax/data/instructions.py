"""Instruction tasks on SeqIO: records + templates -> rendered, tokenized examples.

`register_task(name, source, templates, ...)` registers a `seqio.Task` whose
data source renders each record of a `RecordSource` with instruction
templates (FLAN pattern tuples or promptsource jinja), in Python, once per
split:

- `mode="random"`: one template per example, chosen by a stable hash of
  (seed, example id), so the same example always gets the same template,
  on every host and every run;
- `mode="all"`: every template applied to every example (FLAN's
  `template_0toN`);
- `num_shots=k`: k exemplars from the train split (never the example
  itself), rendered with the same template and joined FLAN-style; with
  `fit_inputs_length` set, the last exemplars are dropped until the input
  fits that many tokens (in-context baselines). Exemplars are drawn at
  random per example, or, with `exemplar_order="first"`, are the first k of
  the exemplar split in file order (MMLU's dev exemplars, as the original
  evaluation code takes them). The few-shot format's `prefix` (e.g. MMLU's
  header) comes first even with no exemplars.

Rendered features (strings): `inputs`, `targets`, `id`, `template`,
`references` (JSON list: the record's `references` field when it has one,
e.g. dialogsum test's three summaries, else `[targets]`), `choices` (JSON
list of the template's answer choices, `[]` when it has none; evaluation
ranks them), `shots` (exemplars actually used) and `group` (the record's
`group` field, `""` when it has none: rows that are scored together, e.g.
the answer options of one MultiRC question). Tokenization and EOS come from
SeqIO's own preprocessors; evaluation gets the references back through
`postprocess`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import seqio
import tensorflow as tf

from ift_jax import errors
from ift_jax.data import cache as cache_lib
from ift_jax.data import sources as sources_lib
from ift_jax.data import templates as templates_lib
from ift_jax.data.vocabularies import TASK_VOCABULARY

RENDERED_FEATURES = ("inputs", "targets", "id", "template", "references", "choices",
                     "shots", "group")
GROUP_FIELD = "group"  # A record field naming the rows scored together (MultiRC questions).

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(TASK_VOCABULARY, add_eos=True, required=True),
    "targets": seqio.Feature(TASK_VOCABULARY, add_eos=True, required=True),
}

MODES = ("random", "all")
EXEMPLAR_ORDERS = ("random", "first")


@dataclasses.dataclass(frozen=True)
class Rendering:
    """How records become prompts (see module docstring)."""

    mode: str = "random"
    num_shots: int = 0
    few_shot_format: templates_lib.FewShotFormat = templates_lib.FewShotFormat()
    seed: int = 0
    exemplar_split: str = "train"
    fit_inputs_length: int = 0  # Tokens (EOS included); 0 = keep every exemplar.
    exemplar_order: str = "random"  # Or "first": the split's first k, in order.
    # False keeps the rendered inputs' leading/trailing whitespace (MMLU's questions are
    # used as written by the original code; targets are always stripped).
    strip_inputs: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise errors.ConfigError(f"rendering mode {self.mode!r}; modes: {', '.join(MODES)}")
        if self.exemplar_order not in EXEMPLAR_ORDERS:
            raise errors.ConfigError(f"exemplar_order {self.exemplar_order!r}; orders: "
                             f"{', '.join(EXEMPLAR_ORDERS)}")
        if self.num_shots < 0:
            raise errors.ConfigError(f"num_shots must be >= 0, got {self.num_shots}")


def render_records(records: Sequence[dict], templates: Sequence[Any], rendering: Rendering,
                   exemplar_pool: Sequence[dict] = (), pool_is_records: bool = False
                   ) -> dict[str, list[str]]:
    """Renders records into columns of `RENDERED_FEATURES`."""
    columns: dict[str, list[str]] = {k: [] for k in RENDERED_FEATURES}
    for index, record in enumerate(records):
        example_id = record[sources_lib.ID_FIELD]
        if rendering.mode == "all":
            chosen = range(len(templates))
        else:
            chosen = [templates_lib.choose_template(templates, rendering.seed, example_id)]
        for t in chosen:
            template = templates[t]
            inputs, targets = template.render(record)
            inputs, targets = inputs.strip() if rendering.strip_inputs else inputs, targets.strip()
            shots = 0
            if rendering.num_shots:
                inputs, shots = _with_exemplars(inputs, template, rendering, example_id,
                                                exemplar_pool,
                                                index if pool_is_records else None)
            else:
                inputs = rendering.few_shot_format.prefix + inputs
            references = [r.strip() for r in record.get("references") or [targets]]
            columns["inputs"].append(inputs)
            columns["targets"].append(targets)
            columns["id"].append(example_id)
            columns["template"].append(template.name)
            columns["references"].append(json.dumps(list(references), ensure_ascii=False))
            choices = template.answer_choices_for(record) or []
            columns["choices"].append(json.dumps(choices, ensure_ascii=False))
            columns["shots"].append(str(shots))
            columns["group"].append(str(record.get(GROUP_FIELD, "")))
    return columns


def _with_exemplars(inputs: str, template: Any, rendering: Rendering, example_id: str,
                    pool: Sequence[dict], exclude: Optional[int]) -> tuple[str, int]:
    """(inputs with exemplars, number of exemplars used)."""
    if rendering.exemplar_order == "first":
        picks = [i for i in range(len(pool)) if i != exclude][:rendering.num_shots]
        if len(picks) < rendering.num_shots:
            raise errors.DataError(f"cannot take {rendering.num_shots} exemplars from "
                             f"{len(picks)} in split {rendering.exemplar_split!r}")
    else:
        picks = templates_lib.choose_exemplars(len(pool), rendering.num_shots,
                                               rendering.seed, example_id, exclude=exclude)
    exemplars = [template.render(pool[i]) for i in picks]
    fmt = rendering.few_shot_format
    for shots in range(len(exemplars), -1, -1):
        text = templates_lib.format_few_shot(exemplars[:shots], inputs, fmt)
        if (not rendering.fit_inputs_length
                or len(TASK_VOCABULARY.encode(text)) + 1 <= rendering.fit_inputs_length):
            return text, shots
    return fmt.prefix + inputs, 0  # Too long even alone: truncated like any input.


class InstructionDataSource(cache_lib.PerExampleSource):
    """A `seqio.DataSource` of rendered instruction examples (strings)."""

    def __init__(self, task_name: str, source: sources_lib.RecordSource,
                 templates: Sequence[Any], rendering: Rendering):
        self.task_name = task_name
        self.records = source
        self.templates = tuple(templates)
        self.rendering = rendering
        self._rendered: dict[str, dict[str, list[str]]] = {}
        super().__init__(splits=source.splits, caching_permitted=True,
                         performs_internal_shuffling=True)

    @property
    def fingerprint(self) -> str:
        """Hash of what rendering depends on besides the records: templates, rendering,
        the source's name, fields and splits (a cache from another definition is stale)."""
        definition = repr((self.task_name, self.records.name, self.records.description,
                           self.records.fields, self.records.splits, self.templates,
                           self.rendering))
        return hashlib.sha256(definition.encode("utf-8")).hexdigest()[:16]

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def rendered(self, split: str) -> dict[str, list[str]]:
        """Columns of rendered strings for `split` (computed once)."""
        if split not in self._rendered:
            records = self.records.load(split)
            pool, pool_is_records = (), False
            if self.rendering.num_shots:
                pool = self.records.load(self.rendering.exemplar_split)
                pool_is_records = split == self.rendering.exemplar_split
            try:
                self._rendered[split] = render_records(records, self.templates,
                                                       self.rendering, pool, pool_is_records)
            except templates_lib.TemplateError as e:
                raise templates_lib.TemplateError(f"task {self.task_name!r}, split {split!r}: "
                                                  f"{e}") from None
        return self._rendered[split]

    def num_input_examples(self, split: str) -> int:
        return len(self.rendered(split)["inputs"])

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *,
                    sequence_length=None, use_cached: bool = False,
                    num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        columns = self.rendered(split)
        if not columns["inputs"]:
            raise errors.DataError(f"task {self.task_name!r}: split {split!r} has no examples")
        dataset = tf.data.Dataset.from_tensor_slices(columns)
        if shard_info and shard_info.num_shards > 1:
            # Shard before shuffling: hosts see disjoint examples that cover the split.
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            dataset = dataset.shuffle(len(columns["inputs"]), seed=seed,
                                      reshuffle_each_iteration=True)
        return dataset


def postprocess(output: Any, example: Optional[dict] = None, is_target: bool = False) -> Any:
    """Predictions: stripped text. Targets: the example's list of references."""
    if is_target and example is not None and "references" in example:
        raw = example["references"]
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    if isinstance(output, bytes):
        output = output.decode("utf-8")
    return output.strip()


def register_task(name: str, source: sources_lib.RecordSource, templates: Sequence[Any], *,
                  rendering: Rendering = Rendering(),
                  postprocess_fn: Callable[..., Any] = postprocess,
                  metric_fns: Sequence[Callable[..., dict]] = (),
                  cacheable: bool = True) -> seqio.Task:
    """Validates the templates against the source's fields and registers the task.

    A cacheable task's cache point is after tokenization, before trimming and
    EOS (`ift_jax.data.cache`). Re-registering a name replaces the earlier task
    (modules may be reloaded).
    """
    templates_lib.validate_templates(name, templates, source.fields)
    if rendering.num_shots and rendering.exemplar_split not in source.splits:
        raise errors.DataError(f"task {name!r}: few-shot exemplars come from split "
                               f"{rendering.exemplar_split!r}, which source {source.name!r} lacks")
    cache_point = [seqio.CacheDatasetPlaceholder()] if cacheable else []
    task = cache_lib.CacheableTask(
        name, InstructionDataSource(name, source, templates, rendering),
        output_features=OUTPUT_FEATURES,
        preprocessors=[seqio.preprocessors.tokenize, *cache_point,
                       seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess_fn, metric_fns=list(metric_fns), shuffle_buffer_size=None)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, task)
    return task


def register_variants(name: str, source: sources_lib.RecordSource, templates: Sequence[Any],
                      *, num_shots: int = 3, few_shot_format: Optional[
                          templates_lib.FewShotFormat] = None, **kwargs) -> list[str]:
    """Registers FLAN's variants of one dataset.

    `name` (one random template, zero-shot), `name_all_templates` (every
    template), and, when the source has a train split and `num_shots > 0`,
    `name_{k}shot` (one random template, k exemplars).
    """
    names = [name, f"{name}_all_templates"]
    register_task(name, source, templates, **kwargs)
    register_task(names[1], source, templates, rendering=Rendering(mode="all"), **kwargs)
    if num_shots and "train" in source.splits:
        names.append(f"{name}_{num_shots}shot")
        fmt = few_shot_format or templates_lib.FewShotFormat()
        register_task(names[2], source, templates,
                      rendering=Rendering(num_shots=num_shots, few_shot_format=fmt), **kwargs)
    return names


def with_shots(task_name: str, shots: int, fit_inputs_length: int) -> seqio.Task:
    """An instruction task rendered with `shots` train exemplars per input, the last
    ones dropped until the input fits `fit_inputs_length` tokens (in-context
    evaluation). Registered as `<task>_incontext_<k>shot`.

    Raises:
      ValueError: if the task is not an instruction task or has no train split.
    """
    task = seqio.get_mixture_or_task(task_name)
    source = task.source
    if not isinstance(source, InstructionDataSource):
        raise errors.DataError(f"task {task_name!r} is not an instruction task (register_task); "
                               "in-context evaluation renders exemplars from its templates")
    if shots and source.rendering.exemplar_split not in source.records.splits:
        raise errors.DataError(f"task {task_name!r} has no {source.rendering.exemplar_split!r} "
                               f"split to draw in-context exemplars from")
    rendering = dataclasses.replace(source.rendering, mode="random", num_shots=shots,
                                    fit_inputs_length=fit_inputs_length)
    # Not cacheable: registered at evaluation time, for the run's inputs_length.
    return register_task(f"{task_name}_incontext_{shots}shot", source.records,
                         source.templates, rendering=rendering,
                         postprocess_fn=task.postprocess_fn, metric_fns=task.metric_fns,
                         cacheable=False)
