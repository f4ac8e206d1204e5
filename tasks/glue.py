"""GLUE and SuperGLUE classification tasks with FLAN's option templates and the
leaderboard metrics.

Registers, each with FLAN's variants (`<name>`, `<name>_all_templates`, and
`<name>_3shot` where there is a train split; see `instructions.register_variants`):

- GLUE (Wang et al. 2018, "GLUE: A Multi-Task Benchmark and Analysis Platform
  for Natural Language Understanding"): glue_cola (Matthews correlation),
  glue_sst2, glue_mrpc (F1 and accuracy), glue_qqp (F1 and accuracy),
  glue_stsb (Pearson and Spearman), glue_mnli, glue_qnli, glue_rte, glue_wnli
  (accuracy);
- SuperGLUE (Wang et al. 2019, "SuperGLUE: A Stickier Benchmark for
  General-Purpose Language Understanding Systems"): super_glue_boolq,
  super_glue_cb (accuracy and macro F1), super_glue_copa,
  super_glue_multirc (F1a over answer options and exact match per question),
  super_glue_rte, super_glue_wic, super_glue_wsc (accuracy).

Metrics come from `ift_jax.metrics` (scikit-learn / scipy) and score the
generated text, as the leaderboards score predicted labels; evaluation adds
`rank_accuracy` over the options (FLAN's rank classification). The `glue`
and `superglue` suites (`ift_jax.suites`) average them as the leaderboards do.

Data: the datasets present under `<data dir>/glue/` and `<data dir>/super_glue/`
(CoLA, SST-2, MRPC, STS-B, QNLI, RTE, WNLI dev, train where there;
BoolQ, CB, COPA, MultiRC, RTE, WiC, WSC validation) are read from those
files (`tasks/glue_files.py`); MNLI and QQP, which are not there, from TFDS
(`TFDS_DATA_DIR`, default `~/tensorflow_datasets`; nothing is downloaded here,
so `tfds build glue/mnli` where there is network and copy the data dir).
ReCoRD and the diagnostics (GLUE's AX, SuperGLUE's AX-b/AX-g) are not
registered: ReCoRD's data is not here, and the diagnostics' labels are only
scored by the leaderboards' servers.

Records keep the TFDS feature names (`glue/rte` has `sentence1`,
`sentence2`, `label`, `idx`); `prepare` adds `options` (the answer strings
FLAN offers, in label order) and `answer` (`options[label]`), so every
template reads `{options_}` and targets `{answer}`. STS-B is a regression:
its target is the score rounded to 0.2, as text ("3.4", as T5 does), its
templates offer no options, and its reference is the gold score, against
which the number the model writes is correlated. Splits are train and
validation only: GLUE/SuperGLUE test labels are hidden (-1). MNLI's
validation is TFDS's `validation_matched`.

Registration reads nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ift_jax import errors
from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate
from ift_jax.tasks.glue_files import LOCAL

SPLITS = {"train": "train", "validation": "validation"}
MNLI_SPLITS = {"train": "train", "validation": "validation_matched"}
NLI3 = ("yes", "it is not possible to tell", "no")
# TFDS CB labels: entailment, contradiction, neutral.
CB_OPTIONS = ("yes", "no", "it is not possible to tell")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One GLUE/SuperGLUE config and how its labels read as text.

    Attributes:
      name: task name, e.g. `"glue_rte"`.
      tfds_name: TFDS builder, config and version, e.g. `"glue/rte:2.0.0"` (seqio
        requires the version).
      fields: TFDS text features the templates read.
      options: answer strings in TFDS label order, or a function of the record
        (COPA's options are its two choices); None for a regression (STS-B).
      patterns: FLAN `(inputs, targets)` tuples.
      splits: task split -> TFDS split.
      metric_fns: the leaderboard's metrics.
    """

    name: str
    tfds_name: str
    fields: tuple[str, ...]
    options: Sequence[str] | Callable[[dict], list[str]] | None
    patterns: tuple[tuple[str, str], ...]
    splits: dict[str, str] = dataclasses.field(default_factory=lambda: dict(SPLITS))
    metric_fns: tuple[Callable[..., dict], ...] = (metrics.accuracy,)


def make_prepare(name: str, options: Sequence[str] | Callable[[dict], list[str]]
                 ) -> Callable[[dict], dict]:
    """A `prepare` adding `options` and `answer` (= `options[label]`) to a record."""

    def prepare(record: dict) -> dict:
        choices = list(options(record) if callable(options) else options)
        label = record["label"]
        if not 0 <= label < len(choices):
            raise errors.DataError(f"{name}: record idx={record.get('idx')} has label {label}; "
                                   f"expected 0..{len(choices) - 1} (test splits hide labels "
                                   f"as -1, use train or validation)")
        return {**record, "options": choices, "answer": choices[label]}

    return prepare


def _copa_options(record: dict) -> list[str]:
    return [record["choice1"], record["choice2"]]


def stsb_target(score: float) -> str:
    """T5's STS-B target: the score rounded to the nearest 0.2, one decimal."""
    return f"{round(score * 5) / 5:.1f}"


def _prepare_stsb(record: dict) -> dict:
    """Target: the score rounded to 0.2; reference: the gold score itself."""
    return {**record, "answer": stsb_target(record["label"]),
            "references": [str(record["label"])]}


YES_NO = ("no", "yes")
YES_NO_F1 = metrics.binary_f1("yes", "no")


# Patterns are FLAN's (FLAN/flan/templates.py): the first five distinct ones of
# each dataset (FLAN's CoLA list repeats its first), with FLAN's field names
# replaced by TFDS's (RTE's premise/hypothesis are sentence1/sentence2, BoolQ's
# text is passage).
DATASETS = (
    Dataset("glue_cola", "glue/cola:2.0.0", ("sentence",), ("unacceptable", "acceptable"), (
        ("Sentence: \"{sentence}\"\nWould a linguist rate this sentence to be acceptable "
         "linguistically?\n\n{options_}", "{answer}"),
        ("{sentence}\n\nHow would you consider the linguistic integrity of the preceding "
         "sentence?\n{options_}", "{answer}"),
        ("Test sentence: \"{sentence}\"\nIs this test sentence a correct grammatical English "
         "sentence?\n\n{options_}", "{answer}"),
        ("Is the following sentence linguistically acceptable?\n{sentence}\n{options_}",
         "{answer}"),
        ("Would the following sentence, by the strictest standards, be considered correct by "
         "a linguist?\n\n{sentence}\n{options_}", "{answer}"),
    ), metric_fns=(metrics.matthews_corr, metrics.accuracy)),
    Dataset("glue_sst2", "glue/sst2:2.0.0", ("sentence",), ("negative", "positive"), (
        ("Review:\n{sentence}\nIs this movie review sentence negative or positive?\n"
         "{options_}", "{answer}"),
        ("Short movie review: {sentence}\nDid the critic thinking positively or negatively of "
         "the movie?\n{options_}", "{answer}"),
        ("Sentence from a movie review: {sentence}\nWas the movie seen positively or "
         "negatively based on the preceding review?\n\n{options_}", "{answer}"),
        ("\"{sentence}\"\nHow would the sentiment of this sentence be perceived?\n\n"
         "{options_}", "{answer}"),
        ("Is the sentiment of the following sentence positive or negative?\n{sentence}\n"
         "{options_}", "{answer}"),
    )),
    Dataset("glue_mrpc", "glue/mrpc:2.0.0", ("sentence1", "sentence2"), ("no", "yes"), (
        ("Here are two sentences:\n{sentence1}\n{sentence2}\nDo they have the same meaning?\n"
         "{options_}", "{answer}"),
        ("Here are two sentences:\n\n{sentence1}\n\n{sentence2}\nAre the two sentences saying "
         "the same thing?\n{options_}", "{answer}"),
        ("{sentence1}\n\n{sentence2}\n\nDo the above sentences mean the same thing?\n"
         "{options_}", "{answer}"),
        ("{sentence1}\n\n{sentence2}\n\nPlease tell me if the sentences above mean the same.\n"
         "{options_}", "{answer}"),
        ("{sentence1}\n{sentence2}\nAre these sentences conveying the same meaning?\n"
         "{options_}", "{answer}"),
    ), metric_fns=(YES_NO_F1, metrics.accuracy)),
    # A regression: FLAN's STS-B patterns without their options list (FLAN rounds the
    # score to an integer and offers 0-5; the target here is T5's 0.2 grid).
    Dataset("glue_stsb", "glue/stsb:2.0.0", ("sentence1", "sentence2"), None, (
        ("{sentence1}\n{sentence2}\n\nRate the textual similarity of these two sentences on "
         "a scale from 0 to 5, where 0 is \"no meaning overlap\" and 5 is \"means the same "
         "thing\".", "{answer}"),
        ("{sentence1}\n{sentence2}\n\nOn a scale from 0 to 5, where 0 is \"no meaning "
         "overlap\" and 5 is \"means the same thing\", how closely does the first sentence "
         "resemble the second one?", "{answer}"),
        ("Sentence 1: {sentence1}\n\n Sentence 2: {sentence2}\n\nFrom 0 to 5 (0=\"no meaning "
         "overlap\" and 5=\"means the same thing\"), how similar are the two sentences?",
         "{answer}"),
        ("How similar are the following two sentences?\n\n{sentence1}\n{sentence2}\n\nGive "
         "the answer on a scale from 0 - 5, where 0 is \"not similar at all\" and 5 is "
         "\"means the same thing\".", "{answer}"),
        ("Do the following sentences say the same thing?\n\n{sentence1}\n{sentence2}\n\n"
         "Return your answer on a scale from 0 to 5, where 0 is \"not similar\" and 5 is "
         "\"very similar\".", "{answer}"),
    ), metric_fns=(metrics.pearson_spearman,)),
    Dataset("glue_qqp", "glue/qqp:2.0.0", ("question1", "question2"), ("no", "yes"), (
        ("{question1}\n{question2}\nWould you say that these questions are the same?\n"
         "{options_}", "{answer}"),
        ("{question1}\n{question2}\nDo those questions have the same meaning?\n{options_}",
         "{answer}"),
        ("{question1}\n{question2}\n\nAre these two questions inquiring about the same "
         "information?\n{options_}", "{answer}"),
        ("{question1}\n\n{question2}\n\nPlease tell me if those questions are the same.\n"
         "{options_}", "{answer}"),
        ("{question1}\n\n{question2}\n\nAre these two questions paraphrases of each other?\n"
         "{options_}", "{answer}"),
    ), metric_fns=(YES_NO_F1, metrics.accuracy)),
    Dataset("glue_mnli", "glue/mnli:2.0.0", ("premise", "hypothesis"), NLI3, (
        ("Premise: {premise}\n\nHypothesis: {hypothesis}\n\nDoes the premise entail the "
         "hypothesis?\n\n{options_}", "{answer}"),
        ("Premise: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis entailed by the "
         "premise?\n{options_}", "{answer}"),
        ("Here is a premise:\n{premise}\n\nHere is a hypothesis:\n{hypothesis}\n\nIs it "
         "possible to conclude that if the premise is true, then so is the hypothesis?\n"
         "{options_}", "{answer}"),
        ("Sentence 1: {premise}\n\nSentence 2: {hypothesis}\nIs this second sentence entailed "
         "by the first sentence?\n\n{options_}", "{answer}"),
        ("Sentence 1: {premise}\n\nSentence 2: {hypothesis}\n\nIf the first sentence is true, "
         "then is the second sentence true?\n{options_}", "{answer}"),
    ), splits=MNLI_SPLITS),
    Dataset("glue_qnli", "glue/qnli:2.0.0", ("question", "sentence"), ("yes", "no"), (
        ("Does the sentence \"{sentence}\" answer the question \"{question}\"\n\n{options_}",
         "{answer}"),
        ("Does the sentence \"{sentence}\" provide a valid answer to the question "
         "\"{question}\"\n{options_}", "{answer}"),
        ("Is \"{sentence}\" a good answer to the question \"{question}\"\n{options_}",
         "{answer}"),
        ("Does \"{sentence}\" correctly answer the question of {question}\n{options_}",
         "{answer}"),
        ("Does \"{sentence}\" contain the correct answer to \"{question}\"\n{options_}",
         "{answer}"),
    )),
    Dataset("glue_rte", "glue/rte:2.0.0", ("sentence1", "sentence2"), ("yes", "no"), (
        ("{sentence1}\n\nBased on the paragraph above can we conclude that \"{sentence2}\"?"
         "\n\n{options_}", "{answer}"),
        ("{sentence1}\n\nBased on that paragraph can we conclude that this sentence is true?"
         "\n{sentence2}\n\n{options_}", "{answer}"),
        ("{sentence1}\n\nCan we draw the following conclusion?\n{sentence2}\n\n{options_}",
         "{answer}"),
        ("{sentence1}\nDoes this next sentence follow, given the preceding text?\n"
         "{sentence2}\n\n{options_}", "{answer}"),
        ("{sentence1}\nCan we infer the following?\n{sentence2}\n\n{options_}", "{answer}"),
    )),
    Dataset("glue_wnli", "glue/wnli:2.0.0", ("sentence1", "sentence2"), ("no", "yes"), (
        ("If \"{sentence1}\", can we conclude that \"{sentence2}\"\n{options_}", "{answer}"),
        ("If \"{sentence1}\", does it follow that \"{sentence2}\"\n{options_}", "{answer}"),
        ("If \"{sentence1}\", is \"{sentence2}\" correct?\n\n{options_}", "{answer}"),
        ("Let's say that \"{sentence1}\"\n\nCan we now say that \"{sentence2}\"?\n\n"
         "{options_}", "{answer}"),
        ("\"{sentence1}\" is a true sentence.\n\nDoes this mean that \"{sentence2}\"?\n\n"
         "{options_}", "{answer}"),
    )),
    Dataset("super_glue_boolq", "super_glue/boolq:1.0.2", ("passage", "question"),
            ("no", "yes"), (
        ("{passage}\n\nCan we conclude that {question}?\n\n{options_}", "{answer}"),
        ("{passage}\n\nIs it true that {question}?\n\n{options_}", "{answer}"),
        ("{passage}\n\n{question}?\n\n{options_}", "{answer}"),
        ("Text: {passage}\n\nQuestion: {question}?\n\n{options_}", "{answer}"),
        ("{passage}\n\nWhat's the best answer to this question: {question}?\n\n{options_}",
         "{answer}"),
    )),
    Dataset("super_glue_cb", "super_glue/cb:1.0.2", ("premise", "hypothesis"),
            CB_OPTIONS, (
        ("{premise}\n\nBased on the paragraph above can we conclude that \"{hypothesis}\"?"
         "\n\n{options_}", "{answer}"),
        ("{premise}\n\nBased on that paragraph can we conclude that this sentence is true?\n"
         "{hypothesis}\n\n{options_}", "{answer}"),
        ("{premise}\n\nCan we draw the following conclusion?\n{hypothesis}\n\n{options_}",
         "{answer}"),
        ("{premise}\nDoes this next sentence follow, given the preceding text?\n{hypothesis}"
         "\n\n{options_}", "{answer}"),
        ("{premise}\nCan we infer the following?\n{hypothesis}\n\n{options_}", "{answer}"),
    ), metric_fns=(metrics.accuracy, metrics.macro_f1(CB_OPTIONS))),
    # `question` is "cause" or "effect"; the options are the two choices.
    Dataset("super_glue_copa", "super_glue/copa:1.0.2",
            ("premise", "question", "choice1", "choice2"), _copa_options, (
        ("{premise} What is the {question}?\n\n{options_}", "{answer}"),
        ("Here is a premise:{premise}\n\nWhat is the {question}?\n\n{options_}", "{answer}"),
        ("{premise}\n\nWhat is the {question} of the preceding sentence?\n\n{options_}",
         "{answer}"),
        ("{premise}\n\nWhat is a plausible {question}?\n\n{options_}", "{answer}"),
        ("Based on the following sentence, what is the {question}?\n\n{premise}\n\n"
         "{options_}", "{answer}"),
    )),
    Dataset("super_glue_wic", "super_glue/wic:1.0.2", ("sentence1", "sentence2", "word"),
            ("no", "yes"), (
        ("{sentence1}\n{sentence2}\nDoes the word \"{word}\" mean the same thing in the above "
         "two sentences?\n{options_}", "{answer}"),
        ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDoes {word} mean the same thing "
         "in these two sentences?\n{options_}", "{answer}"),
        ("Here is one sentence: {sentence1}\nHere is another sentence: {sentence2}\nDoes the "
         "term {word} mean the same thing in both these sentences?\n{options_}", "{answer}"),
        ("In these two sentences (1) {sentence1} (2) {sentence2}, does the word {word} mean "
         "the same thing?\n{options_}", "{answer}"),
        ("Does word \"{word}\" have the same meaning in the following two sentences?\n\n"
         "{sentence1}\n\n{sentence2}\n\n{options_}", "{answer}"),
    )),
    # One example per answer option (`response`), grouped by question for exact match.
    Dataset("super_glue_multirc", "super_glue/multirc:1.0.2",
            ("paragraph", "question", "response"), YES_NO, (
        ("{paragraph}\n\nQuestion: \"{question}\"\n\nResponse: \"{response}\"\n\nDoes the "
         "response correctly answer the question?\n\n{options_}", "{answer}"),
        ("{paragraph}\n\nQuestion: \"{question}\"\n\nResponse: \"{response}\"\n\nBased on "
         "the paragraph, is the response to the question is factually correct?\n\n{options_}",
         "{answer}"),
        ("{paragraph}\n\nQuestion: \"{question}\"\n\nAnswer: \"{response}\"\n\nIs this "
         "answer correct?\n\n{options_}", "{answer}"),
        ("Paragraph: {paragraph}\n\nQuestion: \"{question}\"\n\nAnswer: \"{response}\"\n\n"
         "Based on the paragraph, is this answer correct\n\n{options_}", "{answer}"),
        ("{paragraph}\n\nBased on the paragraph, does the response \"{response}\" correctly "
         "answer the question \"{question}\"?\n\n{options_}", "{answer}"),
    ), metric_fns=(metrics.multirc_f1a_em,)),
    # SuperGLUE's RTE (TFDS labels: entailment, not_entailment), FLAN's RTE patterns.
    Dataset("super_glue_rte", "super_glue/rte:1.0.2", ("premise", "hypothesis"), ("yes", "no"), (
        ("{premise}\n\nBased on the paragraph above can we conclude that \"{hypothesis}\"?"
         "\n\n{options_}", "{answer}"),
        ("{premise}\n\nBased on that paragraph can we conclude that this sentence is true?\n"
         "{hypothesis}\n\n{options_}", "{answer}"),
        ("{premise}\n\nCan we draw the following conclusion?\n{hypothesis}\n\n{options_}",
         "{answer}"),
        ("{premise}\nDoes this next sentence follow, given the preceding text?\n{hypothesis}"
         "\n\n{options_}", "{answer}"),
        ("{premise}\nCan we infer the following?\n{hypothesis}\n\n{options_}", "{answer}"),
    )),
    # FLAN's context/text1/text2 are TFDS's text/span1_text/span2_text.
    Dataset("super_glue_wsc", "super_glue/wsc:1.0.2", ("text", "span1_text", "span2_text"),
            YES_NO, (
        ("{text}\n\nAre \"{span1_text}\" and \"{span2_text}\" the same entity?\n\n{options_}",
         "{answer}"),
        ("{text}\n\nDo \"{span1_text}\" and \"{span2_text}\" have the same meaning?\n\n"
         "{options_}", "{answer}"),
        ("Given the following context\n\n{text}\n\nAre \"{span1_text}\" and \"{span2_text}\" "
         "the same?\n\n{options_}", "{answer}"),
        ("{text}\n\nDo \"{span2_text}\" and \"{span1_text}\" mean the same thing?\n\n"
         "{options_}", "{answer}"),
        ("{text}\n\nAre \"{span2_text}\" and \"{span1_text}\" the same thing in the "
         "aforementioned sentence?\n\n{options_}", "{answer}"),
    )),
)


def make_source(dataset: Dataset) -> sources.RecordSource:
    """The dataset's local files when they are here (`glue_files.LOCAL`), else its
    TFDS builder; records prepared with `options` and `answer`."""
    if dataset.options is None:
        fields, prepare = (*dataset.fields, "label", "answer"), _prepare_stsb
    else:
        fields = (*dataset.fields, "label", "options", "answer")
        prepare = make_prepare(dataset.name, dataset.options)
    local = LOCAL.get(dataset.name)
    if local:
        return sources.FileSource(dataset.name, local.subdir, local.files, fields,
                                  id_field="idx", prepare=prepare, reader=local.reader)
    return sources.TfdsSource(dataset.name, dataset.tfds_name, dataset.splits, fields,
                              id_field="idx", prepare=prepare)


SOURCES = {d.name: make_source(d) for d in DATASETS}
TEMPLATES = {d.name: PatternTemplate.from_tuples(d.name, d.patterns) for d in DATASETS}

NAMES = tuple(name for d in DATASETS for name in instructions.register_variants(
    d.name, SOURCES[d.name], TEMPLATES[d.name], metric_fns=list(d.metric_fns)))
