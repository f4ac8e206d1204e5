"""Evaluation metrics in the SeqIO `metric_fns` convention, plus NER-as-text span helpers.

Every metric is `fn(targets, predictions) -> dict[str, float]` with scores in
[0, 100]. `targets[i]` is one reference (a str) or several (a list/tuple of
str, e.g. the three summaries per dialogsum test dialogue); `predictions[i]`
is a str. With several references, every metric counts the best-matching one
(ROUGE per type via `score_multi`, accuracy/exact match if any matches); BLEU
uses them all as sacrebleu's multi-reference streams.

ROUGE comes from rouge-score and BLEU from sacrebleu, called the way the t5
library's `t5.evaluation.metrics` calls them; nothing here re-implements them.
Accuracy, exact match (SQuAD normalization) and span F1 are small enough to
own. `METRICS` / `get(name)` look metrics up by name (`eval.metrics`). NER
targets are written as text,
`"Empire State Building (location); ESB (location)"`, or `"None"` when a
sentence has no entities: `format_spans`, `parse_spans` and `bio_to_spans`
convert between that text and (text, type) spans.

This module imports neither TensorFlow, SeqIO nor JAX.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Sequence, Union

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

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


def _prepare_summary(summary: str) -> str:
    # As t5.evaluation.metrics.rouge does: rougeLsum splits sentences on "\n",
    # so put one after each space-separated full stop. Other ROUGE types
    # tokenize newlines away and are unaffected.
    return summary.replace(" . ", " .\n")


def rouge(targets: Sequence[Target], predictions: Sequence[str], *,
          rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
          use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE F-measure x 100, averaged over examples.

    Both sides go through `summary.replace(" . ", " .\\n")` first, as in the t5
    library, so that rougeLsum sees one sentence per line in tokenized text.
    With several references, `RougeScorer.score_multi` keeps, per ROUGE type,
    the reference with the best F-measure.

    The t5 library reports `BootstrapAggregator`'s mid F-measure, the median of
    bootstrap resample means: that is the plain mean up to resampling noise
    and changes from run to run, so this reports the plain mean instead.

    Args:
      targets: one reference (str) or several (list of str) per example.
      predictions: one str per example.
      rouge_types: rouge-score type names, e.g. "rouge1", "rougeLsum".
      use_stemmer: Porter-stem tokens before matching (as t5 and HF do).

    Returns:
      `{rouge_type: score}` for each of `rouge_types`, in [0, 100].

    Raises:
      ValueError: if `targets` and `predictions` differ in length or are empty.
    """
    _check_lengths(targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for target, prediction in zip(targets, predictions):
        refs = [_prepare_summary(ref) for ref in _references(target)]
        scores = scorer.score_multi(refs, _prepare_summary(prediction))
        for key in rouge_types:
            totals[key] += scores[key].fmeasure
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
        raise ValueError(f"no metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               num_bins: int = 10) -> float:
    """ECE in [0, 1]: equal-width confidence bins over [0, 1] (HELM's binning), the
    mean |accuracy - confidence| of each bin weighted by its share of examples."""
    if len(confidences) != len(correct) or not confidences:
        raise ValueError("expected_calibration_error needs one correctness per confidence")
    total, error = len(confidences), 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        members = [i for i, c in enumerate(confidences)
                   if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(bool(correct[i]) for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            error += len(members) / total * abs(accuracy - confidence)
    return error
