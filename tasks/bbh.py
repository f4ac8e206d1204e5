"""BIG-Bench Hard (Suzgun et al., 2022, "Challenging BIG-Bench Tasks and Whether
Chain-of-Thought Can Solve Them"): 27 tasks, 3-shot, answer-only and chain of thought.

Registers `bbh_direct_<task>` and `bbh_cot_<task>` for the 27 tasks
(`ift_jax.suites.BBH_TASKS`), split `test`: every example of
`<data dir>/bbh/tasks/<task>.json` (6,511 in all). Evaluation only: the files
carry BIG-bench's canary, and `ift_jax.suites.check_training_mixture` refuses
them in training. The mixtures `bbh_direct` and `bbh_cot` are in
`tasks/mixtures.py`.

Prompts are the paper's, as its released Codex runs show them
(`code-davinci-002-outputs/` of suzgunmirac/BIG-Bench-Hard, whose `input`
fields these reproduce byte for byte):

- CoT: `cot-prompts/<task>.txt` verbatim after its two header lines (the
  canary line and `-----`): the task description and three
  `Q: ...\\nA: Let's think step by step. ... So the answer is X.` exemplars,
  then `"\\n\\nQ: <input>\\nA: Let's think step by step."`;
- direct (answer-only): the description's first paragraph and the same
  exemplar questions, each answered with only its final answer,
  `"Q: ...\\nA: X"`, then `"\\n\\nQ: <input>\\nA:"`.

Checked against those Codex runs: 6,510 of the 6,511 CoT inputs are equal
(the one left is a snarks example whose text differs between the released
data and that run), and so are the direct inputs of 24 tasks (snarks: 177 of
178); the direct prompts of date_understanding and
tracking_shuffled_objects_three_objects in that run differ from their CoT
file's exemplars by a typo ("01/03/1961" for "01/03/1963"; "thehg sy dance"
for "the dance"), which is not copied.

Scoring is exact match of the answer (`accuracy`: equal strings after
stripping): for CoT the text after the first "So the answer is", up to the end
of that line, without its final period (`extract_cot_answer`; no such phrase
gives an empty answer, wrong, as lm-evaluation-harness's `[invalid]`); for
direct the first line of the generation (`extract_direct_answer`). Rows keep
the whole generation as `generation`.
"""

from __future__ import annotations

import json
import os
import re

from ift_jax import errors
from ift_jax import fileio, metrics
from ift_jax.data import instructions, records, sources
from ift_jax.data.templates import PatternTemplate
from ift_jax.suites import BBH_MODES, BBH_TASKS, bbh_task

COT_TRIGGER = "A: Let's think step by step."
ANSWER_PHRASE = "So the answer is"
_ANSWER = re.compile(re.escape(ANSWER_PHRASE) + r"[ \t]*([^\n]*)")


def extract_cot_answer(text: str) -> str:
    """The answer a chain of thought states: after the first "So the answer is",
    to the end of that line, stripped, without a final period; "" if never stated."""
    match = _ANSWER.search(text)
    if not match:
        return ""
    answer = match.group(1).strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def extract_direct_answer(text: str) -> str:
    """An answer-only generation's answer: its first non-blank line, stripped."""
    return next((line.strip() for line in text.strip().split("\n")), "")


def split_prompt(text: str) -> tuple[str, list[tuple[str, str]]]:
    """A `cot-prompts` file -> (task description, [(question, chain of thought)]).

    The chain is what follows the exemplar's `"A: Let's think step by step."`
    (starting with its newline).

    Raises:
      ValueError: the file does not have the two header lines and Q/A exemplars.
    """
    canary, rule, body = (text.split("\n", 2) + ["", ""])[:3]
    if "canary" not in canary or rule.strip() != "-----":
        raise errors.DataError("a BBH prompt file starts with the canary line and '-----'")
    description, *shots = body.split("\n\nQ: ")
    exemplars = []
    for shot in shots:
        question, sep, chain = shot.partition("\n" + COT_TRIGGER)
        if not sep:
            raise errors.DataError(f"BBH exemplar without {COT_TRIGGER!r}: {shot[:60]!r}")
        exemplars.append((question, chain))
    return description, exemplars


def cot_prefix(prompt_file_text: str) -> str:
    """The CoT prompt before the question: the file after its two header lines."""
    return prompt_file_text.split("\n", 2)[2]


def direct_prefix(prompt_file_text: str) -> str:
    """The answer-only prompt before the question: the exemplars' final answers only."""
    description, exemplars = split_prompt(prompt_file_text)
    shots = [f"Q: {q}\nA: {extract_cot_answer(chain)}" for q, chain in exemplars]
    # The paper's answer-only prompts keep the description's first paragraph (only
    # snarks has a second one: a definition of sarcasm).
    return "\n\n".join([description.split("\n\n")[0], *shots])


def prompt(prefix: str, question: str, mode: str) -> str:
    """The whole input: the 3-shot prefix, then the question to answer."""
    answer_start = COT_TRIGGER if mode == "cot" else "A:"
    return f"{prefix}\n\nQ: {question}\n{answer_start}"


def _reader(task: str, mode: str):
    """`tasks/<task>.json` -> records with the full `prompt`, read with its prompt file."""

    def read(path: str) -> list[dict]:
        prompt_path = os.path.join(os.path.dirname(os.path.dirname(path)), "cot-prompts",
                                   f"{task}.txt")
        if not fileio.exists(prompt_path):
            raise records.DataFileError(f"{prompt_path}: no such file (BBH's 3-shot prompts)")
        with fileio.open(prompt_path) as f:
            text = f.read()
        prefix = cot_prefix(text) if mode == "cot" else direct_prefix(text)
        with fileio.open(path) as f:
            examples = json.load(f)["examples"]
        return [{"idx": f"{task}:{i}", "input": e["input"], "target": e["target"],
                 "prompt": prompt(prefix, e["input"], mode)} for i, e in enumerate(examples)]
    return read


def postprocess_fn(mode: str):
    """Targets: the references. Predictions: the extracted answer."""
    extract = extract_cot_answer if mode == "cot" else extract_direct_answer

    def postprocess(output, example=None, is_target=False):
        if is_target:
            return instructions.postprocess(output, example, is_target)
        text = output.decode("utf-8") if isinstance(output, bytes) else output
        return extract(text)
    postprocess.__name__ = f"bbh_{mode}_answer"
    return postprocess


def _register(task: str, mode: str) -> str:
    name = bbh_task(task, mode)
    source = sources.FileSource(name, "bbh", {"test": f"tasks/{task}.json"},
                                ("input", "target", "prompt"), id_field="idx",
                                reader=_reader(task, mode))
    instructions.register_task(name, source, [PatternTemplate(f"bbh_{mode}", "{prompt}",
                                                              "{target}")],
                               postprocess_fn=postprocess_fn(mode),
                               metric_fns=[metrics.accuracy])
    return name


NAMES = {mode: [_register(task, mode) for task in BBH_TASKS] for mode in BBH_MODES}
