"""Evaluation metrics in the SeqIO `metric_fns` convention, plus NER-as-text span helpers.

Every metric is `fn(targets, predictions) -> dict[str, float]` with scores in
[0, 100]. `targets[i]` is one reference (a str) or several (a list/tuple of
str, e.g. the three summaries per dialogsum test dialogue); `predictions[i]`
is a str. With several references, every metric counts the best-matching one
(ROUGE per type via `score_multi`, accuracy/exact match if any matches); BLEU
uses them all as sacrebleu's multi-reference streams. A metric that scores
groups of rows together (MultiRC's exact match per question) also takes
`groups=` (one id per row; `takes_groups(fn)` says so), which evaluation
passes from the rows' `group`.

ROUGE comes from rouge-score and BLEU from sacrebleu, called the way the t5
library's `t5.evaluation.metrics` calls them; the GLUE/SuperGLUE leaderboard
metrics (Matthews correlation, F1, macro F1, Pearson/Spearman) come from
scikit-learn and scipy; nothing here re-implements them. Accuracy, exact
match (SQuAD normalization), span F1 and the expected calibration error are
small enough to own. `METRICS` / `get(name)` look metrics up by name
(`eval.metrics`). NER targets are written as text,
`"Empire State Building (location); ESB (location)"`, or `"None"` when a
sentence has no entities: `format_spans`, `parse_spans` and `bio_to_spans`
convert between that text and (text, type) spans.

This module imports neither TensorFlow, SeqIO nor JAX.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import re
import string
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pysbd
import scipy.special
import scipy.stats
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn import metrics as sk_metrics

from ift_jax import errors

Target = Union[str, Sequence[str]]

NO_SPANS = "None"
# A piece ends at its "(type)"; only a ";" right after ")" separates pieces, so
# entity text with HTML escapes such as "AT&amp;T" (WNUT-17) stays in one piece.
_PIECE_SEPARATOR = re.compile(r"(?<=\))\s*;\s*")
_PIECE = re.compile(r"^(?P<text>.+?)\s*\((?P<type>[^()]*[^()\s][^()]*)\)$")


def _references(target: Target) -> list[str]:
    """The references of one example as a non-empty list."""
    refs = [target] if isinstance(target, str) else list(target)
    if not refs:
        raise ValueError("An example has an empty list of references; give it at least one.")
    return refs


def _check_lengths(targets: Sequence[Target], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"Got {len(targets)} targets but {len(predictions)} predictions; "
                         "metrics need one prediction per target.")
    if not targets:
        raise ValueError("Got no targets and no predictions; metrics need at least one example.")


# How rougeLsum finds sentences (rouge-score splits summaries on "\n" only):
# - "pysbd": pysbd's rule-based English segmenter (Sadvilkar & Neumann 2020, the
#   "Golden Rules" of the Pragmatic Segmenter). Pure Python, no model files, so it
#   works offline, where nltk's punkt (what HF's summarization scripts call before
#   rouge-score) needs a `nltk.download` that cannot run here; it keeps "Mr.",
#   "p.m.", "U.S." and decimals inside sentences, which an untrained punkt does not.
# - "t5": the t5 library's `summary.replace(" . ", " .\n")`: splits only tokenized
#   text (" . "), so on ordinary text rougeLsum equals rougeL.
# - "none": only the newlines already in the text.
ROUGE_SENTENCE_SPLITS = ("pysbd", "t5", "none")
_rouge_sentence_split = "pysbd"


def set_rouge_sentence_split(name: str) -> None:
    """Sets how `rouge` splits sentences for rougeLsum by default (`eval.rouge_sentence_split`).

    Raises:
      ValueError: naming the choices, if `name` is not one of `ROUGE_SENTENCE_SPLITS`.
    """
    global _rouge_sentence_split
    _check_sentence_split(name)
    _rouge_sentence_split = name


def rouge_sentence_split() -> str:
    """The default sentence splitting of `rouge` (see `ROUGE_SENTENCE_SPLITS`)."""
    return _rouge_sentence_split


def _check_sentence_split(name: str) -> None:
    if name not in ROUGE_SENTENCE_SPLITS:
        raise errors.ConfigError(f"rouge sentence split {name!r} is not one of: "
                         f"{', '.join(ROUGE_SENTENCE_SPLITS)}")


def split_sentences(text: str, how: str = "pysbd") -> str:
    """`text` with one sentence per line, as rougeLsum wants it.

    Args:
      text: a summary.
      how: one of `ROUGE_SENTENCE_SPLITS`.
    """
    _check_sentence_split(how)
    if how == "t5":
        return text.replace(" . ", " .\n")
    if how == "none":
        return text
    # Existing line breaks stay breaks; pysbd segments within each line.
    segmenter = pysbd.Segmenter(language="en", clean=False)
    sentences = [s.strip() for line in text.split("\n") if line.strip()
                 for s in segmenter.segment(line)]
    return "\n".join(s for s in sentences if s)


def rouge(targets: Sequence[Target], predictions: Sequence[str], *,
          rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
          use_stemmer: bool = True, sentence_split: Optional[str] = None
          ) -> dict[str, float]:
    """ROUGE F-measure, precision and recall x 100, averaged over examples.

    Both sides are split into sentences first (`split_sentences`, by default
    the module's setting, `set_rouge_sentence_split`), which only rougeLsum
    reads. With several references, `RougeScorer.score_multi` keeps, per ROUGE
    type, the reference with the best F-measure (its precision and recall are
    reported).

    The t5 library reports `BootstrapAggregator`'s mid F-measure, the median of
    bootstrap resample means: that is the plain mean up to resampling noise
    and changes from run to run, so this reports the plain mean instead.

    Args:
      targets: one reference (str) or several (list of str) per example.
      predictions: one str per example.
      rouge_types: rouge-score type names, e.g. "rouge1", "rougeLsum".
      use_stemmer: Porter-stem tokens before matching (as t5 and HF do).
      sentence_split: one of `ROUGE_SENTENCE_SPLITS`; None = the module's setting.

    Returns:
      `{rouge_type: F, rouge_type + "_precision": P, rouge_type + "_recall": R}`
      for each of `rouge_types`, in [0, 100].

    Raises:
      ValueError: if `targets` and `predictions` differ in length or are empty, or
        `sentence_split` is unknown.
    """
    _check_lengths(targets, predictions)
    how = sentence_split or _rouge_sentence_split
    _check_sentence_split(how)
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    parts = (("", "fmeasure"), ("_precision", "precision"), ("_recall", "recall"))
    totals = {key + suffix: 0.0 for key in rouge_types for suffix, _ in parts}
    for target, prediction in zip(targets, predictions):
        refs = [split_sentences(ref, how) for ref in _references(target)]
        scores = scorer.score_multi(refs, split_sentences(prediction, how))
        for key in rouge_types:
            for suffix, field in parts:
                totals[key + suffix] += getattr(scores[key], field)
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def bleu(targets: Sequence[Target], predictions: Sequence[str], *,
         tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU from sacrebleu, with the settings of t5's `metrics.bleu`.

    sacrebleu wants references as streams: stream k holds the k-th reference
    of every example. When examples have different numbers of references, the
    shorter ones are padded with `None`, which sacrebleu (2.x, `_cache_references`)
    drops per segment, so each example is scored against exactly its own
    references. (An empty string would instead count as a real, empty reference.)

    Args:
      targets: one reference (str) or several (list of str) per example.
      predictions: one str per example (detokenized text).
      tokenize: sacrebleu tokenizer name: "13a" (default), "intl", "zh", ...

    Returns:
      `{"bleu": score}` in [0, 100].

    Raises:
      ValueError: if `targets` and `predictions` differ in length or are empty.
    """
    _check_lengths(targets, predictions)
    refs = [_references(target) for target in targets]
    num_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(num_streams)]
    metric = BLEU(smooth_method="exp", smooth_value=0.0, force=False, lowercase=False,
                  tokenize=tokenize, effective_order=False)
    return {"bleu": metric.corpus_score(list(predictions), streams).score}


def accuracy(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to a reference, after `.strip()` on both.

    With several references, matching any one of them counts.
    """
    _check_lengths(targets, predictions)
    hits = sum(prediction.strip() in {ref.strip() for ref in _references(target)}
               for target, prediction in zip(targets, predictions))
    return {"accuracy": 100.0 * hits / len(predictions)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and English
    articles, collapse whitespace (as t5's `squad` exact match does)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to a reference after `normalize_answer`.

    Unlike `accuracy`, "The Eiffel Tower." matches "eiffel tower". With several
    references, matching any one counts.
    """
    _check_lengths(targets, predictions)
    hits = sum(normalize_answer(prediction) in {normalize_answer(r) for r in _references(t)}
               for t, prediction in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(predictions)}


# --- GLUE / SuperGLUE leaderboard metrics (scikit-learn, scipy) ------------------------


def _single_references(targets: Sequence[Target], metric: str) -> list[str]:
    out = []
    for target in targets:
        refs = _references(target)
        if len(refs) != 1:
            raise ValueError(f"{metric} takes one reference per example; got {len(refs)}.")
        out.append(refs[0].strip())
    return out


def _labels(targets: Sequence[Target], predictions: Sequence[str], metric: str
            ) -> tuple[list[str], list[str]]:
    _check_lengths(targets, predictions)
    return _single_references(targets, metric), [p.strip() for p in predictions]


def matthews_corr(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Matthews correlation x 100 (`sklearn.metrics.matthews_corrcoef`; CoLA's metric).

    Labels are the stripped strings; a prediction that is no label is a class of
    its own, as in t5's `matthews_corrcoef` (where it is class -1).
    """
    gold, predicted = _labels(targets, predictions, "matthews_corr")
    return {"mcc": 100.0 * sk_metrics.matthews_corrcoef(gold, predicted)}


def _flip_invalid(gold: list[str], predicted: list[str], positive: str, negative: str
                  ) -> tuple[list[bool], list[bool]]:
    """Binary labels; a prediction that is neither label counts as wrong (t5's
    `f1_score_with_invalid`)."""
    y_true = [g == positive for g in gold]
    y_pred = [p == positive if p in (positive, negative) else not t
              for p, t in zip(predicted, y_true)]
    return y_true, y_pred


def binary_f1(positive: str, negative: str) -> Callable[..., dict[str, float]]:
    """A metric: F1 x 100 of the `positive` label (`sklearn.metrics.f1_score`; MRPC's F1).

    A prediction that is neither `positive` nor `negative` counts as wrong (a
    false negative or a false positive), as t5's `f1_score_with_invalid` does.
    """
    def f1(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
        y_true, y_pred = _flip_invalid(*_labels(targets, predictions, "binary_f1"),
                                       positive, negative)
        return {"f1": 100.0 * sk_metrics.f1_score(y_true, y_pred, zero_division=0.0)}
    f1.__name__ = f1.__qualname__ = f"binary_f1[{positive}]"
    return f1


def macro_f1(labels: Sequence[str]) -> Callable[..., dict[str, float]]:
    """A metric: F1 x 100 averaged over `labels` (`sklearn.metrics.f1_score`,
    `average="macro"`; CommitmentBank's F1).

    A prediction outside `labels` is wrong for its example's label and counts for
    no label, as in t5's `mean_multiclass_f1`.
    """
    labels = list(labels)

    def f1(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
        gold, predicted = _labels(targets, predictions, "macro_f1")
        return {"macro_f1": 100.0 * sk_metrics.f1_score(
            gold, predicted, labels=labels, average="macro", zero_division=0.0)}
    f1.__name__ = f1.__qualname__ = "macro_f1"
    return f1


def parse_float(text: str, default: float = -1.0) -> float:
    """The number a prediction states, or `default` (t5's `string_to_float`)."""
    try:
        return float(text.strip())
    except ValueError:
        return default


def pearson_spearman(targets: Sequence[Target], predictions: Sequence[str]
                     ) -> dict[str, float]:
    """Pearson and Spearman correlation x 100 of the stated numbers (STS-B's metrics).

    Predictions are parsed as FLAN/t5 do (`parse_float`: text that is no number
    counts as -1); from `scipy.stats.pearsonr` / `spearmanr`. Constant
    predictions (or targets) have no correlation: scipy gives NaN, and so does this.
    """
    gold, predicted = _labels(targets, predictions, "pearson_spearman")
    x = np.asarray([parse_float(g) for g in gold], np.float64)
    y = np.asarray([parse_float(p) for p in predicted], np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": 100.0 * float(scipy.stats.pearsonr(x, y)[0]),
            "spearman": 100.0 * float(scipy.stats.spearmanr(x, y)[0])}


def multirc_f1a_em(targets: Sequence[Target], predictions: Sequence[str], *,
                   groups: Sequence[str], positive: str = "yes", negative: str = "no"
                   ) -> dict[str, float]:
    """MultiRC's F1a and exact match, x 100.

    Each row is one answer option judged `positive` or `negative`; `groups[i]`
    names the question row i belongs to. F1a: binary F1 of `positive` over all
    answer options (a prediction that is neither label counts as wrong); exact
    match: the share of questions whose options are all right (t5's
    `mean_group_metric(all_match)`).

    Raises:
      ValueError: if `groups` is not one id per row.
    """
    gold, predicted = _labels(targets, predictions, "multirc_f1a_em")
    if len(groups) != len(gold) or not all(groups):
        raise ValueError(f"multirc_f1a_em needs a non-empty group id per row; got "
                         f"{len(groups)} groups for {len(gold)} rows")
    y_true, y_pred = _flip_invalid(gold, predicted, positive, negative)
    all_right: dict[str, bool] = {}
    for group, g, p in zip(groups, gold, predicted):
        all_right[group] = all_right.get(group, True) and g == p
    return {"f1a": 100.0 * sk_metrics.f1_score(y_true, y_pred, zero_division=0.0),
            "exact_match": 100.0 * sum(all_right.values()) / len(all_right)}


def takes_groups(metric_fn: Callable[..., dict[str, float]]) -> bool:
    """Whether `metric_fn` scores groups of rows (takes `groups=`)."""
    try:
        return "groups" in inspect.signature(metric_fn).parameters
    except (TypeError, ValueError):  # Callables without a signature take no groups.
        return False


# --- calibration -----------------------------------------------------------------------

ECE_BINNINGS = ("equal_mass", "equal_width")


def choice_probabilities(log_likelihoods: Sequence[float]) -> list[float]:
    """Softmax over the answer choices' log-likelihoods (rank classification's
    distribution over the choices; its max is the prediction's confidence)."""
    return scipy.special.softmax(np.asarray(log_likelihoods, np.float64)).tolist()


def _bin_edges(confidences: np.ndarray, num_bins: int, binning: str) -> np.ndarray:
    """Upper edges of the bins; a confidence goes to the first edge >= it."""
    if binning == "equal_width":
        return np.arange(1, num_bins + 1) / num_bins
    # Equal mass: sorted confidences in `num_bins` near-equal runs, each edge halfway
    # between one run's last value and the next run's first (the calibration
    # library's `get_equal_bins`, which HELM calls).
    runs = np.array_split(np.sort(confidences), min(num_bins, len(confidences)))
    edges = [(a[-1] + b[0]) / 2.0 for a, b in itertools.pairwise(runs)] + [1.0]
    return np.unique(edges)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               num_bins: int = 10, binning: str = "equal_mass") -> float:
    """Expected calibration error x 100: sum over bins of (share of examples) x
    |mean confidence - accuracy|.

    `binning="equal_mass"` (default) puts about the same number of examples in
    each bin: HELM's `ece_10_bin` (`calibration.get_ece_em(..., num_bins=10)` of
    the uncertainty-calibration library). `"equal_width"` uses the bins
    (0, 1/n], (1/n, 2/n], ... of Guo et al. (2017) (that library's `get_ece`).

    Args:
      confidences: per example, the probability of the predicted answer, in [0, 1]
        (rank classification: the max of `choice_probabilities`).
      correct: per example, whether the predicted answer was right.
      num_bins: number of bins (equal mass: at most one per example).
      binning: one of `ECE_BINNINGS`.

    Raises:
      ValueError: on length mismatch, no examples, confidences outside [0, 1], or an
        unknown binning.
    """
    if binning not in ECE_BINNINGS:
        raise ValueError(f"binning {binning!r} is not one of: {', '.join(ECE_BINNINGS)}")
    conf = np.asarray(confidences, np.float64)
    hits = np.asarray(correct, np.float64)
    if conf.shape != hits.shape or conf.ndim != 1 or not len(conf):
        raise ValueError(f"Got {conf.size} confidences and {hits.size} correct flags; need "
                         f"the same non-zero number of each.")
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("Confidences must be probabilities in [0, 1].")
    bins = np.searchsorted(_bin_edges(conf, num_bins, binning), conf, side="left")
    error = 0.0
    for b in np.unique(bins):
        members = bins == b
        error += members.mean() * abs(conf[members].mean() - hits[members].mean())
    return 100.0 * float(error)


def format_spans(spans: Sequence[tuple[str, str]]) -> str:
    """Writes (text, type) spans as `"text (type); text (type)"`, or "None" if empty.

    Raises:
      ValueError: if a type is blank or contains "(" or ")", which could not be
        read back.
    """
    for _, entity_type in spans:
        if not entity_type.strip() or set("()") & set(entity_type):
            raise ValueError(f"Entity type {entity_type!r} cannot be written as text; "
                             "use a non-blank type without parentheses.")
    return "; ".join(f"{text} ({entity_type})" for text, entity_type in spans) or NO_SPANS


def parse_spans(text: str) -> list[tuple[str, str]]:
    """Reads spans written by `format_spans`; the inverse for whitespace-normalized text.

    Runs of whitespace collapse to one space. "None" and blank text mean no
    spans. A piece without a trailing "(type)" is kept as `(piece, "")`: no
    gold span has an empty type, so it counts as a wrong prediction.
    """
    text = " ".join(text.split())
    if text in ("", NO_SPANS):
        return []
    spans = []
    for piece in _PIECE_SEPARATOR.split(text):
        match = _PIECE.match(piece)
        if match:
            spans.append((match["text"], match["type"].strip()))
        elif piece:
            spans.append((piece, ""))
    return spans


def span_f1(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 over (text, type) spans, in [0, 100].

    Spans are compared as multisets per example (a span predicted twice but
    gold once is one hit and one false positive). With no predicted spans
    precision is 100 (nothing wrong was said); with no gold spans recall is
    100; so an all-"None" set answered with all "None" scores 100.

    Raises:
      ValueError: on length mismatch, or an example with several references.
    """
    _check_lengths(targets, predictions)
    hits = num_gold = num_predicted = 0
    for target, prediction in zip(targets, predictions):
        refs = _references(target)
        if len(refs) != 1:
            raise ValueError(f"span_f1 takes one reference per example; got {len(refs)}.")
        gold = collections.Counter(parse_spans(refs[0]))
        predicted = collections.Counter(parse_spans(prediction))
        hits += sum((gold & predicted).values())
        num_gold += sum(gold.values())
        num_predicted += sum(predicted.values())
    precision = 100.0 * hits / num_predicted if num_predicted else 100.0
    recall = 100.0 * hits / num_gold if num_gold else 100.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"span_f1": f1, "span_precision": precision, "span_recall": recall}


def bio_to_spans(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """Turns BIO tags ("B-location", "I-location", "O") into (text, type) spans.

    Span text is the span's tokens joined by single spaces. As in seqeval's
    default mode, an I- tag that does not continue a span of the same type
    starts a new span.

    Raises:
      ValueError: if lengths differ or a tag is not "O", "B-<type>" or "I-<type>".
    """
    if len(tokens) != len(tags):
        raise ValueError(f"Got {len(tokens)} tokens but {len(tags)} tags; need one tag per token.")
    spans: list[tuple[list[str], str]] = []
    current_type = None
    for token, tag in zip(tokens, tags):
        if tag == "O":
            current_type = None
            continue
        prefix, _, entity_type = tag.partition("-")
        if prefix not in ("B", "I") or not entity_type:
            raise ValueError(f"Tag {tag!r} is not BIO; expected 'O', 'B-<type>' or 'I-<type>'.")
        if prefix == "B" or entity_type != current_type:
            spans.append(([], entity_type))
        spans[-1][0].append(token)
        current_type = entity_type
    return [(" ".join(words), entity_type) for words, entity_type in spans]


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "rouge": rouge, "bleu": bleu, "accuracy": accuracy, "exact_match": exact_match,
    "span_f1": span_f1,
}


def get(name: str) -> Callable[..., dict[str, float]]:
    """The metric function called `name` (a key of `METRICS`).

    Raises:
      ValueError: naming the available metrics, if there is no such metric.
    """
    if name not in METRICS:
        raise errors.ConfigError(f"no metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]
