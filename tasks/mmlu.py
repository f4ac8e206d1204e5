"""MMLU (Hendrycks et al., ICLR 2021, "Measuring Massive Multitask Language
Understanding"), 0-shot and 5-shot, one task per subject.

Registers `mmlu_0shot_<subject>` and `mmlu_5shot_<subject>` for the 57
subjects (`ift_jax.suites.MMLU_SUBJECTS`), split `test` from
`<data dir>/mmlu/test/<subject>_test.csv`; the 5-shot exemplars are the five
questions of `mmlu/dev/<subject>_dev.csv`, in file order. The mixtures
`mmlu_0shot` and `mmlu_5shot` are in `tasks/mixtures.py`.

The prompt is the original code's, byte for byte: `hendrycks/test`
`evaluate.py` (and `evaluate_flan.py`, the same format, with which that
repository scores FLAN-T5):

    The following are multiple choice questions (with answers) about  abstract algebra.

    <question>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer: B

    ... (5-shot: the dev questions, each followed by " <letter>\\n\\n")
    <question>
    A. ...
    D. <choice>
    Answer:

Two details follow that code rather than lm-evaluation-harness (v0.4 `mmlu`,
whose format is otherwise the same): the subject keeps the leading space of
the original `format_subject`, so the header reads "about  abstract algebra"
with two spaces; and the question is used as written (the harness strips it;
648 test questions start with whitespace). Values are the CSV's text as
written; the original read them with pandas, which turns an all-numeric
choice column into numbers ("1.0") and "None" into "nan".

The target is the answer's letter; every example carries the choices
`["A", "B", "C", "D"]`, so evaluation's rank classification scores the four
letters by log-likelihood (`rank_accuracy`, the paper's way: the likeliest
letter), and the generated text is scored by exact match of the letter
(`accuracy`). The original code drops exemplars from the end while the
prompt exceeds 2,048 tokens; `instructions.with_shots(task, 5, inputs_length)`
does the same for any length.
"""

from ift_jax import errors
from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import FewShotFormat, PatternTemplate
from ift_jax.suites import MMLU_SHOTS, MMLU_SUBJECTS, mmlu_task

LETTERS = ("A", "B", "C", "D")
FIELDS = ("question", "choice0", "choice1", "choice2", "choice3", "answer", "options")

# format_example of hendrycks/test: question, "\n<letter>. <choice>" each, "\nAnswer:".
TEMPLATE = PatternTemplate(
    "mmlu", "{question}\nA. {choice0}\nB. {choice1}\nC. {choice2}\nD. {choice3}\nAnswer:",
    "{answer}")


def header(subject: str) -> str:
    """gen_prompt's first line; `format_subject` puts a space before every word."""
    words = "".join(" " + word for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def _prepare(record: dict) -> dict:
    """The 0-based answer index becomes its letter; the letters are the options."""
    index = int(record["answer"])
    if not 0 <= index < len(LETTERS):
        raise errors.DataError(f"MMLU answer index {record['answer']!r} is not 0-3")
    return {**record, "answer": LETTERS[index], "options": list(LETTERS)}


def make_source(subject: str) -> sources.FileSource:
    return sources.FileSource(
        f"mmlu_{subject}", "mmlu",
        {"test": f"test/{subject}_test.csv", "dev": f"dev/{subject}_dev.csv"}, FIELDS,
        prepare=_prepare)


def rendering(subject: str, shots: int) -> instructions.Rendering:
    """The original's prompt: the header, `shots` dev exemplars in order (each
    `" <letter>\\n\\n"`-terminated), the question as written."""
    return instructions.Rendering(
        num_shots=shots, exemplar_split="dev", exemplar_order="first", strip_inputs=False,
        few_shot_format=FewShotFormat(input_target_sep=" ", example_sep="\n\n",
                                      prefix=header(subject)))


def _register(subject: str, shots: int) -> str:
    name = mmlu_task(subject, shots)
    instructions.register_task(name, make_source(subject), [TEMPLATE],
                               rendering=rendering(subject, shots),
                               metric_fns=[metrics.accuracy])
    return name


NAMES = {shots: [_register(subject, shots) for subject in MMLU_SUBJECTS]
         for shots in MMLU_SHOTS}
